"""Tests of the PhantomCXR generator: files, determinism, labels, reports, speed, prompts."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from msd_core.manifest import read_manifest
from msd_core.phantom import FINDINGS, Finding, Study, generate_phantom, main, sample_patient
from msd_core.phantom_draw import draw_study

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT_FILE = REPO_ROOT / "msd_core" / "prompts" / "phantomcxr.yaml"

# Words that name each finding in a report sentence, positive or negated.
MENTIONS = {
    "cardiomegaly": r"cardiomegaly|enlarge",
    "pleural_effusion": r"effusion",
    "pneumothorax": r"pneumothorax",
    "consolidation": r"consolidation|airspace|pneumonia",
    "nodule": r"nodul|\bmass\b",
    "atelectasis": r"atelecta",
    "support_device": r"\btube\b|catheter|central line|pacemaker|device",
}
NEGATION = re.compile(r"\b(no|not|without|normal)\b", re.IGNORECASE)
LABEL_COLUMNS = list(FINDINGS)
EXPECTED_COLUMNS = ["image_path", "text", "findings", "impression", "split", "study_id", "patient_id",
                    "finding", "laterality", "severity", *FINDINGS]


def sentences(text: str) -> list[str]:
    """Split report text into sentences, dropping the section headings."""
    text = re.sub(r"\b(FINDINGS|IMPRESSION):", " ", text)
    return [s.strip() for s in re.split(r"(?<=\.)\s+", text) if s.strip()]


def mentions(sentence: str, finding: str) -> bool:
    return re.search(MENTIONS[finding], sentence, re.IGNORECASE) is not None


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    manifest = generate_phantom(tmp_path_factory.mktemp("phantom"), n_pairs=200, image_size=64, seed=3,
                                progress=False)
    return manifest, read_manifest(manifest)


# --- files and determinism --------------------------------------------------------------


def test_manifest_columns_in_order(dataset):
    _, frame = dataset
    assert list(frame.columns) == EXPECTED_COLUMNS


def test_image_paths_relative_and_present(dataset):
    manifest, frame = dataset
    assert frame["image_path"].str.fullmatch(r"images/s\d{6}\.png").all()
    assert all((manifest.parent / path).is_file() for path in frame["image_path"])
    assert len(list((manifest.parent / "images").glob("*.png"))) == 200


def test_images_have_requested_size(dataset):
    manifest, frame = dataset
    for path in frame["image_path"][:20]:
        with Image.open(manifest.parent / path) as image:
            assert image.mode == "L"
            assert image.size == (64, 64)
            assert image.format == "PNG"


def test_same_seed_identical_files(tmp_path):
    first = generate_phantom(tmp_path / "a", n_pairs=30, image_size=64, seed=5, progress=False).parent
    second = generate_phantom(tmp_path / "b", n_pairs=30, image_size=64, seed=5, progress=False).parent
    first_files, second_files = folder_bytes(first), folder_bytes(second)
    assert first_files.keys() == second_files.keys()
    assert first_files["manifest.csv"] == second_files["manifest.csv"]
    assert all(first_files[name] == second_files[name] for name in first_files)


def test_command_line_matches_library(tmp_path):
    library = generate_phantom(tmp_path / "library", n_pairs=12, image_size=48, seed=7, progress=False).parent
    command = [sys.executable, "-m", "msd_core.phantom", "--out", str(tmp_path / "cli"), "--n-pairs", "12",
               "--image-size", "48", "--seed", "7", "--no-progress"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert folder_bytes(tmp_path / "cli") == folder_bytes(library)


def test_different_seed_changes_images(tmp_path):
    first = generate_phantom(tmp_path / "a", n_pairs=10, image_size=64, seed=1, progress=False).parent
    second = generate_phantom(tmp_path / "b", n_pairs=10, image_size=64, seed=2, progress=False).parent
    changed = [(first / "images" / name).read_bytes() != (second / "images" / name).read_bytes()
               for name in sorted(p.name for p in (first / "images").iterdir())]
    assert all(changed)


def test_larger_dataset_keeps_first_studies(tmp_path):
    small = generate_phantom(tmp_path / "small", n_pairs=10, image_size=48, seed=4, progress=False).parent
    large = generate_phantom(tmp_path / "large", n_pairs=25, image_size=48, seed=4, progress=False).parent
    small_frame, large_frame = read_manifest(small / "manifest.csv"), read_manifest(large / "manifest.csv")
    columns = ["text", "study_id", "patient_id", "finding"]
    assert small_frame[columns].equals(large_frame[columns].head(10))
    assert (small / "images" / "s000009.png").read_bytes() == (large / "images" / "s000009.png").read_bytes()


# --- idempotence ------------------------------------------------------------------------


def test_second_call_fast_and_untouched(tmp_path):
    manifest = generate_phantom(tmp_path, n_pairs=40, image_size=64, seed=0, progress=False)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    time.sleep(0.01)

    start = time.perf_counter()
    again = generate_phantom(tmp_path, n_pairs=40, image_size=64, seed=0, progress=False)
    elapsed = time.perf_counter() - start

    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert again == manifest
    assert elapsed < 0.5
    assert after == before


def test_changed_parameter_raises(tmp_path):
    generate_phantom(tmp_path, n_pairs=20, image_size=64, seed=0, progress=False)
    with pytest.raises(FileExistsError, match=r"seed=0 \(requested: 1\).*overwrite=True"):
        generate_phantom(tmp_path, n_pairs=20, image_size=64, seed=1, progress=False)


def test_unrecorded_folder_raises(tmp_path):
    (tmp_path / "manifest.csv").write_text("image_path,text\n", encoding="utf-8")
    with pytest.raises(FileExistsError, match="phantom.json"):
        generate_phantom(tmp_path, n_pairs=5, image_size=48, progress=False)


def test_overwrite_removes_stale_images(tmp_path):
    generate_phantom(tmp_path, n_pairs=30, image_size=48, seed=0, progress=False)
    (tmp_path / "images" / "notes.txt").write_text("kept", encoding="utf-8")
    manifest = generate_phantom(tmp_path, n_pairs=20, image_size=48, seed=0, overwrite=True, progress=False)
    assert len(read_manifest(manifest)) == 20
    assert len(list((tmp_path / "images").glob("*.png"))) == 20
    assert (tmp_path / "images" / "notes.txt").is_file()


@pytest.mark.parametrize("arguments, name", [
    ({"n_pairs": 0}, "n_pairs"),
    ({"image_size": 16}, "image_size"),
    ({"seed": -1}, "seed"),
    ({"split_fractions": (0.5, 0.5, 0.5)}, "split_fractions"),
])
def test_invalid_parameter_names_itself(tmp_path, arguments, name):
    with pytest.raises(ValueError, match=name):
        generate_phantom(tmp_path, **{"n_pairs": 5, **arguments}, progress=False)


# --- splits and patients ----------------------------------------------------------------


def test_no_patient_in_two_splits(dataset):
    _, frame = dataset
    splits_per_patient = frame.groupby("patient_id")["split"].nunique()
    assert (splits_per_patient == 1).all()


def test_every_split_non_empty(dataset):
    _, frame = dataset
    counts = frame["split"].value_counts()
    for split in ("train", "val", "test"):
        assert counts.get(split, 0) > 0, f"split {split} is empty: {counts.to_dict()}"


def test_patients_have_one_to_three_studies(dataset):
    _, frame = dataset
    studies = frame.groupby("patient_id").size()
    assert studies.min() >= 1
    assert studies.max() <= 3
    assert (studies > 1).any()


# --- labels and reports -----------------------------------------------------------------


def test_finding_column_matches_labels(dataset):
    _, frame = dataset
    for _, row in frame.iterrows():
        assert row["finding"] in FINDINGS, row["study_id"]
        assert row[row["finding"]] == 1, row["study_id"]


def test_no_finding_excludes_other_labels(dataset):
    _, frame = dataset
    abnormal = frame[LABEL_COLUMNS[1:]].sum(axis=1)
    assert ((frame["no_finding"] == 1) == (abnormal == 0)).all()
    assert set(frame[LABEL_COLUMNS].stack().unique()) <= {0, 1}


def test_every_finding_is_drawn(dataset):
    _, frame = dataset
    assert set(frame["finding"]) == set(FINDINGS)


def test_descriptors_fit_finding(dataset):
    _, frame = dataset
    normal = frame[frame["finding"] == "no_finding"]
    assert set(frame["laterality"]) <= {"left", "right", "bilateral", "none"}
    assert set(frame["severity"]) <= {"mild", "moderate", "severe", "none"}
    assert (normal["laterality"] == "none").all()
    assert (normal["severity"] == "none").all()
    assert set(frame.loc[frame["finding"] == "pneumothorax", "laterality"]) <= {"left", "right"}


def test_report_states_present_findings(dataset):
    _, frame = dataset
    for _, row in frame.iterrows():
        present = [name for name in FINDINGS[1:] if row[name] == 1]
        for name in present:
            positive = [s for s in sentences(row["text"]) if mentions(s, name) and not NEGATION.search(s)]
            assert positive, f"{row['study_id']}: no positive sentence for {name}: {row['text']}"


def test_report_never_negates_present_findings(dataset):
    _, frame = dataset
    for _, row in frame.iterrows():
        present = [name for name in FINDINGS[1:] if row[name] == 1]
        for sentence in sentences(row["text"]):
            for name in present:
                if mentions(sentence, name):
                    assert not NEGATION.search(sentence), f"{row['study_id']}: present {name} negated in {sentence!r}"


def test_report_negates_absent_findings(dataset):
    _, frame = dataset
    for _, row in frame.iterrows():
        absent = [name for name in FINDINGS[1:] if row[name] == 0]
        for sentence in sentences(row["text"]):
            for name in absent:
                if mentions(sentence, name):
                    assert NEGATION.search(sentence), f"{row['study_id']}: absent {name} stated in {sentence!r}"


def test_report_names_laterality(dataset):
    _, frame = dataset
    sided = frame[frame["laterality"].isin(["left", "right"]) & (frame["finding"] != "support_device")]
    for _, row in sided.iterrows():
        # The lingula belongs to the left lung, so it names the side by itself.
        words = row["findings"].lower().replace("lingula", "left lingula")
        assert row["laterality"] in words, row["text"]


def test_text_joins_both_sections(dataset):
    _, frame = dataset
    joined = "FINDINGS: " + frame["findings"] + " IMPRESSION: " + frame["impression"]
    assert (frame["text"] == joined).all()
    assert (frame["findings"].str.len() > 0).all()
    assert (frame["impression"].str.len() > 0).all()


def test_normal_reports_recur_verbatim(dataset):
    _, frame = dataset
    normal_texts = frame.loc[frame["finding"] == "no_finding", "text"]
    assert normal_texts.duplicated().any()
    assert normal_texts.nunique() > 1


# --- drawing ----------------------------------------------------------------------------


def draw(findings: tuple[Finding, ...], size: int = 96) -> np.ndarray:
    """Draw one fixed patient with ``findings`` and a fixed random stream, as floats."""
    study = Study("s000000", 0, sample_patient(0, 0), findings)
    return draw_study(study, size, np.random.default_rng(0)).astype(float)


def test_left_effusion_brightens_image_right():
    change = draw((Finding("pleural_effusion", "left", "moderate"),)) - draw(())
    lower = change[48:]
    assert lower[:, 48:].mean() > 5.0
    assert abs(lower[:, :48].mean()) < 1.0


def test_right_pneumothorax_darkens_image_left():
    change = draw((Finding("pneumothorax", "right", "severe"),)) - draw(())
    upper = change[:60]
    assert (upper[:, :48] < -10).sum() > 40
    assert (upper[:, 48:] < -10).sum() == 0


def test_cardiomegaly_widens_heart_shadow():
    change = draw((Finding("cardiomegaly", severity="severe"),)) - draw(())
    assert change[50:80].mean() > 5.0
    assert abs(change[:30].mean()) < 1.0


def test_device_adds_bright_pixels():
    device = draw((Finding("support_device", "left", device="pacemaker"),))
    assert (device >= 250).sum() > (draw(()) >= 250).sum() + 20


# --- speed and command line -------------------------------------------------------------


def test_two_hundred_pairs_within_seconds(tmp_path):
    start = time.perf_counter()
    generate_phantom(tmp_path, n_pairs=200, image_size=128, seed=0, progress=False)
    assert time.perf_counter() - start < 8.0


def test_help_describes_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    output = capsys.readouterr().out
    assert exit_info.value.code == 0
    for option in ("--out", "--n-pairs", "--image-size", "--seed", "--overwrite"):
        assert option in output


def test_command_line_reports_conflict(tmp_path):
    assert main(["--out", str(tmp_path), "--n-pairs", "5", "--image-size", "48", "--no-progress"]) == 0
    assert main(["--out", str(tmp_path), "--n-pairs", "6", "--image-size", "48", "--no-progress"]) == 2


# --- prompts ----------------------------------------------------------------------------


def test_prompt_file_names_every_finding():
    prompts = yaml.safe_load(PROMPT_FILE.read_text(encoding="utf-8"))
    multiclass = prompts["tasks"]["finding"]
    multilabel = prompts["tasks"]["labels"]
    assert prompts["name"] == "phantomcxr"
    assert multiclass["type"] == "multiclass"
    assert multiclass["column"] == "finding"
    assert list(multiclass["classes"]) == list(FINDINGS)
    assert multilabel["type"] == "multilabel"
    assert list(multilabel["classes"]) == list(FINDINGS[1:])


def test_prompts_have_several_phrasings():
    prompts = yaml.safe_load(PROMPT_FILE.read_text(encoding="utf-8"))
    for name, phrasings in prompts["tasks"]["finding"]["classes"].items():
        assert len(phrasings) >= 3, name
        assert all(isinstance(p, str) and p.strip() for p in phrasings), name
    for name, lists in prompts["tasks"]["labels"]["classes"].items():
        assert len(lists["positive"]) >= 2, name
        assert len(lists["negative"]) >= 2, name
        assert not set(lists["positive"]) & set(lists["negative"]), name
