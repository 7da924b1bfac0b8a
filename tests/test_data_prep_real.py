"""Tests of the data_prep builders on the real report archive and label tables.

They read the files in place from the real-data folder beside the repository and
skip when it is absent. Derived files go only under pytest's temporary folders.
"""

from __future__ import annotations

import zipfile

import pandas as pd
import pytest

from conftest import requires_shared_data
from data_prep import chexpert, folder_csv, iu_xray, rsna, siim
from msd_core.manifest import read_manifest

pytestmark = pytest.mark.real_data

FIVE = ["atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion"]


def assert_one_split_per_patient(manifest: pd.DataFrame) -> None:
    splits = manifest.groupby("patient_id")["split"].nunique()
    assert (splits == 1).all(), f"patients in several splits: {list(splits[splits > 1].index)[:5]}"


# ---------------------------------------------------------------- CheXpert 5x200

@pytest.fixture(scope="module")
def chexpert_table():
    return chexpert.read_labels(requires_shared_data("label-tables", "chexpert_train.csv.gz"))


@pytest.fixture(scope="module")
def chexpert_manifest(chexpert_table, tmp_path_factory):
    out = tmp_path_factory.mktemp("chexpert") / "manifest.csv"
    return chexpert.build_manifest(out.parent, out, labels=chexpert_table, missing_images="ignore"), out


def test_chexpert_thousand_rows(chexpert_manifest):
    manifest, _ = chexpert_manifest

    assert len(manifest) == 1000
    assert manifest["label"].value_counts().to_dict() == {name: 200 for name in chexpert.CLASSES}


def test_chexpert_one_positive_per_row(chexpert_manifest, chexpert_table):
    manifest, _ = chexpert_manifest

    assert (manifest[FIVE].sum(axis=1) == 1).all()
    source = chexpert_table.set_index("Path").loc[manifest["Path"]]
    positives = (source[list(chexpert.CLASSES)] == 1).sum(axis=1)
    assert (positives.to_numpy() == 1).all()
    assert (source["Frontal/Lateral"] == "Frontal").all()


def test_chexpert_same_seed_same_rows(chexpert_table, chexpert_manifest):
    manifest, _ = chexpert_manifest

    again = chexpert.select_5x200(chexpert_table, seed=0)
    other = chexpert.select_5x200(chexpert_table, seed=1)

    assert again["Path"].tolist() == manifest["Path"].tolist()
    assert other["Path"].tolist() != manifest["Path"].tolist()


def test_chexpert_ignore_excludes_uncertain(chexpert_table):
    chosen = chexpert.select_5x200(chexpert_table, uncertain="ignore")

    source = chexpert_table.set_index("Path").loc[chosen["Path"]]
    assert not (source[list(chexpert.CLASSES)] == -1).any().any()


def test_chexpert_patients_one_split(chexpert_manifest):
    manifest, _ = chexpert_manifest

    assert_one_split_per_patient(manifest)
    assert manifest["patient_id"].str.fullmatch(r"patient\d{5}").all()


def test_chexpert_split_file_reproduces(chexpert_manifest, tmp_path):
    manifest, out = chexpert_manifest
    split_file = out.parent / "chexpert_5x200_split.csv"

    rebuilt = chexpert.build_manifest(
        out.parent, tmp_path / "manifest.csv", selection=split_file, missing_images="ignore"
    )

    assert list(pd.read_csv(split_file).columns) == ["Path", "class", "split"]
    assert rebuilt["Path"].tolist() == manifest["Path"].tolist()
    assert rebuilt["split"].tolist() == manifest["split"].tolist()


# ---------------------------------------------------------------- IU X-ray

@pytest.fixture(scope="module")
def iu_reports():
    return iu_xray.parse_reports(requires_shared_data("iu-xray", "NLMCXR_reports.tgz"))


@pytest.fixture(scope="module")
def iu_manifest(iu_reports, tmp_path_factory):
    folder = requires_shared_data("iu-xray")
    root = tmp_path_factory.mktemp("iu")
    images = root / "NLMCXR_png"
    images.mkdir()
    for image_id in iu_reports["image_ids"].explode().dropna():
        (images / f"{image_id}.png").write_bytes(b"")
    return iu_xray.build_manifest(
        root,
        root / "manifest.csv",
        reports=folder / "NLMCXR_reports.tgz",
        metadata=folder / "nlmcxr_dicom_metadata.csv.gz",
    )


def test_iu_all_reports_parsed(iu_reports):
    assert len(iu_reports) == 3955
    assert iu_reports["study_id"].is_unique


def test_iu_section_counts(iu_reports):
    has_findings = iu_reports["findings"] != ""
    has_impression = iu_reports["impression"] != ""

    assert int((has_findings & has_impression).sum()) == 3419
    assert int((~has_findings & has_impression).sum()) == 502
    assert int((has_findings & ~has_impression).sum()) == 6
    assert int((~has_findings & ~has_impression).sum()) == 28


def test_iu_first_report_sections(iu_reports):
    first = iu_reports.set_index("study_id").loc["CXR1"]

    assert first["comparison"] == "None."
    assert first["indication"] == "Positive TB test"
    assert first["findings"].startswith("The cardiac silhouette and mediastinum size are within normal limits.")
    assert first["impression"] == "Normal chest x-XXXX."
    assert first["mesh_major"] == ["normal"]
    assert first["image_ids"] == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]


def test_iu_image_count(iu_reports):
    counts = iu_reports["image_ids"].map(len)

    assert int(counts.sum()) == 7470
    assert int((counts == 0).sum()) == 104


