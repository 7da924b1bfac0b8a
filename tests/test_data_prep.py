"""Tests of the data_prep builders on small fake trees laid out like the published data."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from data_prep import __main__ as cli
from data_prep import common, covidx, download, folder_csv, iu_xray, mimic_cxr, rsna, siim
from data_prep.common import DataPrepError
from data_prep.download import ManualDownloadRequired
from msd_core.manifest import read_manifest

REPOSITORY = Path(__file__).resolve().parents[1]


def assert_one_split_per_patient(manifest: pd.DataFrame) -> None:
    splits = manifest.groupby("patient_id")["split"].nunique()
    assert (splits == 1).all(), f"patients in several splits: {list(splits[splits > 1].index)}"


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


# ---------------------------------------------------------------- IU X-ray

def iu_report(number: int, findings: str, impression: str, images: list, major: list) -> str:
    texts = (("COMPARISON", "None."), ("INDICATION", "Cough"), ("FINDINGS", findings), ("IMPRESSION", impression))
    sections = "".join(f'<AbstractText Label="{label}">{text}</AbstractText>' for label, text in texts)
    mesh = "".join(f"<major>{term}</major>" for term in major)
    parents = "".join(f'<parentImage id="{image}"><caption>x</caption></parentImage>' for image in images)
    return (
        f'<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="CXR{number}"/>'
        f"<MedlineCitation><Article><Abstract>{sections}</Abstract></Article></MedlineCitation>"
        f"<MeSH>{mesh}</MeSH>{parents}</eCitation>"
    )


def write_iu_tree(root: Path, reports: dict, images: list, views: dict) -> None:
    """Write NLMCXR_reports.tgz (``{number: xml}``), empty PNGs and a view-position table."""
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "NLMCXR_reports.tgz", "w:gz") as archive:
        for number, text in reports.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"ecgen-radiology/{number}.xml")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    for image in images:
        touch(root / "NLMCXR_png" / f"{image}.png")
    pd.DataFrame({"imageid": list(views), "View Position": list(views.values())}).to_csv(
        root / "nlmcxr_dicom_metadata.csv.gz", index=False
    )


@pytest.fixture
def iu_tree(tmp_path):
    root = tmp_path / "iu"
    reports = {
        1: iu_report(1, "Heart is normal.", "Normal chest.", ["CXR1_IM-0001-1001", "CXR1_IM-0001-2001"], ["normal"]),
        2: iu_report(2, "", "Small left pleural effusion.", ["CXR2_IM-0002-1001"], ["Pleural Effusion/left/small"]),
        3: iu_report(3, "  ", " ", ["CXR3_IM-0003-1001"], ["normal"]),
        4: iu_report(4, "Enlarged heart.", "", ["CXR4_IM-0004-1001", "CXR4_IM-0004-2001"], ["Cardiomegaly/mild"]),
        5: iu_report(5, "Clear lungs.", "No disease.", [], ["normal"]),
    }
    images = ["CXR1_IM-0001-1001", "CXR1_IM-0001-2001", "CXR2_IM-0002-1001", "CXR3_IM-0003-1001", "CXR4_IM-0004-1001"]
    views = {"CXR1_IM-0001-1001": "PA", "CXR1_IM-0001-2001": "LL", "CXR4_IM-0004-2001": "PA"}
    write_iu_tree(root, reports, images, views)
    return root


def test_iu_impression_only_keeps_impression(iu_tree, tmp_path):
    manifest = iu_xray.build_manifest(iu_tree, iu_tree / "manifest.csv")

    row = manifest.set_index("study_id").loc["CXR2"]
    assert row["text"] == "Small left pleural effusion."
    assert row["effusion"] == 1


def test_iu_findings_only_keeps_findings(iu_tree):
    manifest = iu_xray.build_manifest(iu_tree, iu_tree / "manifest.csv", missing_images="ignore")

    assert manifest.set_index("study_id").loc["CXR4", "text"] == "Enlarged heart."


def test_iu_empty_report_dropped_counted(iu_tree, caplog):
    with caplog.at_level(logging.INFO):
        manifest = iu_xray.build_manifest(iu_tree, iu_tree / "manifest.csv")

    assert "CXR3" not in set(manifest["study_id"])
    assert manifest.attrs["counts"]["empty_text"] == 1
    assert "NLMCXR_reports.tgz: dropped 1 row(s) with an empty report" in caplog.text


def test_iu_empty_report_error_names_report(iu_tree):
    with pytest.raises(DataPrepError) as error:
        iu_xray.build_manifest(iu_tree, iu_tree / "manifest.csv", on_empty="error")

    assert "study_id=CXR3" in str(error.value)
    assert "NLMCXR_reports.tgz" in str(error.value)


def test_iu_lateral_view_excluded(iu_tree):
    manifest = iu_xray.build_manifest(iu_tree, iu_tree / "manifest.csv")

    assert "NLMCXR_png/CXR1_IM-0001-2001.png" not in set(manifest["image_path"])
    assert "NLMCXR_png/CXR1_IM-0001-1001.png" in set(manifest["image_path"])


def test_iu_missing_image_skipped_counted(iu_tree):
    # CXR4's first image has no view and exists; with unknown views frontal, its
    # second image (PA in the metadata) has no file.
    manifest = iu_xray.build_manifest(
        iu_tree, iu_tree / "manifest.csv", unknown_view="frontal", frontal_per_study="all"
    )

    assert manifest.attrs["counts"]["missing_image"] == 1
    assert "NLMCXR_png/CXR4_IM-0004-2001.png" not in set(manifest["image_path"])


def test_iu_missing_image_error_names_report(iu_tree):
    with pytest.raises(DataPrepError) as error:
        iu_xray.build_manifest(
            iu_tree, iu_tree / "manifest.csv", unknown_view="frontal", frontal_per_study="all", missing_images="error"
        )

    assert "study_id=CXR4" in str(error.value)
    assert "CXR4_IM-0004-2001.png" in str(error.value)


def test_iu_study_without_images_counted(iu_tree):
    manifest = iu_xray.build_manifest(iu_tree, iu_tree / "manifest.csv")

    assert manifest.attrs["counts"]["no_image"] == 1
    assert "CXR5" not in set(manifest["study_id"])


def test_iu_unknown_view_first_listed(iu_tree):
    views = {"CXR9_IM-1-1001": "", "CXR9_IM-1-2001": ""}

    chosen = iu_xray.select_frontal(list(views), {}, "first", "all")

    assert chosen == [("CXR9_IM-1-1001", "")]


def test_iu_frontal_per_study_first():
    views = {"a": "PA", "b": "PA", "c": "AP"}

    assert iu_xray.select_frontal(["a", "b", "c"], views, "first", "first") == [("a", "PA")]
    assert len(iu_xray.select_frontal(["a", "b", "c"], views, "first", "all")) == 3


def test_iu_mesh_labels_match_heads():
    labels = iu_xray.mesh_labels(["Opacity/lung/upper lobe/right", "Pulmonary Atelectasis/base/left"])

    assert labels["opacity"] == 1
    assert labels["atelectasis"] == 1
    assert labels["normal"] == 0


def test_iu_manifest_readable_and_split(iu_tree):
    iu_xray.build_manifest(iu_tree, iu_tree / "manifest.csv")

    manifest = read_manifest(iu_tree / "manifest.csv")
    assert set(manifest["split"]) <= {"train", "val", "test"}
    assert_one_split_per_patient(manifest)
    assert (manifest["patient_id"] == manifest["study_id"]).all()


# ---------------------------------------------------------------- shared policies

def test_missing_column_names_file_and_columns(tmp_path):
    path = tmp_path / "labels.csv"
    pd.DataFrame({"patientId": ["a"], "x": [1]}).to_csv(path, index=False)

    with pytest.raises(DataPrepError) as error:
        common.read_table(path, required=("patientId", "Target"))

    message = str(error.value)
    assert str(path) in message
    assert "'Target'" in message
    assert "['patientId', 'x']" in message


def test_column_names_stripped(tmp_path):
    path = tmp_path / "rle.csv"
    path.write_text("ImageId, EncodedPixels\nimg1,-1\n")

    table = common.read_table(path, required=("ImageId", "EncodedPixels"))

    assert list(table.columns) == ["ImageId", "EncodedPixels"]


def test_join_sections_policies():
    assert common.join_sections("Clear lungs.", "Normal.") == "Clear lungs. Normal."
    assert common.join_sections("", "Normal.") == "Normal."
    assert common.join_sections("Clear lungs.", "  ") == "Clear lungs."
    assert common.join_sections(" ", None) == ""


def test_uncertain_policy_values():
    values = pd.DataFrame({"a": [1.0, 0.0, -1.0, None]})

    assert common.apply_uncertain_policy(values, "zeros")["a"].tolist() == [1, 0, 0, 0]
    assert common.apply_uncertain_policy(values, "ones")["a"].tolist() == [1, 0, 1, 0]
    assert common.apply_uncertain_policy(values, "ignore")["a"].tolist() == [1, 0, -1, 0]


def test_missing_table_raises_manual_download(tmp_path):
    with pytest.raises(ManualDownloadRequired) as error:
        rsna.build_manifest(tmp_path, tmp_path / "manifest.csv")

    assert "stage_2_train_labels.csv" in str(error.value)
    assert "kaggle" in str(error.value).lower()


# ---------------------------------------------------------------- MIMIC-CXR-JPG

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.
 The cardiomediastinal silhouette is normal.

 IMPRESSION:

 No acute cardiopulmonary process.
"""

