"""SIIM-ACR Pneumothorax Segmentation to a manifest.

Files needed (Kaggle competition rules), under ``--root``:

- ``train-rle.csv`` (or ``train-rle.csv.gz``, or ``siim-pneumothorax-train-rle.csv.gz``):
  ``ImageId, EncodedPixels``, one row per pneumothorax region as run-length
  encoding, or one row with ``-1`` for an image without pneumothorax. Column names
  are read with surrounding spaces stripped, because the published file writes
  ``" EncodedPixels"``.
- the DICOM images as published, ``dicom-images-train/<study>/<series>/<ImageId>.dcm``.
  They are found by file name anywhere under the image folder.

The competition page is https://www.kaggle.com/c/siim-acr-pneumothorax-segmentation ;
``ManualDownloadRequired`` names a full copy of the images.

Policies:

- The rows of one ``ImageId`` collapse to one binary label ``pneumothorax``
  (1 if any row has an encoding other than ``-1``) and a ``regions`` count.
- The table has no patient id, so by default ``patient_id`` is the ``ImageId``,
  which treats every image as its own patient. ``patient_ids="dicom"`` reads the
  ``PatientID`` of each DICOM header instead, which is slower and needs the images.
  An image whose file is missing or whose header has no PatientID keeps its ImageId.
- Split: 70/15/15 by patient with a fixed seed.
- SIIM has no reports, so ``text`` is a templated sentence from the label. It
  carries the label, so use the set for classification, not for image-text
  pretraining.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd
from tqdm.auto import tqdm

from data_prep import common
from msd_core.manifest import split_by_patient

logger = logging.getLogger(__name__)

DATASET = "siim"
LABEL_TABLES = ("train-rle.csv", "train-rle.csv.gz", "siim-pneumothorax-train-rle.csv.gz")
PATIENT_ID_SOURCES = ("image", "dicom")
TEXTS = {
    1: "Chest radiograph showing a pneumothorax.",
    0: "Chest radiograph without pneumothorax.",
}


def image_labels(table: pd.DataFrame, source: str = "SIIM label table") -> pd.DataFrame:
    """Collapse RLE rows to one row per image.

    Returns:
        Columns ``ImageId``, ``pneumothorax`` (0/1) and ``regions`` (number of
        encoded regions), sorted by ``ImageId``.
    """
    common.require_columns(table, ("ImageId", "EncodedPixels"), source)
    encoded = table["EncodedPixels"].astype(str).str.strip()
    if (encoded == "").any() or table["EncodedPixels"].isna().any():
        row = int(((encoded == "") | table["EncodedPixels"].isna()).to_numpy().argmax())
        raise common.DataPrepError(f"{source}: row {row + 2} has an empty EncodedPixels; expected -1 or an RLE string")

    positive = (encoded != "-1").astype(int)
    grouped = positive.groupby(table["ImageId"].astype(str).str.strip())
    collapsed = pd.DataFrame({"pneumothorax": grouped.max(), "regions": grouped.sum()})
    return collapsed.rename_axis("ImageId").reset_index()


def find_dicoms(images_dir: Path) -> dict:
    """Return ``{file stem: path}`` for every ``.dcm`` file under ``images_dir``.

    Where two files share a name, the first in sorted path order wins and a warning
    is logged.
    """
    found = {}
    duplicates = 0
    for path in sorted(images_dir.rglob("*.dcm")):
        if path.stem in found:
            duplicates += 1
            continue
        found[path.stem] = path
    if duplicates:
        logger.warning(
            "siim: %d DICOM file name(s) occur more than once under %s; kept the first of each", duplicates, images_dir
        )
    return found


def build_manifest(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    labels: Optional[str | os.PathLike] = None,
    images_dir: Optional[str | os.PathLike] = None,
    patient_ids: str = "image",
    missing_images: str = "skip",
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> pd.DataFrame:
    """Build the SIIM-ACR Pneumothorax manifest and write it to ``out``.

    Args:
        root: the competition folder.
        out: path of the manifest CSV. Image paths are relative to its folder.
        labels: RLE table, default: the first of ``LABEL_TABLES`` under ``root``.
        images_dir: folder searched for ``<ImageId>.dcm``, default
            ``root/dicom-images-train`` (or ``root`` when that is absent).
        patient_ids: ``"image"`` or ``"dicom"`` (module docstring).
        missing_images: ``"skip"``, ``"error"`` or ``"ignore"``. With ``"ignore"`` an
            image that is not found gets the path ``<images_dir>/<ImageId>.dcm``.
        fractions: train/val/test shares of patients.
        seed: seed of the patient split.

    Returns:
        The manifest, one row per image, with ``pneumothorax`` and ``regions`` columns.
    """
    common.check_choice("patient_ids", patient_ids, PATIENT_ID_SOURCES)
    root = Path(root)
    labels = Path(labels) if labels else common.find_file(root, LABEL_TABLES, "SIIM RLE label table", DATASET)
    if images_dir is None:
        images_dir = root / "dicom-images-train" if (root / "dicom-images-train").is_dir() else root
    images_dir = Path(images_dir)

    table = common.read_table(labels, required=("ImageId", "EncodedPixels"))
    frame = image_labels(table, str(labels))
    logger.info("siim: %d label rows collapsed to %d images", len(table), len(frame))

    found = find_dicoms(images_dir) if images_dir.is_dir() else {}
    frame["source_path"] = [str(found.get(i, images_dir / f"{i}.dcm")) for i in frame["ImageId"]]
    frame["study_id"] = frame["ImageId"]
    frame["patient_id"] = _patient_ids(frame, patient_ids)
    frame["text"] = frame["pneumothorax"].map(TEXTS)

    # Split before the image check, so that an image's split does not depend on
    # which other images have been downloaded.
    frame["split"] = split_by_patient(frame["patient_id"], fractions=fractions, seed=seed)
    frame.attrs["counts"] = {}
    frame = common.check_images(frame, missing_images=missing_images, source=str(labels), id_column="ImageId")
    return common.finish_manifest(
        frame, out, source=DATASET, label_columns=("pneumothorax",), extra_columns=("regions",)
    )


def _patient_ids(frame: pd.DataFrame, source: str) -> list:
    if source == "image":
        return list(frame["ImageId"])

    import pydicom

    ids = []
    for image_id, path in tqdm(zip(frame["ImageId"], frame["source_path"]), total=len(frame), desc="DICOM headers"):
        if not Path(path).is_file():
            ids.append(image_id)
            continue
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
        ids.append(str(header.get("PatientID", "")).strip() or image_id)
    return ids
