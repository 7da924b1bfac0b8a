"""RSNA Pneumonia Detection Challenge to a manifest.

Files needed (Kaggle competition rules), under ``--root``:

- ``stage_2_train_labels.csv``: ``patientId, x, y, width, height, Target``, one row
  per box, or one row with ``Target`` 0 for an image without pneumonia. The zipped
  form (``stage_2_train_labels.csv.zip`` or ``kaggle_stage_2_train_labels.csv.zip``)
  is read as it is.
- ``stage_2_train_images/<patientId>.dcm``: the DICOM images.

Get them with ``kaggle competitions download -c rsna-pneumonia-detection-challenge``
after accepting the rules at https://www.kaggle.com/c/rsna-pneumonia-detection-challenge .

Policies:

- Each ``patientId`` names one image. Its rows collapse to one binary label
  ``pneumonia`` (1 if any row has ``Target`` 1) and a ``boxes`` count.
- The challenge publishes no other patient id, so ``patientId`` is both
  ``patient_id`` and ``study_id``.
- Split: 70/15/15 by patient with a fixed seed; the challenge's own test labels
  were never released.
- RSNA has no reports, so ``text`` is a templated sentence from the label ("Chest
  radiograph with findings of pneumonia." or "Chest radiograph without evidence of
  pneumonia."). It carries the label, so use the set for classification, not for
  image-text pretraining.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from data_prep import common
from msd_core.manifest import split_by_patient

logger = logging.getLogger(__name__)

DATASET = "rsna"
LABEL_TABLES = (
    "stage_2_train_labels.csv",
    "stage_2_train_labels.csv.zip",
    "kaggle_stage_2_train_labels.csv.zip",
)
TEXTS = {
    1: "Chest radiograph with findings of pneumonia.",
    0: "Chest radiograph without evidence of pneumonia.",
}


def image_labels(table: pd.DataFrame, source: str = "RSNA label table") -> pd.DataFrame:
    """Collapse box rows to one row per image.

    Returns:
        Columns ``patientId``, ``pneumonia`` (0/1) and ``boxes`` (number of rows
        with ``Target`` 1), sorted by ``patientId``.
    """
    common.require_columns(table, ("patientId", "Target"), source)
    target = pd.to_numeric(table["Target"], errors="coerce")
    if target.isna().any() or not target.isin([0, 1]).all():
        row = int(target.index[target.isna() | ~target.isin([0, 1])][0])
        raise common.DataPrepError(f"{source}: row {row + 2} has Target {table['Target'].iloc[row]!r}; expected 0 or 1")

    grouped = target.groupby(table["patientId"].astype(str).str.strip())
    collapsed = pd.DataFrame({"pneumonia": grouped.max().astype(int), "boxes": grouped.sum().astype(int)})
    return collapsed.rename_axis("patientId").reset_index()


def build_manifest(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    labels: Optional[str | os.PathLike] = None,
    images_dir: Optional[str | os.PathLike] = None,
    missing_images: str = "skip",
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> pd.DataFrame:
    """Build the RSNA Pneumonia manifest and write it to ``out``.

    Args:
        root: the competition folder.
        out: path of the manifest CSV. Image paths are relative to its folder.
        labels: label table (``.csv`` or ``.zip``), default: the first of
            ``LABEL_TABLES`` under ``root``.
        images_dir: folder of ``<patientId>.dcm``, default ``root/stage_2_train_images``.
        missing_images: ``"skip"``, ``"error"`` or ``"ignore"``.
        fractions: train/val/test shares of patients.
        seed: seed of the patient split.

    Returns:
        The manifest, one row per image, with ``pneumonia`` and ``boxes`` columns.
    """
    root = Path(root)
    labels = Path(labels) if labels else common.find_file(root, LABEL_TABLES, "RSNA label table", DATASET)
    images_dir = Path(images_dir) if images_dir else root / "stage_2_train_images"

    table = common.read_table(labels, required=("patientId", "Target"))
    frame = image_labels(table, str(labels))
    logger.info("rsna: %d label rows collapsed to %d images", len(table), len(frame))

    frame["study_id"] = frame["patientId"]
    frame["patient_id"] = frame["patientId"]
    frame["text"] = frame["pneumonia"].map(TEXTS)
    frame["source_path"] = [str(images_dir / f"{p}.dcm") for p in frame["patientId"]]
    # Split before the image check, so that an image's split does not depend on
    # which other images have been downloaded.
    frame["split"] = split_by_patient(frame["patient_id"], fractions=fractions, seed=seed)
    frame.attrs["counts"] = {}
    frame = common.check_images(frame, missing_images=missing_images, source=str(labels), id_column="patientId")
    return common.finish_manifest(frame, out, source=DATASET, label_columns=("pneumonia",), extra_columns=("boxes",))