MIMIC_IMPRESSION_ONLY = """                                 FINAL REPORT
 INDICATION:  Fever.

 IMPRESSION:  Right lower lobe pneumonia.
"""

MIMIC_NO_HEADERS = """                                 FINAL REPORT
 CHEST RADIOGRAPH PERFORMED ON ___

 COMPARISON:  Prior exam.

 Lungs are clear.
 No effusion.

 NOTIFICATION:  Discussed with the team.
"""


def write_mimic_tree(root: Path, studies: list) -> None:
    """Write the three tables, reports and empty JPGs for ``studies``.

    Each study is ``(subject, study, split, [(dicom_id, view), ...], report or None, {label: value})``.
    """
    split_rows, metadata_rows, label_rows = [], [], []
    for subject, study, split, images, report, labels in studies:
        folder = root / "files" / f"p{str(subject)[:2]}" / f"p{subject}"
        for dicom_id, view in images:
            split_rows.append({"dicom_id": dicom_id, "study_id": study, "subject_id": subject, "split": split})
            metadata_rows.append({"dicom_id": dicom_id, "subject_id": subject, "study_id": study, "ViewPosition": view})
            touch(folder / f"s{study}" / f"{dicom_id}.jpg")
        if report is not None:
            (folder / f"s{study}.txt").write_text(report)
        row = {"subject_id": subject, "study_id": study}
        row.update({name: labels.get(name) for name in mimic_cxr.CHEXPERT_LABELS})
        label_rows.append(row)
    pd.DataFrame(split_rows).to_csv(root / mimic_cxr.SPLIT_FILE, index=False)
    pd.DataFrame(metadata_rows).to_csv(root / mimic_cxr.METADATA_FILE, index=False)
    pd.DataFrame(label_rows).to_csv(root / mimic_cxr.LABELS_FILE, index=False)


