"""MIMIC-CXR-JPG (with the MIMIC-CXR reports) to a manifest.

Files needed (credentialed PhysioNet access, PhysioNet Credentialed Health Data
License 1.5.0), all under ``--root``:

- ``mimic-cxr-2.0.0-split.csv.gz``: the official split per image
  (``dicom_id, study_id, subject_id, split`` with train/validate/test).
- ``mimic-cxr-2.0.0-metadata.csv.gz``: ``ViewPosition`` per image.
- ``mimic-cxr-2.0.0-chexpert.csv.gz``: 14 CheXpert labels per study.
- ``files/pXX/p<subject>/s<study>/<dicom_id>.jpg``: the JPG images.
- ``files/pXX/p<subject>/s<study>.txt``: the free-text reports, from
  ``mimic-cxr-reports.zip`` of MIMIC-CXR (not -JPG); ``--reports-root`` if they lie
  elsewhere.

Get them from https://physionet.org/content/mimic-cxr-jpg/2.0.0/ and
https://physionet.org/content/mimic-cxr/2.0.0/ ; ``ManualDownloadRequired`` gives the
steps.

Policies:

- Views: frontal images only (``ViewPosition`` PA or AP); ``views`` changes the set.
- Text: FINDINGS followed by IMPRESSION, found by their headers (also FINDING,
  IMPRESSIONS, CONCLUSION, CONCLUSIONS), case-insensitively. A report with only one
  of them keeps that one. With neither header, ``fallback="last_paragraph"`` (the
  default) uses the last paragraph of the report that does not belong to an
  administrative section (EXAMINATION, INDICATION, HISTORY, TECHNIQUE, COMPARISON,
  NOTIFICATION, RECOMMENDATION and similar). Such a header owns only the paragraph
  it starts, so unlabelled text after a blank line counts as report body.
  ``fallback="drop"`` drops the report.
  Both are counted (``fallback_text``, ``no_sections``). Reports that end up empty,
  or are missing (``missing_report``), are dropped and counted (``empty_text``).
- Split: the official split, with ``validate`` renamed ``val``. The official split is
  by subject; the build fails if a study or a patient appears in two splits, so an
  official test study never reaches train.
- Labels: the 14 CheXpert columns, snake_case. Blank becomes 0, -1 (uncertain)
  follows ``uncertain``: ``"zeros"`` (default) or ``"ones"``, or ``"ignore"`` to keep
  -1 for the evaluation to skip. Studies missing from the label table get blank
  labels.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional, Sequence, Tuple

import pandas as pd
from tqdm.auto import tqdm

from data_prep import common

logger = logging.getLogger(__name__)

DATASET = "mimic_cxr"
SPLIT_FILE = "mimic-cxr-2.0.0-split.csv.gz"
METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv.gz"
LABELS_FILE = "mimic-cxr-2.0.0-chexpert.csv.gz"
OFFICIAL_SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}
FALLBACKS = ("last_paragraph", "drop")

CHEXPERT_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)

FINDINGS_HEADERS = ("FINDINGS", "FINDING")
IMPRESSION_HEADERS = ("IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS")
ADMINISTRATIVE_HEADERS = (
    "EXAMINATION",
    "EXAM",
    "INDICATION",
    "INDICATIONS",
    "HISTORY",
    "CLINICAL HISTORY",
    "CLINICAL INFORMATION",
    "REASON FOR EXAMINATION",
    "REASON FOR EXAM",
    "TECHNIQUE",
    "COMPARISON",
    "COMPARISONS",
    "NOTIFICATION",
    "RECOMMENDATION",
    "RECOMMENDATIONS",
    "RECOMMENDATION(S)",
    "WET READ",
    "PROCEDURE",
    "TYPE OF EXAMINATION",
)

# A header is upper-case words at the start of a line, followed by a colon.
_HEADER = re.compile(r"^\s*([A-Z][A-Z ()/&,-]*[A-Z)])\s*:(.*)$")


def split_sections(report: str) -> list:
    """Split a report into ``(header, text)`` pairs in order of appearance.

    Text before the first header gets the header ``""``. The ``FINAL REPORT`` line is
    skipped. Each section's text keeps its blank-line paragraph breaks.
    """
    sections = [["", []]]
    for line in report.splitlines():
        if line.strip().upper() == "FINAL REPORT":
            continue
        match = _HEADER.match(line)
        if match:
            sections.append([match.group(1).strip().upper(), [match.group(2)]])
        else:
            sections[-1][1].append(line)
    return [(header, "\n".join(lines).strip()) for header, lines in sections if header or "\n".join(lines).strip()]


def extract_text(report: str, fallback: str = "last_paragraph") -> Tuple[str, str]:
    """Return the manifest text of one report and how it was found.

    Returns:
        ``(text, source)`` where ``source`` is ``"sections"`` (FINDINGS and/or
        IMPRESSION), ``"fallback"`` (the last non-administrative paragraph) or
        ``"none"`` (nothing usable, ``text == ""``).
    """
    common.check_choice("fallback", fallback, FALLBACKS)
    sections = split_sections(report)
    findings = " ".join(text for header, text in sections if header in FINDINGS_HEADERS)
    impression = " ".join(text for header, text in sections if header in IMPRESSION_HEADERS)
    text = common.join_sections(findings, impression)
    if text:
        return text, "sections"
    if fallback == "drop":
        return "", "none"

    paragraphs = []
    for header, body in sections:
        blocks = [p for p in re.split(r"\n\s*\n", body) if p.strip()]
        # An administrative header owns its first paragraph only; unlabelled text that
        # follows after a blank line is part of the report body.
        paragraphs.extend(blocks[1:] if header in ADMINISTRATIVE_HEADERS else blocks)
    if not paragraphs:
        return "", "none"
    return common.normalise_whitespace(paragraphs[-1]), "fallback"


def build_manifest(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    reports_root: Optional[str | os.PathLike] = None,
    views: Sequence[str] = ("PA", "AP"),
    uncertain: str = "zeros",
    fallback: str = "last_paragraph",
    on_empty: str = "drop",
    missing_images: str = "skip",
) -> pd.DataFrame:
    """Build the MIMIC-CXR-JPG manifest and write it to ``out``.

    Args:
        root: the MIMIC-CXR-JPG folder (the three tables and ``files/``).
        out: path of the manifest CSV. Image paths are relative to its folder.
        reports_root: folder whose ``files/`` contains the ``s<study>.txt`` reports, if not
            ``root`` (``root/mimic-cxr-reports`` is also tried).
        views: ``ViewPosition`` values to keep.
        uncertain: ``"zeros"``, ``"ones"`` or ``"ignore"`` for -1 labels (module docstring).
        fallback: ``"last_paragraph"`` or ``"drop"`` for reports without the two headers.
        on_empty: ``"drop"`` or ``"error"`` for reports with no usable text.
        missing_images: ``"skip"``, ``"error"`` or ``"ignore"``.

    Returns:
        The manifest, one row per kept image, with 14 label columns and a
        ``view_position`` column; ``attrs["counts"]`` contains the drop counts.
    """
    common.check_choice("fallback", fallback, FALLBACKS)
    root = Path(root)
    reports_root = _reports_root(root, reports_root)
    images = _read_tables(root, views)

    studies = images[["subject_id", "study_id"]].drop_duplicates().reset_index(drop=True)
    studies["text"], studies["text_source"] = _read_reports(studies, reports_root, fallback)
    studies.attrs["counts"] = {
        "fallback_text": int((studies["text_source"] == "fallback").sum()),
        "no_sections": int((studies["text_source"] == "none").sum()),
        "missing_report": int((studies["text_source"] == "missing").sum()),
    }
    studies = common.drop_empty_text(studies, on_empty=on_empty, source=str(reports_root), id_column="study_id")

    frame = images.merge(studies[["study_id", "text"]], on="study_id", how="inner")
    frame = frame.merge(_read_labels(root, uncertain), on="study_id", how="left", indicator=True)
    frame.attrs = dict(studies.attrs)
    unlabelled = int((frame.pop("_merge") == "left_only").sum())
    if unlabelled:
        logger.warning(
            "mimic_cxr: %d image(s) belong to studies missing from %s; their labels are blank", unlabelled, LABELS_FILE
        )
    frame["source_path"] = [
        str(root / "files" / f"p{str(s)[:2]}" / f"p{s}" / f"s{t}" / f"{d}.jpg")
        for s, t, d in zip(frame["subject_id"], frame["study_id"], frame["dicom_id"])
    ]
    frame = common.check_images(frame, missing_images=missing_images, source=str(root), id_column="dicom_id")
    frame["patient_id"] = frame["subject_id"]

    label_columns = [common.label_column_name(n) for n in CHEXPERT_LABELS]
    return common.finish_manifest(
        frame, out, source="mimic_cxr", label_columns=label_columns, extra_columns=("dicom_id", "view_position")
    )


def _reports_root(root: Path, reports_root: Optional[str | os.PathLike]) -> Path:
    if reports_root:
        return Path(reports_root)
    nested = root / "mimic-cxr-reports"
    return nested if (nested / "files").is_dir() else root


def _read_tables(root: Path, views: Sequence[str]) -> pd.DataFrame:
    """Join the split and metadata tables and keep the requested views."""
    split_path = common.find_file(root, (SPLIT_FILE,), "MIMIC-CXR-JPG split table", DATASET)
    metadata_path = common.find_file(root, (METADATA_FILE,), "MIMIC-CXR-JPG metadata table", DATASET)
    split = common.read_table(split_path, required=("dicom_id", "study_id", "subject_id", "split"))
    metadata = common.read_table(metadata_path, required=("dicom_id", "ViewPosition"))

    unknown = sorted(set(split["split"]) - set(OFFICIAL_SPLITS))
    if unknown:
        raise common.DataPrepError(f"{split_path}: unknown split values {unknown}; expected train, validate, test")
    split["split"] = split["split"].map(OFFICIAL_SPLITS)
    _check_official_split(split, split_path)

    images = split.merge(metadata[["dicom_id", "ViewPosition"]], on="dicom_id", how="left")
    images = images.rename(columns={"ViewPosition": "view_position"})
    images["view_position"] = images["view_position"].fillna("").astype(str)
    kept = images[images["view_position"].isin(list(views))].reset_index(drop=True)
    logger.info("mimic_cxr: kept %d of %d images with view in %s", len(kept), len(images), list(views))
    return kept


def _check_official_split(split: pd.DataFrame, source: Path) -> None:
    for column in ("study_id", "subject_id"):
        per_id = split.groupby(column)["split"].nunique()
        leaking = per_id[per_id > 1]
        if len(leaking):
            raise common.DataPrepError(
                f"{source}: {column}={leaking.index[0]} appears in more than one split "
                f"({len(leaking)} such ids); the official split table should never do this, so check the file"
            )


def _read_reports(studies: pd.DataFrame, reports_root: Path, fallback: str) -> Tuple[list, list]:
    texts, sources = [], []
    missing = 0
    pairs = zip(studies["subject_id"], studies["study_id"])
    for subject, study in tqdm(pairs, total=len(studies), desc="MIMIC-CXR reports", unit="report"):
        path = reports_root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}.txt"
        if not path.is_file():
            missing += 1
            texts.append("")
            sources.append("missing")
            continue
        text, source = extract_text(path.read_text(encoding="utf-8", errors="replace"), fallback)
        texts.append(text)
        sources.append(source)
    if missing:
        logger.warning(
            "mimic_cxr: %d report file(s) not found under %s/files; those studies count as empty", missing, reports_root
        )
    return texts, sources


def _read_labels(root: Path, uncertain: str) -> pd.DataFrame:
    path = common.find_file(root, (LABELS_FILE,), "MIMIC-CXR-JPG CheXpert label table", DATASET)
    table = common.read_table(path, required=("study_id", *CHEXPERT_LABELS))
    labels = common.apply_uncertain_policy(table[list(CHEXPERT_LABELS)], uncertain).astype("Int64")
    labels.columns = [common.label_column_name(n) for n in CHEXPERT_LABELS]
    labels.insert(0, "study_id", table["study_id"])
    return labels
