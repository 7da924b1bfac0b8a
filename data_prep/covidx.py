"""COVIDx CXR to a manifest.

Files needed, under ``--root``:

- ``train.txt`` and ``test.txt`` (``val.txt`` too where the release has one): one
  image per line, space-separated ``patient_id filename label source``.
  ``--train-list``/``--test-list``/``--val-list`` point to files with other names,
  such as ``train_COVIDx9A.txt``.
- ``train/``, ``test/`` (and ``val/``): the images named in the lists.

Get the release from Kaggle (``andyczhao/covidx-cxr2``) or build it with the scripts
at https://github.com/lindawangg/COVID-Net ; ``ManualDownloadRequired`` gives the steps.

Policies:

- Labels: two variants are accepted, and the log names the one a file uses. The
  three-class lists (the "A" lists of the early releases, such as COVIDx V7A) use
  ``normal``, ``pneumonia`` and ``COVID-19`` and give three 0/1 columns
  ``normal``, ``pneumonia``, ``covid_19``. The binary lists (the "B" lists such as
  COVIDx V7B, and COVIDx CXR-2 and later) use ``positive`` and ``negative`` for
  COVID-19 and give one column ``covid_19``. Labels are matched case-insensitively;
  ``label`` keeps the value as written. Any other value, or a mix of the two
  variants, stops the build with an error naming the file and the values.
- Split: the official test list is the test split, and the official val list,
  where there is one, is the val split. Otherwise val is carved from train by
  patient (``val_fraction`` of the train patients, fixed seed). Train rows of a patient who
  also appears in val or test are dropped and counted (``patient_in_other_split``),
  so every patient is in one split.
- Patient ids are used as written. Ids from different sources that happen to be
  equal are treated as one patient, which can only move images together.
- COVIDx has no reports, so ``text`` is a templated sentence from the label. It
  carries the label, so use the set for classification, not for image-text
  pretraining.
- A line with fewer than three fields stops the build with an error naming the file
  and the line. A file name with spaces is read correctly when the line has all four
  fields, because the patient id is the first field and the label and source are
  the last two.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import pandas as pd

from data_prep import common
from msd_core.manifest import split_by_patient

logger = logging.getLogger(__name__)

DATASET = "covidx"
THREE_CLASS = {"normal": "normal", "pneumonia": "pneumonia", "covid-19": "covid_19"}
BINARY = {"positive": 1, "negative": 0}
TEXTS = {
    "normal": "Chest radiograph with no acute findings.",
    "pneumonia": "Chest radiograph showing pneumonia that is not COVID-19.",
    "covid-19": "Chest radiograph showing COVID-19 pneumonia.",
    "positive": "Chest radiograph of a patient with COVID-19.",
    "negative": "Chest radiograph of a patient without COVID-19.",
}


def read_list(path: str | os.PathLike) -> pd.DataFrame:
    """Read one COVIDx list file.

    Returns:
        Columns ``patient_id``, ``filename``, ``label``, ``source`` (``""`` for
        three-field lines), in file order.

    Raises:
        common.DataPrepError: a non-empty line has fewer than three fields.
    """
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 3:
            raise common.DataPrepError(
                f"{path}: line {number} has {len(fields)} field(s), expected "
                f"'patient_id filename label source': {line!r}"
            )
        if len(fields) == 3:
            rows.append((fields[0], fields[1], fields[2], ""))
        else:
            rows.append((fields[0], " ".join(fields[1:-2]), fields[-2], fields[-1]))
    return pd.DataFrame(rows, columns=["patient_id", "filename", "label", "source"])


def label_variant(labels: pd.Series, source: str) -> str:
    """Return ``"three_class"`` or ``"binary"`` for the label values of one list.

    Raises:
        common.DataPrepError: the values fit neither variant, or mix both.
    """
    values = set(labels.str.lower())
    if values <= set(THREE_CLASS):
        return "three_class"
    if values <= set(BINARY):
        return "binary"
    raise common.DataPrepError(
        f"{source}: label values {sorted(set(labels))} fit neither COVIDx variant: three-class "
        "(normal, pneumonia, COVID-19) or binary (positive, negative). Check that the file is a COVIDx list."
    )


def build_manifest(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    train_list: Optional[str | os.PathLike] = None,
    test_list: Optional[str | os.PathLike] = None,
    val_list: Optional[str | os.PathLike] = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    missing_images: str = "skip",
) -> pd.DataFrame:
    """Build the COVIDx manifest and write it to ``out``.

    Args:
        root: the COVIDx folder.
        out: path of the manifest CSV. Image paths are relative to its folder.
        train_list, test_list, val_list: list files, default ``root/train.txt``,
            ``root/test.txt`` and ``root/val.txt`` (the last only if present).
        val_fraction: share of train patients moved to val when there is no val list.
        seed: seed of the val carve-out.
        missing_images: ``"skip"``, ``"error"`` or ``"ignore"``.

    Returns:
        The manifest with ``label``, ``source`` and the variant's 0/1 columns.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root = Path(root)
    train_path = Path(train_list) if train_list else None
    if train_path is None:
        train_path = common.find_file(root, ("train.txt",), "COVIDx train list", DATASET)
    test_path = Path(test_list) if test_list else common.find_file(root, ("test.txt",), "COVIDx test list", DATASET)
    val_path = Path(val_list) if val_list else None
    if val_path is None and (root / "val.txt").is_file():
        val_path = root / "val.txt"

    parts = {"train": read_list(train_path), "test": read_list(test_path)}
    if val_path is not None:
        parts["val"] = read_list(val_path)
    variant = _common_variant(parts, {"train": train_path, "test": test_path, "val": val_path})

    for split, part in parts.items():
        part["split"] = split
        part["source_path"] = [str(root / split / name) for name in part["filename"]]
    if val_path is None:
        train = parts["train"]
        fractions = (1.0 - val_fraction, val_fraction, 0.0)
        train["split"] = split_by_patient(train["patient_id"], fractions=fractions, seed=seed)

    frame = _drop_shared_patients(pd.concat(parts.values(), ignore_index=True))
    frame["study_id"] = frame["filename"]
    frame["text"] = frame["label"].str.lower().map(TEXTS)
    label_columns = _add_label_columns(frame, variant)
    frame = common.check_images(frame, missing_images=missing_images, source=str(root), id_column="filename")
    return common.finish_manifest(
        frame, out, source=DATASET, label_columns=["label", *label_columns], extra_columns=("source",)
    )