@pytest.fixture
def mimic_tree(tmp_path):
    root = tmp_path / "mimic"
    studies = [
        (10000032, 50000001, "train", [("d1", "PA"), ("d2", "LATERAL")], MIMIC_REPORT, {"No Finding": 1.0}),
        (10000032, 50000002, "train", [("d3", "AP")], MIMIC_IMPRESSION_ONLY, {"Pneumonia": -1.0}),
        (10000040, 50000003, "validate", [("d4", "PA")], MIMIC_NO_HEADERS, {"Edema": 0.0}),
        (11000050, 50000004, "test", [("d5", "PA")], MIMIC_REPORT, {"Pleural Effusion": 1.0}),
        (11000060, 50000005, "test", [("d6", "AP")], "   \n  ", {}),
        (11000070, 50000006, "train", [("d7", "PA")], None, {}),
    ]
    write_mimic_tree(root, studies)
    return root


def test_mimic_frontal_views_only(mimic_tree):
    manifest = mimic_cxr.build_manifest(mimic_tree, mimic_tree / "manifest.csv")

    assert "d2" not in set(manifest["dicom_id"])
    assert set(manifest["view_position"]) <= {"PA", "AP"}


def test_mimic_official_split_kept(mimic_tree):
    manifest = mimic_cxr.build_manifest(mimic_tree, mimic_tree / "manifest.csv").set_index("dicom_id")

    assert manifest.loc["d1", "split"] == "train"
    assert manifest.loc["d4", "split"] == "val"
    assert manifest.loc["d5", "split"] == "test"
    assert_one_split_per_patient(manifest)


