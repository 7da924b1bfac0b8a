"""The manifest dataset: transforms, channels, bad rows and skipping."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import write_tiny_manifest
from msd_core.data import EpochBatchSampler, ImageTextDataset, PairCollator
from msd_core.imageio import ImageReadError
from msd_core.manifest import ManifestError, read_manifest, split_by_patient


def edit_manifest(path, change):
    """Apply ``change`` to the manifest's DataFrame (it returns the new frame or None) and save it."""
    frame = pd.read_csv(path)
    changed = change(frame)
    (frame if changed is None else changed).to_csv(path, index=False)


def test_item_shape_and_normalisation(tiny_manifest):
    dataset = ImageTextDataset(tiny_manifest, image_size=16, image_mean=(0.5,), image_std=(0.5,))

    item = dataset[0]

    assert item["pixel_values"].shape == (1, 16, 16)
    assert item["pixel_values"].min() >= -1.0
    assert item["pixel_values"].max() <= 1.0
    assert isinstance(item["text"], str)


def test_three_channels_only_when_requested(tiny_manifest):
    grey = ImageTextDataset(tiny_manifest, image_channels=1)[0]["pixel_values"]
    rgb = ImageTextDataset(tiny_manifest, image_channels=3)[0]["pixel_values"]

    assert grey.shape[0] == 1
    assert rgb.shape[0] == 3
    assert torch.equal(rgb[0], rgb[1])
    assert torch.equal(rgb[1], rgb[2])


def test_non_square_image_keeps_aspect(tmp_path):
    manifest = write_tiny_manifest(tmp_path, pairs=4)
    Image.fromarray(np.full((40, 20), 255, dtype=np.uint8)).save(tmp_path / "images" / "pair0000.png")
    dataset = ImageTextDataset(manifest, image_size=20, image_mean=(0.0,), image_std=(1.0,))

    pixels = dataset[0]["pixel_values"][0]

    assert pixels[:, 10].min() > 0.9  # the white image fills the middle columns
    assert pixels[:, 0].max() < 0.1  # and black padding the outer ones


def test_split_filter(tiny_manifest):
    assert len(ImageTextDataset(tiny_manifest, split="train")) == 40
    assert len(ImageTextDataset(tiny_manifest, split="test")) == 8
    with pytest.raises(ManifestError, match="no rows with split='val'"):
        ImageTextDataset(tiny_manifest, split="val")


def test_missing_image_names_row(tiny_manifest):
    (tiny_manifest.parent / "images" / "pair0003.png").unlink()

    with pytest.raises(ManifestError, match=r"row 3 of .*manifest.csv \(line 5\): image not found: .*pair0003.png"):
        ImageTextDataset(tiny_manifest)


def test_csv_line_counts_multiline_reports(tiny_manifest):
    edit_manifest(tiny_manifest, lambda frame: frame.__setitem__(
        "text", ["FINDINGS: clear lungs.\nIMPRESSION: normal." if i == 1 else t for i, t in enumerate(frame["text"])]))
    (tiny_manifest.parent / "images" / "pair0003.png").unlink()

    with pytest.raises(ManifestError, match=r"row 3 of .*manifest.csv \(line 6\): image not found"):
        ImageTextDataset(tiny_manifest)


def test_skipped_image_logs_csv_line(tiny_manifest, caplog):
    (tiny_manifest.parent / "images" / "pair0004.png").write_text("not an image")
    dataset = ImageTextDataset(tiny_manifest, skip_bad_rows=True)

    with caplog.at_level("WARNING", logger="msd_core.data"):
        item = dataset[4]

    assert item is None
    assert "skipping row 4 of" in caplog.text
    assert "manifest.csv (line 6)" in caplog.text


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_report_names_row(tiny_manifest, text):
    edit_manifest(tiny_manifest, lambda frame: frame.__setitem__("text", [text if i == 5 else t
                                                                           for i, t in enumerate(frame["text"])]))

    with pytest.raises(ManifestError, match="row 5 .*empty report"):
        ImageTextDataset(tiny_manifest)


