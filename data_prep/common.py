"""Helpers shared by the dataset builders: reading tables, text policies, image paths.

Policies that every builder applies the same way:

- Empty or whitespace-only report text: the row is dropped and counted
  (``on_empty="drop"``, the default) or the build stops with an error naming the row
  (``on_empty="error"``).
- A report with only IMPRESSION keeps IMPRESSION as its text, and a report with only
  FINDINGS keeps FINDINGS. With both, the text is FINDINGS followed by IMPRESSION.
- Missing image files: ``missing_images="skip"`` drops the row and counts it, and
  ``"error"`` stops with an error naming the row and the file. ``"ignore"`` writes
  the row without checking, so users can inspect labels and splits before the
  images are downloaded.
- ``image_path`` is written relative to the manifest's folder, in POSIX form.
- Every patient is in exactly one split, and the build fails if a builder breaks this.

Counts (reports read, rows dropped per reason) are logged and stored in
``frame.attrs["counts"]`` of the returned frame.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from msd_core.manifest import REQUIRED_COLUMNS, write_manifest

logger = logging.getLogger(__name__)

ON_EMPTY = ("drop", "error")
MISSING_IMAGES = ("skip", "error", "ignore")
UNCERTAIN_POLICIES = ("zeros", "ones", "ignore")
IMAGE_PLACEMENT = ("symlink", "copy", "relative")


class DataPrepError(ValueError):
    """An input file or row that a builder cannot turn into a manifest."""


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def read_table(path: str | os.PathLike, required: Sequence[str] = (), **read_csv_options) -> pd.DataFrame:
    """Read a CSV (plain, ``.gz`` or a ``.zip`` holding one CSV) and check its columns.

    Column names are stripped of surrounding whitespace, because some published
    tables write ``" EncodedPixels"`` with a leading space.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataPrepError: a column of ``required`` is missing. The message names the
            file, the missing column and the columns the file has.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table not found: {path}")

    frame = pd.read_csv(path, **read_csv_options)
    frame.columns = [str(c).strip() for c in frame.columns]
    require_columns(frame, required, path)
    return frame


def require_columns(frame: pd.DataFrame, required: Iterable[str], source: str | os.PathLike) -> None:
    """Raise ``DataPrepError`` naming ``source`` if ``frame`` lacks any column of ``required``."""
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataPrepError(
            f"{source}: missing required column(s) {missing}; the file has columns {list(frame.columns)}. "
            "Check that this is the right file, or pass the column names as options."
        )


def find_file(folder: Path, candidates: Sequence[str], what: str, dataset: str) -> Path:
    """Return the first of ``candidates`` (names relative to ``folder``) that exists.

    Raises:
        ManualDownloadRequired: none exists (a ``FileNotFoundError``). The message
            lists the names tried and where to get the file.
    """
    for name in candidates:
        path = folder / name
        if path.exists():
            return path

    from data_prep.download import ManualDownloadRequired

    tried = ", ".join(str(folder / name) for name in candidates)
    raise ManualDownloadRequired(dataset, f"{what} not found; tried {tried}.", folder=folder)