def _common_variant(parts: dict, paths: dict) -> str:
    variants = {split: label_variant(part["label"], str(paths[split])) for split, part in parts.items()}
    if len(set(variants.values())) > 1:
        raise common.DataPrepError(
            f"COVIDx lists use different label variants: {variants}; use lists from one release"
        )
    variant = next(iter(variants.values()))
    if variant == "binary":
        logger.info("covidx: binary labels (positive/negative, as in COVIDx CXR-2); writing one covid_19 column")
    else:
        logger.info("covidx: three-class labels (normal/pneumonia/COVID-19); writing normal, pneumonia, covid_19")
    return variant


def _drop_shared_patients(frame: pd.DataFrame) -> pd.DataFrame:
    """Drop train rows whose patient also has val or test rows, and count them."""
    held_out = set(frame.loc[frame["split"] != "train", "patient_id"])
    shared = (frame["split"] == "train") & frame["patient_id"].isin(held_out)
    count = int(shared.sum())
    if count:
        logger.warning("covidx: dropped %d train image(s) of patients who also appear in val or test", count)

    # The official val and test lists may share patients too; test wins.
    test_patients = set(frame.loc[frame["split"] == "test", "patient_id"])
    shared_val = (frame["split"] == "val") & frame["patient_id"].isin(test_patients)
    if shared_val.any():
        logger.warning("covidx: dropped %d val image(s) of patients who also appear in test", int(shared_val.sum()))

    kept = frame.loc[~shared & ~shared_val].reset_index(drop=True)
    kept.attrs["counts"] = {"patient_in_other_split": count + int(shared_val.sum())}
    return kept


def _add_label_columns(frame: pd.DataFrame, variant: str) -> list:
    lowered = frame["label"].str.lower()
    if variant == "binary":
        frame["covid_19"] = lowered.map(BINARY).astype(int)
        return ["covid_19"]
    for value, column in THREE_CLASS.items():
        frame[column] = (lowered == value).astype(int)
    return list(THREE_CLASS.values())