def test_path_outside_folder_rejected(tiny_manifest):
    outside = tiny_manifest.parent.parent / "elsewhere.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(outside)
    edit_manifest(tiny_manifest, lambda frame: frame.__setitem__(
        "image_path", ["../elsewhere.png" if i == 2 else p for i, p in enumerate(frame["image_path"])]))

    with pytest.raises(ManifestError, match="row 2 .*outside the manifest folder"):
        ImageTextDataset(tiny_manifest)


def test_missing_column_lists_columns(tiny_manifest):
    edit_manifest(tiny_manifest, lambda frame: frame.drop(columns=["study_id"]))

    with pytest.raises(ManifestError, match=r"missing required column\(s\) \['study_id'\]; it has"):
        read_manifest(tiny_manifest)


def test_non_utf8_manifest_names_line(tiny_manifest):
    raw = tiny_manifest.read_bytes().splitlines(keepends=True)
    raw[4] = raw[4].replace(b"FINDINGS", "FINDINGS caf\u00e9".encode("latin-1"))
    tiny_manifest.write_bytes(b"".join(raw))

    with pytest.raises(ManifestError, match="line 5 is not valid UTF-8"):
        read_manifest(tiny_manifest)


def test_skipping_counts_reasons(tiny_manifest):
    (tiny_manifest.parent / "images" / "pair0001.png").unlink()
    edit_manifest(tiny_manifest, lambda frame: frame.__setitem__("text", ["" if i == 7 else t
                                                                           for i, t in enumerate(frame["text"])]))

    dataset = ImageTextDataset(tiny_manifest, skip_bad_rows=True)

    assert len(dataset) == 46
    assert dataset.dropped == {"image not found": 1, "empty report": 1}


def test_truncated_image_raises_with_row(tiny_manifest):
    image = tiny_manifest.parent / "images" / "pair0004.png"
    image.write_bytes(image.read_bytes()[:60])
    dataset = ImageTextDataset(tiny_manifest)

    with pytest.raises(ImageReadError, match=r"row 4 of .*manifest.csv \(line 6\): .*pair0004.png"):
        dataset[4]


def test_unreadable_image_skipped_in_batch(tiny_manifest):
    (tiny_manifest.parent / "images" / "pair0004.png").write_text("not an image")
    dataset = ImageTextDataset(tiny_manifest, skip_bad_rows=True)
    from msd_core.model import train_wordpiece_tokenizer

    collate = PairCollator(train_wordpiece_tokenizer(dataset.texts, 100), max_length=16)
    batch = collate([dataset[i] for i in range(3, 7)])

    assert batch["skipped"] == 1
    assert batch["index"].tolist() == [3, 5, 6]
    assert batch["pixel_values"].shape[0] == 3


def test_sampler_same_order_for_seed():
    first = list(EpochBatchSampler(20, 4, seed=3, epoch=1))
    second = list(EpochBatchSampler(20, 4, seed=3, epoch=1))
    other_epoch = list(EpochBatchSampler(20, 4, seed=3, epoch=2))

    assert first == second
    assert first != other_epoch
    assert sorted(sum(first, [])) == list(range(20))


def test_sampler_resumes_mid_epoch():
    whole = list(EpochBatchSampler(20, 4, seed=0))
    tail = list(EpochBatchSampler(20, 4, seed=0, start_batch=2))

    assert tail == whole[2:]


def test_split_by_patient_keeps_patients_together():
    patients = [f"p{i // 3}" for i in range(300)]

    splits = split_by_patient(patients, seed=1)

    by_patient = pd.DataFrame({"patient": patients, "split": splits}).groupby("patient")["split"].nunique()
    assert (by_patient == 1).all()
    assert set(splits) == {"train", "val", "test"}
    assert list(split_by_patient(patients, seed=1)) == list(splits)