def test_mimic_test_study_in_train_raises(mimic_tree):
    split = pd.read_csv(mimic_tree / mimic_cxr.SPLIT_FILE)
    extra = {"dicom_id": "d9", "study_id": 50000004, "subject_id": 11000050, "split": "train"}
    pd.concat([split, pd.DataFrame([extra])]).to_csv(mimic_tree / mimic_cxr.SPLIT_FILE, index=False)

    with pytest.raises(DataPrepError) as error:
        mimic_cxr.build_manifest(mimic_tree, mimic_tree / "manifest.csv")

    assert "50000004" in str(error.value)


def test_mimic_sections_joined(mimic_tree):
    manifest = mimic_cxr.build_manifest(mimic_tree, mimic_tree / "manifest.csv").set_index("dicom_id")

    text = manifest.loc["d1", "text"]
    assert text.startswith("There is no focal consolidation")
    assert text.endswith("No acute cardiopulmonary process.")
    assert "INDICATION" not in text


def test_mimic_impression_only_kept(mimic_tree):
    manifest = mimic_cxr.build_manifest(mimic_tree, mimic_tree / "manifest.csv").set_index("dicom_id")

    assert manifest.loc["d3", "text"] == "Right lower lobe pneumonia."


def test_mimic_fallback_last_paragraph(mimic_tree):
    manifest = mimic_cxr.build_manifest(mimic_tree, mimic_tree / "manifest.csv")

    assert manifest.set_index("dicom_id").loc["d4", "text"] == "Lungs are clear. No effusion."
    assert manifest.attrs["counts"]["fallback_text"] == 1


def test_mimic_fallback_drop_counted(mimic_tree):
    manifest = mimic_cxr.build_manifest(mimic_tree, mimic_tree / "manifest.csv", fallback="drop")

    assert "d4" not in set(manifest["dicom_id"])
    assert manifest.attrs["counts"]["no_sections"] == 2


def test_mimic_empty_and_missing_reports_dropped(mimic_tree):
    manifest = mimic_cxr.build_manifest(mimic_tree, mimic_tree / "manifest.csv")

    assert "d6" not in set(manifest["dicom_id"])
    assert "d7" not in set(manifest["dicom_id"])
    assert manifest.attrs["counts"]["missing_report"] == 1
    assert manifest.attrs["counts"]["empty_text"] == 2


def test_mimic_uncertain_policy_applied(mimic_tree):
    zeros = mimic_cxr.build_manifest(mimic_tree, mimic_tree / "zeros.csv").set_index("dicom_id")
    ones = mimic_cxr.build_manifest(mimic_tree, mimic_tree / "ones.csv", uncertain="ones").set_index("dicom_id")

    assert zeros.loc["d3", "pneumonia"] == 0
    assert ones.loc["d3", "pneumonia"] == 1
    assert zeros.loc["d1", "no_finding"] == 1


def test_mimic_image_paths_published_layout(mimic_tree):
    manifest = mimic_cxr.build_manifest(mimic_tree, mimic_tree / "manifest.csv").set_index("dicom_id")

    assert manifest.loc["d1", "image_path"] == "files/p10/p10000032/s50000001/d1.jpg"


def test_mimic_inline_header_parsed():
    text, source = mimic_cxr.extract_text("FINDINGS: Clear lungs.\nIMPRESSION: Normal.\n")

    assert text == "Clear lungs. Normal."
    assert source == "sections"


# ---------------------------------------------------------------- COVIDx

def write_covidx_tree(root: Path, lists: dict) -> None:
    """Write ``<name>.txt`` list files and empty images for each ``{name: [(patient, file, label, source)]}``."""
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in lists.items():
        (root / f"{name}.txt").write_text("".join(" ".join(row) + "\n" for row in rows))
        for row in rows:
            touch(root / name / row[1])


