"""Packaged prompt files: each loads, names the classes its dataset's builder writes, and
evaluates a checkpoint pretrained for two steps on a fake tree laid out like that dataset.

The fake trees reuse the writers of test_data_prep.py, then replace its empty image files
with small random images, so that training and evaluation read real pixels.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import requires_shared_data
from data_prep import chexpert, covidx, iu_xray, mimic_cxr, rsna, siim
from data_prep.common import label_column_name
from msd_core.config import get_preset
from msd_core.evaluate import evaluate_checkpoint
from msd_core.manifest import read_manifest
from msd_core.train import train
from msd_core.zeroshot import PromptSet, available_prompt_sets, load_prompts, task_targets
from test_data_prep import iu_report, touch, write_covidx_tree, write_iu_tree, write_mimic_tree

PAIRS = 30  # images per fake tree: enough for non-empty train, val and test splits
IMAGE_SIZE = 32  # pixels per side of each fake image
IMAGE_SUFFIXES = (".png", ".jpg", ".dcm")
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # larger val and test shares than the builders' defaults

# Prompt file -> the class names its builder writes, in the order the builder writes them.
BUILDER_CLASSES = {
    "iu_xray": list(iu_xray.LABEL_TERMS),
    "mimic_cxr": [label_column_name(name) for name in mimic_cxr.CHEXPERT_LABELS],
    "chexpert_5x200": list(chexpert.CLASSES),
    "rsna": ["pneumonia"],
    "siim": ["pneumothorax"],
    # The three-class lists write COVID-19 in capitals; the builder matches it case-insensitively.
    "covidx": ["normal", "pneumonia", "COVID-19"],
    "covidx_binary": ["covid_19"],
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run this module's tiny models on one thread.

    A 32-wide model gains nothing from a second thread. On two cores shared with another
    training process, one end-to-end test took 11 s with two threads and 3.5 s with one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- fake trees

def fill_images(root: Path, seed: int = 0) -> int:
    """Overwrite every empty image file under ``root`` with random grey pixels and return the count.

    PNG and JPEG files get 8-bit pixels, and DICOM files 12-bit values in a 16-bit
    MONOCHROME2 image.
    """
    rng = np.random.default_rng(seed)
    count = 0
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file() or path.stat().st_size:
            continue
        pixels = rng.integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE))  # (H, W)
        if path.suffix.lower() == ".dcm":
            write_dicom_image(path, pixels * 16)
        else:
            Image.fromarray(pixels.astype(np.uint8), mode="L").save(path)
        count += 1
    return count


def write_dicom_image(path: Path, pixels: np.ndarray) -> None:
    pytest.importorskip("pydicom", reason="pydicom is needed to write the DICOM images of RSNA and SIIM")
    from test_imageio import write_dicom

    write_dicom(path, pixels)


def alternating_labels(names, number: int) -> dict:
    """Return 0/1 labels where ``names[j]`` of item ``number`` is 1 when ``number + j`` is even.

    Any two items of different parity then give every label both values.
    """
    return {name: int((number + index) % 2 == 0) for index, name in enumerate(names)}


def build_iu_xray(root: Path) -> Path:
    """Write an IU X-ray tree of PAIRS one-image reports whose MeSH terms alternate, and build its manifest."""
    reports, images, views = {}, [], {}
    for number in range(1, PAIRS + 1):
        image = f"CXR{number}_IM-{number:04d}-1001"
        positive = [name for name, value in alternating_labels(iu_xray.LABEL_TERMS, number).items() if value]
        terms = [iu_xray.LABEL_TERMS[name][0].title() for name in positive]
        impression = " ".join(f"{name.replace('_', ' ').capitalize()}." for name in positive)
        reports[number] = iu_report(number, "The lungs are expanded.", impression, [image], terms)
        images.append(image)
        views[image] = "PA"
    write_iu_tree(root, reports, images, views)
    fill_images(root)

    out = root / "manifest.csv"
    iu_xray.build_manifest(root, out, fractions=SPLIT_FRACTIONS)
    return out


def build_mimic_cxr(root: Path) -> Path:
    """Write a MIMIC-CXR-JPG tree of PAIRS one-image studies and build its manifest.

    Every fifth study is in the official test split, so the test split gives every label both values.
    """
    studies = []
    for index in range(PAIRS):
        labels = alternating_labels(mimic_cxr.CHEXPERT_LABELS, index)
        impression = " ".join(f"{name}." for name, value in labels.items() if value)
        report = f"FINAL REPORT\n FINDINGS: The lungs are expanded.\n\n IMPRESSION: {impression}\n"
        split = ("test", "validate", "train", "train", "train")[index % 5]
        image = (f"d{index:04d}", "PA" if index % 3 else "AP")
        studies.append((10000000 + index, 50000000 + index, split, [image], report, labels))
    write_mimic_tree(root, studies)
    fill_images(root)

    out = root / "manifest.csv"
    mimic_cxr.build_manifest(root, out)
    return out


def build_chexpert_5x200(root: Path) -> Path:
    """Write a CheXpert training table of PAIRS patients and build the 5x200 manifest from it.

    Each patient has one frontal and one lateral image, and each frontal image has one of
    the five classes positive, so the selection with ``per_class = PAIRS // 5`` takes every
    frontal image.
    """
    rows = []
    for number in range(1, PAIRS + 1):
        positive = chexpert.CLASSES[number % len(chexpert.CLASSES)]
        labels = {name: (1.0 if name == positive else None) for name in chexpert.CLASSES}
        study = f"CheXpert-v1.0-small/train/patient{number:05d}/study1"
        for view, side in (("frontal", "Frontal"), ("lateral", "Lateral")):
            rows.append({"Path": f"{study}/view1_{view}.jpg", "Sex": "Female", "Age": 60,
                         "Frontal/Lateral": side, "AP/PA": "PA" if side == "Frontal" else None,
                         "No Finding": None, **labels})
            touch(root / study / f"view1_{view}.jpg")
    (root / "CheXpert-v1.0-small").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "CheXpert-v1.0-small" / "train.csv", index=False)
    fill_images(root)

    out = root / "manifest.csv"
    chexpert.build_manifest(root, out, per_class=PAIRS // len(chexpert.CLASSES), fractions=SPLIT_FRACTIONS)
    return out


def build_rsna(root: Path) -> Path:
    """Write an RSNA Pneumonia tree, where every second patient has one or two boxes, and build its manifest."""
    rows = []
    for index in range(PAIRS):
        patient = f"{index:08x}-0000-4000-8000-{index:012x}"
        boxes = (index % 4 == 0) + 1 if index % 2 == 0 else 0
        for box in range(boxes):
            rows.append({"patientId": patient, "x": 10.0 + box, "y": 12.0, "width": 8.0, "height": 9.0, "Target": 1})
        if not boxes:
            rows.append({"patientId": patient, "x": None, "y": None, "width": None, "height": None, "Target": 0})
        touch(root / "stage_2_train_images" / f"{patient}.dcm")
    pd.DataFrame(rows).to_csv(root / "stage_2_train_labels.csv", index=False)
    fill_images(root)

    out = root / "manifest.csv"
    rsna.build_manifest(root, out, fractions=SPLIT_FRACTIONS)
    return out


def build_siim(root: Path) -> Path:
    """Write a SIIM-ACR tree with nested DICOM folders and build its manifest.

    Every second image has pneumothorax regions.
    """
    lines = ["ImageId, EncodedPixels"]
    for index in range(PAIRS):
        image = f"1.2.276.0.7230010.3.1.4.8323329.{1000 + index}.1517875162.{index}"
        if index % 2 == 0:
            lines += [f"{image}, 40 3 70 2", f"{image}, 300 4"] if index % 4 == 0 else [f"{image}, 120 5"]
        else:
            lines.append(f"{image}, -1")
        touch(root / "dicom-images-train" / f"1.2.276.{index}.2" / f"1.2.276.{index}.3" / f"{image}.dcm")
    (root / "train-rle.csv").write_text("\n".join(lines) + "\n")
    fill_images(root)

    out = root / "manifest.csv"
    siim.build_manifest(root, out, fractions=SPLIT_FRACTIONS)
    return out


def covidx_lists(labels) -> dict:
    """Return train and test lists that cycle through ``labels``: PAIRS - 6 train and 6 test images."""
    rows = [(f"{index}", f"{index:05d}.png", labels[index % len(labels)], "cohen") for index in range(PAIRS)]
    return {"train": rows[:-6], "test": rows[-6:]}


def build_covidx(root: Path) -> Path:
    """Write a COVIDx tree with three-class lists (normal, pneumonia, COVID-19) and build its manifest."""
    write_covidx_tree(root, covidx_lists(["normal", "pneumonia", "COVID-19"]))
    fill_images(root)

    out = root / "manifest.csv"
    covidx.build_manifest(root, out, val_fraction=0.2)
    return out


def build_covidx_binary(root: Path) -> Path:
    """Write a COVIDx tree with positive/negative lists, as in COVIDx CXR-2 and later, and build its manifest."""
    write_covidx_tree(root, covidx_lists(["positive", "negative"]))
    fill_images(root)

    out = root / "manifest.csv"
    covidx.build_manifest(root, out, val_fraction=0.2)
    return out


FAKE_TREES = {
    "iu_xray": build_iu_xray,
    "mimic_cxr": build_mimic_cxr,
    "chexpert_5x200": build_chexpert_5x200,
    "rsna": build_rsna,
    "siim": build_siim,
    "covidx": build_covidx,
    "covidx_binary": build_covidx_binary,
}


# ---------------------------------------------------------------- pretraining and evaluation

def pretrain_and_evaluate(manifest: Path, prompts: str, folder: Path) -> pd.DataFrame:
    """Pretrain the smoke preset for two optimizer steps on ``manifest``; return the zero-shot table."""
    config = get_preset("smoke", manifest=str(manifest), output_dir=str(folder / "run"), micro_batch_size=4,
                        accumulation_steps=2, max_steps=2, checkpoint_every=2, num_workers=0)
    history = train(config, progress=False)
    assert len(history.records) == 2, "pretraining should stop after max_steps=2"

    tables = evaluate_checkpoint(folder / "run", manifest, out_dir=folder / "evaluation", prompts=prompts,
                                 baseline="none", fractions=(1.0,), seeds=(0,), projection="pca", progress=False)
    return tables["zero_shot"]


def defined_classes(task, test_frame: pd.DataFrame) -> set:
    """Return the classes whose metric is defined on the test split.

    A multiclass F1 needs the class among the test rows, and a multilabel AUC needs
    both label values.
    """
    targets = task_targets(test_frame, task)
    if task.type == "multiclass":
        return {value for value in targets if value is not None}
    both_values = []
    for index, name in enumerate(task.classes):
        column = targets[:, index]
        if set(column[~np.isnan(column)]) == {0.0, 1.0}:
            both_values.append(name)
    return set(both_values)


def assert_zero_shot_valid(table: pd.DataFrame, prompt_set: PromptSet, test_frame: pd.DataFrame) -> None:
    """Assert that every task of ``prompt_set`` has finite summary metrics in [0, 1] and a row per class.

    A per-class value is finite and in [0, 1] where the test split defines it, and NaN
    elsewhere.
    """
    assert not table.empty, "the zero-shot table is empty: every task was skipped"
    assert sorted(set(table["task"])) == sorted(prompt_set.tasks)
    for task in prompt_set.tasks.values():
        rows = table[table["task"] == task.name]
        summaries = ("accuracy", "macro_f1") if task.type == "multiclass" else ("macro_auc",)
        for metric in summaries:
            values = rows.loc[rows["metric"] == metric, "value"].tolist()
            assert len(values) == 1, f"task {task.name}: expected one {metric} row, got {values}"
            assert math.isfinite(values[0]), f"task {task.name}: {metric} is {values[0]}"
            assert 0.0 <= values[0] <= 1.0, f"task {task.name}: {metric} {values[0]} is outside [0, 1]"

        per_class = rows[rows["metric"] == ("f1" if task.type == "multiclass" else "auc")].set_index("class")
        assert list(per_class.index) == list(task.classes), f"task {task.name}: per-class rows"
        defined = defined_classes(task, test_frame)
        for name, value in per_class["value"].items():
            if name in defined:
                assert math.isfinite(value), f"task {task.name}, class {name}: metric is {value}"
                assert 0.0 <= value <= 1.0, f"task {task.name}, class {name}: {value} is outside [0, 1]"
            else:
                assert math.isnan(value), f"task {task.name}, class {name}: undefined on the test split, got {value}"


# ---------------------------------------------------------------- tests

def test_every_prompt_file_loads():
    names = available_prompt_sets()

    assert set(BUILDER_CLASSES) <= set(names)
    for name in names:
        prompt_set = load_prompts(name)
        assert prompt_set.name == name, f"{name}.yaml has name {prompt_set.name!r}"
        assert prompt_set.tasks, f"{name}.yaml has no task"


@pytest.mark.parametrize("name", sorted(BUILDER_CLASSES))
def test_prompt_classes_match_builder(name):
    prompt_set = load_prompts(name)

    classes = [cls for task in prompt_set.tasks.values() for cls in task.classes]
    assert classes == BUILDER_CLASSES[name]


@pytest.mark.parametrize("name, negation", [("rsna", "No pneumonia."), ("siim", "No pneumothorax.")])
def test_binary_task_has_negation(name, negation):
    task = load_prompts(name).task()

    assert task.type == "multilabel"
    assert negation in task.negative_prompts[task.classes[0]]


@pytest.mark.parametrize("name", sorted(BUILDER_CLASSES))
def test_positive_negative_prompts_disjoint(name):
    for task in load_prompts(name).tasks.values():
        for cls in task.classes:
            shared = set(task.prompts[cls]) & set(task.negative_prompts.get(cls, ()))
            assert not shared, f"{name}.yaml, task {task.name}, class {cls}: prompts in both lists {shared}"


@pytest.mark.parametrize("name", sorted(FAKE_TREES))
def test_fake_tree_zero_shot_evaluates(name, tmp_path):
    manifest = FAKE_TREES[name](tmp_path / name)
    frame = read_manifest(manifest)
    test_frame = frame[frame["split"] == "test"]
    assert set(frame["split"]) == {"train", "val", "test"}, f"{name}: every split should have rows"

    table = pretrain_and_evaluate(manifest, name, tmp_path)

    prompt_set = load_prompts(name)
    assert_zero_shot_valid(table, prompt_set, test_frame)
    for task in prompt_set.tasks.values():
        assert defined_classes(task, test_frame), f"{name}, task {task.name}: no class is defined on the test split"


# ---------------------------------------------------------------- real label tables (optional)

def real_chexpert(out: Path) -> pd.DataFrame:
    labels = requires_shared_data("label-tables", "chexpert_train.csv.gz")
    return chexpert.build_manifest(out.parent, out, labels=labels, missing_images="ignore")


def real_rsna(out: Path) -> pd.DataFrame:
    labels = requires_shared_data("label-tables", "kaggle_stage_2_train_labels.csv.zip")
    return rsna.build_manifest(out.parent, out, labels=labels, missing_images="ignore")


def real_siim(out: Path) -> pd.DataFrame:
    labels = requires_shared_data("label-tables", "siim-pneumothorax-train-rle.csv.gz")
    return siim.build_manifest(out.parent, out, labels=labels, missing_images="ignore")


def real_iu_xray(out: Path) -> pd.DataFrame:
    folder = requires_shared_data("iu-xray")
    return iu_xray.build_manifest(out.parent, out, reports=folder / "NLMCXR_reports.tgz",
                                  metadata=folder / "nlmcxr_dicom_metadata.csv.gz", missing_images="ignore")


@pytest.mark.real_data
@pytest.mark.parametrize("name, build", [("chexpert_5x200", real_chexpert), ("rsna", real_rsna),
                                         ("siim", real_siim), ("iu_xray", real_iu_xray)])
def test_real_labels_fit_prompt_classes(name, build, tmp_path):
    manifest = build(tmp_path / "manifest.csv")

    for task in load_prompts(name).tasks.values():
        targets = task_targets(manifest, task)
        if task.type == "multiclass":
            unknown = sorted({str(value) for value, target in zip(manifest[task.column], targets) if target is None})
            assert not unknown, f"{name}: label values without prompts {unknown}"
            assert set(targets) == set(task.classes)
        else:
            assert not np.isnan(targets).any(), f"{name}: labels outside 0/1"
            for index, cls in enumerate(task.classes):
                assert set(targets[:, index]) == {0.0, 1.0}, f"{name}, class {cls}: one label value in the whole set"