def normalise_whitespace(text: object) -> str:
    """Collapse runs of whitespace to one space. ``None`` and NaN become ``""``."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return ""
    return re.sub(r"\s+", " ", str(text)).strip()


def join_sections(findings: str, impression: str) -> str:
    """Return FINDINGS followed by IMPRESSION, or whichever of the two is not empty."""
    parts = [normalise_whitespace(findings), normalise_whitespace(impression)]
    return " ".join(part for part in parts if part)


def drop_empty_text(frame: pd.DataFrame, *, on_empty: str, source: str, id_column: str) -> pd.DataFrame:
    """Drop rows whose ``text`` is empty or whitespace-only, or raise, per ``on_empty``.

    The dropped count is stored in ``frame.attrs["counts"]["empty_text"]``.

    Raises:
        DataPrepError: ``on_empty="error"`` and a row has no text. The message names
            ``source`` and the first such row's ``id_column`` value.
    """
    check_choice("on_empty", on_empty, ON_EMPTY)
    empty = frame["text"].map(normalise_whitespace) == ""
    count = int(empty.sum())
    if count and on_empty == "error":
        first = frame.loc[empty, id_column].iloc[0]
        raise DataPrepError(
            f"{source}: {count} row(s) have an empty report, the first is {id_column}={first}; "
            "use on_empty='drop' (--on-empty drop) to drop them"
        )

    kept = frame.loc[~empty].copy()
    kept.attrs = dict(frame.attrs)
    add_count(kept, "empty_text", count)
    if count:
        logger.info("%s: dropped %d row(s) with an empty report", source, count)
    return kept


def check_images(frame: pd.DataFrame, *, missing_images: str, source: str, id_column: str) -> pd.DataFrame:
    """Apply the missing-image policy to the absolute paths in column ``source_path``.

    Raises:
        DataPrepError: ``missing_images="error"`` and a file is missing, or
            ``"skip"`` and no file at all is found (usually a wrong image folder). The
            message names the row's ``id_column`` value and the path.
    """
    check_choice("missing_images", missing_images, MISSING_IMAGES)
    if missing_images == "ignore":
        add_count(frame, "missing_image", 0)
        return frame

    exists = frame["source_path"].map(lambda p: Path(p).is_file())
    count = int((~exists).sum())
    if count and missing_images == "error":
        row = frame.loc[~exists].iloc[0]
        raise DataPrepError(
            f"{source}: image not found for {id_column}={row[id_column]}: {row['source_path']} "
            f"({count} missing in all); download the images, or pass missing_images='skip' "
            "(--missing-images skip) to leave those rows out"
        )

    if count and count == len(frame):
        raise DataPrepError(
            f"{source}: none of the {count} image files was found, for example {frame['source_path'].iloc[0]}; "
            "check the image folder option, or pass missing_images='ignore' (--missing-images ignore) to write "
            "the manifest before the images are downloaded"
        )

    kept = frame.loc[exists].copy()
    kept.attrs = dict(frame.attrs)
    add_count(kept, "missing_image", count)
    if count:
        logger.warning("%s: skipped %d row(s) whose image file is missing", source, count)
    return kept


def add_count(frame: pd.DataFrame, name: str, value: int) -> None:
    """Add ``value`` to the counter ``name`` in ``frame.attrs["counts"]``."""
    counts = dict(frame.attrs.get("counts", {}))
    counts[name] = counts.get(name, 0) + int(value)
    frame.attrs["counts"] = counts


def relative_image_paths(source_paths: Iterable[str | os.PathLike], manifest_dir: Path) -> list:
    """Return each path relative to ``manifest_dir`` in POSIX form.

    Logs one warning when any path leaves ``manifest_dir``, because ``msd_core``
    rejects such manifests by default.
    """
    manifest_dir = Path(os.path.abspath(manifest_dir))
    relative = [Path(os.path.relpath(os.path.abspath(p), manifest_dir)).as_posix() for p in source_paths]
    outside = sum(1 for p in relative if p.startswith("../"))
    if outside:
        logger.warning(
            "%d image path(s) point outside %s (they start with ../); msd_core rejects such manifests "
            "by default, so write the manifest in a folder above the images",
            outside,
            manifest_dir,
        )
    return relative


def place_images(source_paths: Sequence[str], manifest_dir: Path, mode: str) -> list:
    """Make the images reachable from ``manifest_dir`` and return their manifest paths.

    Modes:
        ``"symlink"``: link ``manifest_dir/images/<path>`` to each source file, where
            ``<path>`` is the file's path below the deepest folder that contains all
            source files. Where the file system refuses symlinks, copy instead.
        ``"copy"``: copy each file there.
        ``"relative"``: leave the files in place and write relative paths, which may
            start with ``../``.
    Files already inside ``manifest_dir`` are never linked or copied. An existing
    link or file at a target path is replaced, so a rerun refreshes the folder.
    """
    check_choice("images", mode, IMAGE_PLACEMENT)
    manifest_dir = Path(os.path.abspath(manifest_dir))
    if mode == "relative":
        return relative_image_paths(source_paths, manifest_dir)

    sources = [Path(os.path.abspath(p)) for p in source_paths]
    outside = [p for p in sources if manifest_dir not in p.parents]
    # Paths below the common folder are unique, so two sources never share a target.
    source_root = Path(os.path.commonpath([p.parent for p in outside])) if outside else manifest_dir

    placed = []
    done = set()
    copied_instead = 0
    for source in sources:
        if manifest_dir in source.parents:
            placed.append(source.relative_to(manifest_dir).as_posix())
            continue

        target = manifest_dir / "images" / source.relative_to(source_root)
        if target not in done:
            copied_instead += _place_one(source, target, mode)
            done.add(target)
        placed.append(target.relative_to(manifest_dir).as_posix())

    if copied_instead:
        logger.info("symlinks are not supported here; copied %d image(s) instead", copied_instead)
    return placed


def _place_one(source: Path, target: Path, mode: str) -> int:
    """Link or copy one file. Return 1 when a symlink was requested but a copy was made."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        if mode == "symlink" and target.is_symlink() and Path(os.readlink(target)) == source:
            return 0
        # Unlink first: copying onto a symlink would overwrite the source file.
        target.unlink()

    if mode == "symlink":
        try:
            target.symlink_to(source)
            return 0
        except OSError:
            shutil.copy2(source, target)
            return 1

    shutil.copy2(source, target)
    return 0