THREE_CLASS_TRAIN = [
    (f"p{i}", f"img{i}.png", label, "cohen") for i, label in enumerate(["normal", "pneumonia", "COVID-19"] * 10)
]
THREE_CLASS_TEST = [("t1", "test1.png", "COVID-19", "ricord"), ("t2", "test2.png", "normal", "rsna")]


def test_covidx_three_class_columns(tmp_path):
    write_covidx_tree(tmp_path, {"train": THREE_CLASS_TRAIN, "test": THREE_CLASS_TEST})

    manifest = covidx.build_manifest(tmp_path, tmp_path / "manifest.csv").set_index("study_id")

    assert manifest.loc["test1.png", "covid_19"] == 1
    assert manifest.loc["test2.png", "normal"] == 1
    assert manifest.loc["img1.png", "pneumonia"] == 1
    assert manifest.loc["img1.png", "label"] == "pneumonia"


def test_covidx_binary_variant_logged(tmp_path, caplog):
    train = [(f"p{i}", f"img{i}.png", "positive" if i % 2 else "negative", "src") for i in range(20)]
    write_covidx_tree(tmp_path, {"train": train, "test": [("t1", "t1.png", "negative", "src")]})

    with caplog.at_level(logging.INFO):
        manifest = covidx.build_manifest(tmp_path, tmp_path / "manifest.csv")

    assert "binary labels" in caplog.text
    assert "normal" not in manifest.columns
    assert manifest.set_index("study_id").loc["img1.png", "covid_19"] == 1


def test_covidx_unknown_labels_name_file(tmp_path):
    write_covidx_tree(tmp_path, {"train": [("p1", "a.png", "tuberculosis", "src")], "test": THREE_CLASS_TEST})

    with pytest.raises(DataPrepError) as error:
        covidx.build_manifest(tmp_path, tmp_path / "manifest.csv")

    assert "train.txt" in str(error.value)
    assert "tuberculosis" in str(error.value)


def test_covidx_official_test_kept(tmp_path):
    write_covidx_tree(tmp_path, {"train": THREE_CLASS_TRAIN, "test": THREE_CLASS_TEST})

    manifest = covidx.build_manifest(tmp_path, tmp_path / "manifest.csv")

    test_rows = manifest[manifest["split"] == "test"]
    assert set(test_rows["study_id"]) == {"test1.png", "test2.png"}
    assert set(manifest.loc[manifest["split"] != "test", "split"]) == {"train", "val"}
    assert_one_split_per_patient(manifest)


def test_covidx_patient_in_test_dropped_from_train(tmp_path):
    train = THREE_CLASS_TRAIN + [("t1", "again.png", "COVID-19", "ricord")]
    write_covidx_tree(tmp_path, {"train": train, "test": THREE_CLASS_TEST})

    manifest = covidx.build_manifest(tmp_path, tmp_path / "manifest.csv")

    assert "again.png" not in set(manifest["study_id"])
    assert manifest.attrs["counts"]["patient_in_other_split"] == 1
    assert_one_split_per_patient(manifest)


