"""The manifest: the one table format every dataset is turned into.

A manifest is a UTF-8 CSV with one row per image-text pair and at least the columns
in ``REQUIRED_COLUMNS``. ``image_path`` is relative to the folder of the manifest, so a
manifest and its images can be moved together. Any other column (label columns such as
``cardiomegaly``, or a class column such as ``finding``) is kept and passed through.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

REQUIRED_COLUMNS = ("image_path", "text", "split", "study_id", "patient_id")
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """A manifest that cannot be used as it is: a missing column, an invalid row, bad bytes."""


def split_by_patient(
    patient_ids: Sequence,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> np.ndarray:
    """Assign every row to train/val/test so that each patient lands in one split.

    Patients (not rows) are shuffled with ``numpy.random.default_rng(seed)`` after
    sorting their ids as strings, so the result depends only on the set of ids and the
    seed, not on row order. ``fractions`` are the shares of patients per split.

    Returns:
        An array of ``"train"``, ``"val"`` or ``"test"``, one per input row.
    """
    if len(fractions) != len(SPLITS):
        raise ValueError(f"fractions must have {len(SPLITS)} values (train, val, test), got {list(fractions)}")
    if any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {list(fractions)}")

    ids = np.asarray([str(p) for p in patient_ids])
    unique = np.array(sorted(set(ids.tolist())))
    order = np.random.default_rng(seed).permutation(len(unique))
    shuffled = unique[order]

    # Cumulative boundaries in patient counts; rounding keeps every patient assigned.
    bounds = np.round(np.cumsum(fractions) * len(shuffled)).astype(int)
    split_of_patient = {}
    start = 0
    for name, stop in zip(SPLITS, bounds):
        for patient in shuffled[start:stop]:
            split_of_patient[patient] = name
        start = stop
    return np.array([split_of_patient[p] for p in ids], dtype=object)


def write_manifest(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Validate ``frame`` and write it to ``path`` as UTF-8 CSV, atomically.

    The file is written to a temporary name in the same folder and renamed, so an
    interrupted write never leaves a half-written manifest behind.
    """
    path = Path(path)
    check_columns(frame.columns, path)
    bad_splits = sorted(set(frame["split"].astype(str)) - set(SPLITS))
    if bad_splits:
        raise ManifestError(f"{path}: invalid split values {bad_splits}; allowed: {list(SPLITS)}")

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            frame.to_csv(stream, index=False)
        # mkstemp creates the file readable by its owner only; give it the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a manifest CSV.

    Raises:
        ManifestError: the file is missing, is not UTF-8 (the message names the line),
            or lacks a required column (the message lists the columns it has).
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(
            f"manifest not found: {path}; build one with `python -m msd_core phantom --out DIR` (writes "
            "DIR/manifest.csv) or `python -m data_prep <dataset> --out PATH` (see docs/datasets.md)"
        )

    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ManifestError(
            f"{path}: line {line} is not valid UTF-8 (byte offset {error.start}); "
            "re-save the file as UTF-8, for example with iconv -f latin1 -t utf-8"
        ) from None

    text_columns = {name: str for name in REQUIRED_COLUMNS}
    frame = pd.read_csv(path, encoding="utf-8", dtype=text_columns)
    check_columns(frame.columns, path)
    # Empty cells of the required columns are empty strings (label columns keep NaN).
    frame[list(REQUIRED_COLUMNS)] = frame[list(REQUIRED_COLUMNS)].fillna("")
    return frame


def check_columns(columns: Sequence[str], path: str | os.PathLike) -> None:
    """Raise ``ManifestError`` naming ``path`` if any column of ``REQUIRED_COLUMNS`` is missing."""
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(
            f"{path}: missing required column(s) {missing}; it has {list(columns)}. "
            f"A manifest needs {list(REQUIRED_COLUMNS)}: see docs/datasets.md, or turn your own CSV into a "
            "manifest with `python -m data_prep folder_csv`."
        )