def test_iu_mesh_labels_from_report(iu_reports):
    report = iu_reports.set_index("study_id").loc["CXR1000"]

    labels = iu_xray.mesh_labels(report["mesh_major"])

    assert labels["opacity"] == 1
    assert labels["atelectasis"] == 1
    assert labels["normal"] == 0
    assert labels["cardiomegaly"] == 0


def test_iu_manifest_counts(iu_manifest):
    counts = iu_manifest.attrs["counts"]

    assert counts["reports"] == 3955
    assert counts["empty_text"] == 28
    assert counts["no_image"] == 101
    assert counts["no_frontal_image"] == 39
    assert len(iu_manifest) == 3955 - 28 - 101 - 39


def test_iu_manifest_labels(iu_manifest):
    labels = iu_manifest.set_index("study_id")

    assert int(iu_manifest["normal"].sum()) > 1200
    assert labels.loc["CXR1", "normal"] == 1
    assert labels.loc["CXR1000", "opacity"] == 1
    assert set(iu_manifest[list(iu_xray.LABEL_TERMS)].stack().unique()) <= {0, 1}


def test_iu_manifest_split_by_patient(iu_manifest):
    assert_one_split_per_patient(iu_manifest)
    assert set(iu_manifest["split"]) == {"train", "val", "test"}
    assert iu_manifest["study_id"].is_unique


def test_iu_manifest_image_paths(iu_manifest):
    assert (iu_manifest["image_path"].str.startswith("NLMCXR_png/CXR")).all()
    assert (iu_manifest["text"].str.strip() != "").all()


# ---------------------------------------------------------------- RSNA and SIIM

def test_rsna_real_table(tmp_path):
    labels = requires_shared_data("label-tables", "kaggle_stage_2_train_labels.csv.zip")
    with zipfile.ZipFile(labels) as archive:
        raw = pd.read_csv(archive.open("stage_2_train_labels.csv"))

    manifest = rsna.build_manifest(tmp_path, tmp_path / "manifest.csv", labels=labels, missing_images="ignore")

    assert len(raw) == 30227
    assert len(manifest) == raw["patientId"].nunique()
    assert int(manifest["pneumonia"].sum()) == raw.loc[raw["Target"] == 1, "patientId"].nunique()
    assert int(manifest["boxes"].sum()) == int((raw["Target"] == 1).sum())
    assert_one_split_per_patient(manifest)


def test_rsna_split_fractions(tmp_path):
    labels = requires_shared_data("label-tables", "kaggle_stage_2_train_labels.csv.zip")

    manifest = rsna.build_manifest(tmp_path, tmp_path / "manifest.csv", labels=labels, missing_images="ignore")

    shares = manifest["split"].value_counts(normalize=True)
    assert abs(shares["train"] - 0.70) < 0.01
    assert abs(shares["val"] - 0.15) < 0.01
    assert abs(shares["test"] - 0.15) < 0.01


def test_siim_real_table(tmp_path):
    labels = requires_shared_data("label-tables", "siim-pneumothorax-train-rle.csv.gz")
    raw = pd.read_csv(labels)
    positive_ids = raw.loc[raw[" EncodedPixels"].str.strip() != "-1", "ImageId"]

    manifest = siim.build_manifest(tmp_path, tmp_path / "manifest.csv", labels=labels, missing_images="ignore")

    assert len(manifest) == raw["ImageId"].nunique()
    assert int(manifest["pneumothorax"].sum()) == positive_ids.nunique()
    assert int(manifest["regions"].sum()) == len(positive_ids)
    assert_one_split_per_patient(manifest)


# ---------------------------------------------------------------- folder_csv on cxr-notes-44

@pytest.fixture(scope="module")
def notes_manifest(tmp_path_factory):
    root = requires_shared_data("cxr-notes-44")
    out = tmp_path_factory.mktemp("notes") / "manifest.csv"
    manifest = folder_csv.build_manifest(
        root,
        out,
        text_columns=["clinical_notes"],
        patient_column="patient_id",
        multilabel_column="finding",
        keep_columns=["license", "source_url"],
    )
    return manifest, out, root


def test_notes_every_row_kept(notes_manifest):
    manifest, _, _ = notes_manifest

    assert len(manifest) == 44
    assert manifest["patient_id"].nunique() == 37


def test_notes_finding_kept_and_split(notes_manifest):
    manifest, _, root = notes_manifest
    source = pd.read_csv(root / "metadata.csv")

    assert manifest["finding"].tolist() == source["finding"].tolist()
    both = manifest[manifest["finding"] == "COVID-19, ARDS"]
    assert len(both) == 6
    assert (both["covid_19"] == 1).all()
    assert (both["ards"] == 1).all()
    assert int(manifest["covid_19"].sum()) == 20


def test_notes_text_from_clinical_notes(notes_manifest):
    manifest, _, root = notes_manifest
    source = pd.read_csv(root / "metadata.csv")

    assert manifest["text"].iloc[0] == source["clinical_notes"].iloc[0]


def test_notes_images_next_to_manifest(notes_manifest):
    manifest, out, root = notes_manifest

    assert not any(p.startswith("../") for p in manifest["image_path"])
    first = out.parent / manifest["image_path"].iloc[0]
    assert first.resolve() == (root / "images" / first.name).resolve()


def test_notes_patients_one_split(notes_manifest):
    manifest, out, _ = notes_manifest

    assert_one_split_per_patient(manifest)
    assert len(read_manifest(out)) == 44