def test_covidx_filename_with_spaces(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("42 scan 1 of 2.png COVID-19 cohen\n\n")

    table = covidx.read_list(path)

    assert table.loc[0, "filename"] == "scan 1 of 2.png"
    assert table.loc[0, "label"] == "COVID-19"


def test_covidx_short_line_names_line(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("42 a.png COVID-19 cohen\n43 b.png\n")

    with pytest.raises(DataPrepError) as error:
        covidx.read_list(path)

    assert "line 2" in str(error.value)


# ---------------------------------------------------------------- RSNA and SIIM on fake trees

def test_rsna_boxes_collapse_to_one_label(tmp_path):
    rows = "patientId,x,y,width,height,Target\na,1,2,3,4,1\na,5,6,7,8,1\nb,,,,,0\n"
    (tmp_path / "stage_2_train_labels.csv").write_text(rows)
    touch(tmp_path / "stage_2_train_images" / "a.dcm")
    touch(tmp_path / "stage_2_train_images" / "b.dcm")

    manifest = rsna.build_manifest(tmp_path, tmp_path / "manifest.csv").set_index("study_id")

    assert manifest.loc["a", "pneumonia"] == 1
    assert manifest.loc["a", "boxes"] == 2
    assert manifest.loc["b", "pneumonia"] == 0
    assert manifest.loc["a", "image_path"] == "stage_2_train_images/a.dcm"


def test_siim_finds_nested_dicoms(tmp_path):
    (tmp_path / "train-rle.csv").write_text("ImageId, EncodedPixels\nimg1, -1\nimg2, 5 3 10 2\nimg2, 40 2\n")
    touch(tmp_path / "dicom-images-train" / "study1" / "series1" / "img1.dcm")
    touch(tmp_path / "dicom-images-train" / "study2" / "series9" / "img2.dcm")

    manifest = siim.build_manifest(tmp_path, tmp_path / "manifest.csv").set_index("study_id")

    assert manifest.loc["img1", "pneumothorax"] == 0
    assert manifest.loc["img2", "pneumothorax"] == 1
    assert manifest.loc["img2", "regions"] == 2
    assert manifest.loc["img2", "image_path"] == "dicom-images-train/study2/series9/img2.dcm"


# ---------------------------------------------------------------- folder_csv on a fake tree

@pytest.fixture
def notes_tree(tmp_path):
    root = tmp_path / "notes"
    for name in ("a.png", "b.png", "c.png", "d.png", "sub/e.png"):
        touch(root / "pictures" / name)
    pd.DataFrame(
        {
            "file": ["pictures/a.png", "pictures/b.png", "pictures/c.png", "pictures/d.png", "pictures/sub/e.png"],
            "patient": ["1", "1", "2", "3", "4"],
            "history": ["Cough.", "Fever.", "", "Pain.", "Dyspnoea."],
            "note": ["Left effusion.", "", "   ", "Clear.", "Opacity."],
            "diagnosis": ["Effusion", "Effusion, Pneumonia", "Pneumonia", "Normal", "Pneumonia"],
        }
    ).to_csv(root / "table.csv", index=False)
    return root


def build_notes(root: Path, out: Path, **options):
    options.setdefault("image_column", "file")
    options.setdefault("text_columns", ["history", "note"])
    options.setdefault("patient_column", "patient")
    options.setdefault("multilabel_column", "diagnosis")
    return folder_csv.build_manifest(root, out, **options)


def test_folder_text_columns_joined(notes_tree, tmp_path):
    manifest = build_notes(notes_tree, tmp_path / "out" / "manifest.csv")

    texts = dict(zip(manifest["patient_id"] + manifest["image_path"].str[-5:], manifest["text"]))
    assert texts["1a.png"] == "Cough. Left effusion."
    assert texts["1b.png"] == "Fever."


def test_folder_empty_text_dropped_counted(notes_tree, tmp_path):
    manifest = build_notes(notes_tree, tmp_path / "out" / "manifest.csv")

    assert "2" not in set(manifest["patient_id"])
    assert manifest.attrs["counts"]["empty_text"] == 1


def test_folder_empty_text_error_names_row(notes_tree, tmp_path):
    with pytest.raises(DataPrepError) as error:
        build_notes(notes_tree, tmp_path / "out" / "manifest.csv", on_empty="error")

    assert "pictures/c.png" in str(error.value)
    assert "table.csv" in str(error.value)


def test_folder_multilabel_one_hot(notes_tree, tmp_path):
    manifest = build_notes(notes_tree, tmp_path / "out" / "manifest.csv").set_index("image_path")

    row = manifest.loc["images/b.png"]
    assert row["diagnosis"] == "Effusion, Pneumonia"
    assert row["effusion"] == 1
    assert row["pneumonia"] == 1
    assert row["normal"] == 0


def test_folder_symlinks_next_to_manifest(notes_tree, tmp_path):
    out = tmp_path / "out" / "manifest.csv"
    manifest = build_notes(notes_tree, out)

    link = out.parent / "images" / "sub" / "e.png"
    assert "images/sub/e.png" in set(manifest["image_path"])
    assert link.is_symlink()
    assert link.resolve() == (notes_tree / "pictures" / "sub" / "e.png").resolve()
    assert not any(p.startswith("../") for p in manifest["image_path"])


def test_folder_copy_mode_copies(notes_tree, tmp_path):
    out = tmp_path / "out" / "manifest.csv"
    build_notes(notes_tree, out, images="copy")

    copied = out.parent / "images" / "a.png"
    assert copied.is_file()
    assert not copied.is_symlink()


def test_folder_relative_mode_leaves_folder(notes_tree, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        manifest = build_notes(notes_tree, tmp_path / "out" / "manifest.csv", images="relative")

    assert all(p.startswith("../notes/pictures/") for p in manifest["image_path"])
    assert "outside" in caplog.text


def test_folder_manifest_inside_source(notes_tree):
    manifest = build_notes(notes_tree, notes_tree / "manifest.csv")

    assert "pictures/a.png" in set(manifest["image_path"])
    assert not (notes_tree / "images").exists()


def test_folder_missing_column_names_csv(notes_tree, tmp_path):
    with pytest.raises(DataPrepError) as error:
        build_notes(notes_tree, tmp_path / "out" / "manifest.csv", text_columns=["report"])

    assert "table.csv" in str(error.value)
    assert "'report'" in str(error.value)
    assert "'history'" in str(error.value)


def test_folder_patients_one_split(notes_tree, tmp_path):
    manifest = build_notes(notes_tree, tmp_path / "out" / "manifest.csv", fractions=(0.5, 0.25, 0.25))

    assert_one_split_per_patient(manifest)


def test_folder_missing_image_skipped(notes_tree, tmp_path):
    os.remove(notes_tree / "pictures" / "d.png")

    manifest = build_notes(notes_tree, tmp_path / "out" / "manifest.csv")

    assert "3" not in set(manifest["patient_id"])
    assert manifest.attrs["counts"]["missing_image"] == 1


# ---------------------------------------------------------------- command line

@pytest.mark.parametrize(
    "dataset, needed",
    [
        ("iu_xray", "NLMCXR_reports.tgz"),
        ("mimic_cxr", "mimic-cxr-2.0.0-split.csv.gz"),
        ("chexpert_5x200", "CheXpert-v1.0-small/train.csv"),
        ("rsna", "stage_2_train_labels.csv"),
        ("siim", "train-rle.csv"),
        ("covidx", "train.txt"),
        ("folder_csv", "--text-column"),
    ],
)
def test_cli_help_names_files(dataset, needed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([dataset, "--help"])

    output = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert needed in output
    assert "http" in output or dataset == "folder_csv"


def test_cli_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "data_prep", "--help"], cwd=REPOSITORY, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0
    assert "chexpert_5x200" in result.stdout


def test_cli_builds_folder_manifest(notes_tree, tmp_path):
    out = tmp_path / "cli" / "manifest.csv"
    arguments = ["folder_csv", "--root", str(notes_tree), "--out", str(out), "--image-column", "file"]
    arguments += ["--text-column", "history", "--text-column", "note", "--patient-column", "patient"]

    status = cli.main(arguments)

    assert status == 0
    assert len(read_manifest(out)) == 4


def test_cli_missing_files_exit_status(tmp_path, caplog):
    status = cli.main(["siim", "--root", str(tmp_path), "--out", str(tmp_path / "manifest.csv")])

    assert status == 1
    assert "train-rle.csv" in caplog.text


def test_no_images_found_raises(tmp_path):
    (tmp_path / "stage_2_train_labels.csv").write_text("patientId,x,y,width,height,Target\na,,,,,0\n")

    with pytest.raises(DataPrepError) as error:
        rsna.build_manifest(tmp_path, tmp_path / "manifest.csv")

    assert "none of the 1 image files" in str(error.value)
    assert "stage_2_train_images/a.dcm" in str(error.value)


def test_iu_download_extracts_images(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "iu_xray"
    write_iu_tree(cache, {1: iu_report(1, "Clear.", "Normal.", ["CXR1_IM-0001-1001"], ["normal"])}, [], {})
    with tarfile.open(cache / "NLMCXR_png.tgz", "w:gz") as archive:
        data = b"png bytes"
        info = tarfile.TarInfo("CXR1_IM-0001-1001.png")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(download, "fetch", lambda url, filename, sha256=None, *, dataset: cache / filename)

    folder = iu_xray.download()

    assert folder == cache
    assert (cache / "NLMCXR_png" / "CXR1_IM-0001-1001.png").read_bytes() == b"png bytes"