def apply_uncertain_policy(values: pd.DataFrame, policy: str) -> pd.DataFrame:
    """Map CheXpert-style label values (1, 0, -1, blank) to 0/1 per ``policy``.

    Blank means "not mentioned" and becomes 0 under every policy. -1 (uncertain)
    becomes 1 under ``"ones"`` and 0 under ``"zeros"``. Under ``"ignore"`` it stays
    -1 so that the caller can exclude those rows or cells.
    """
    check_choice("uncertain", policy, UNCERTAIN_POLICIES)
    mapped = values.apply(pd.to_numeric, errors="coerce").fillna(0.0)
    if policy == "ones":
        mapped = mapped.replace(-1.0, 1.0)
    elif policy == "zeros":
        mapped = mapped.replace(-1.0, 0.0)
    return mapped.astype(int)


def label_column_name(name: str) -> str:
    """Turn a label name such as ``"Pleural Effusion"`` into ``"pleural_effusion"``."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def check_patient_splits(frame: pd.DataFrame, source: str) -> None:
    """Raise ``DataPrepError`` if any patient appears in more than one split."""
    splits_per_patient = frame.groupby("patient_id")["split"].nunique()
    leaking = splits_per_patient[splits_per_patient > 1]
    if len(leaking):
        raise DataPrepError(
            f"{source}: {len(leaking)} patient(s) appear in more than one split, "
            f"for example patient_id={leaking.index[0]}; this is a bug in the builder"
        )


def finish_manifest(
    frame: pd.DataFrame,
    out: str | os.PathLike,
    *,
    source: str,
    label_columns: Sequence[str] = (),
    extra_columns: Sequence[str] = (),
    image_paths: Optional[Sequence[str]] = None,
) -> pd.DataFrame:
    """Order the columns, check the splits and write the manifest to ``out``.

    ``image_paths`` overrides the default, which is ``source_path`` made relative to
    the folder of ``out``.

    Returns:
        The written frame, with ``attrs["counts"]`` carried over from ``frame``.
    """
    out = Path(out)
    frame = frame.reset_index(drop=True)
    if image_paths is None:
        image_paths = relative_image_paths(frame["source_path"], out.parent)

    manifest = pd.DataFrame({"image_path": list(image_paths)})
    for column in REQUIRED_COLUMNS[1:]:
        manifest[column] = frame[column].astype(str).to_numpy()
    for column in list(label_columns) + list(extra_columns):
        manifest[column] = frame[column].to_numpy()

    check_patient_splits(manifest, source)
    write_manifest(manifest, out)
    manifest.attrs["counts"] = dict(frame.attrs.get("counts", {}))
    _log_summary(manifest, out, source)
    return manifest


def _log_summary(manifest: pd.DataFrame, out: Path, source: str) -> None:
    per_split = manifest["split"].value_counts().to_dict()
    logger.info(
        "%s: wrote %d rows (%s) from %d patients to %s; counts: %s",
        source,
        len(manifest),
        ", ".join(f"{name} {per_split.get(name, 0)}" for name in ("train", "val", "test")),
        manifest["patient_id"].nunique(),
        out,
        manifest.attrs.get("counts", {}),
    )

