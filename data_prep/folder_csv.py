"""Any folder of images plus a CSV with a text column, to a manifest.

Files needed, under ``--root``:

- a CSV with one row per image, an image-path column and one or more text columns.
  ``--csv`` names it; by default it is the only ``.csv`` file in ``--root``.
- the images, at paths relative to ``--root`` (or ``--images-dir``) or absolute.

Options name the columns: ``image_column``, ``text_columns`` (several are joined
with ``text_separator``), ``patient_column``, ``study_column``, ``label_columns``
(copied as they are), ``multilabel_column`` (kept as it is, plus one 0/1 column per
value after splitting on ``multilabel_separator``) and ``keep_columns`` (copied
as they are, for example licence and attribution columns).

The COVID-19 image data collection layout (``metadata.csv`` with ``image``,
``patient_id``, ``finding`` and ``clinical_notes``) becomes a manifest with::

    python -m data_prep folder_csv --root DATA --out OUT/manifest.csv \\
        --text-column clinical_notes --patient-column patient_id --multilabel-column finding

Policies:

- Images next to the manifest: ``msd_core`` rejects manifests whose image paths
  leave the manifest's folder, so ``images="symlink"`` (default) links each image
  into ``<manifest folder>/images/``, keeping its path below the deepest folder
  that holds all source images, and copies instead where the file system refuses symlinks. ``"copy"`` always copies,
  and ``"relative"`` writes paths that may start with ``../``. Images already inside
  the manifest's folder stay where they are.
- One-hot column names are the values in snake_case (``COVID-19`` becomes
  ``covid_19``). A name that clashes with another manifest column stops the build.
- Without ``patient_column`` every image counts as its own patient, and a warning
  says so, because images of one patient could then land in different splits.
- Splits are by patient (default 80/10/10, fixed seed). Empty texts and missing
  images follow the shared policies of ``data_prep.common``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from data_prep import common
from msd_core.manifest import REQUIRED_COLUMNS, split_by_patient

logger = logging.getLogger(__name__)

DATASET = "folder_csv"


def build_manifest(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    csv: Optional[str | os.PathLike] = None,
    image_column: str = "image",
    text_columns: Sequence[str] = ("text",),
    text_separator: str = " ",
    patient_column: Optional[str] = None,
    study_column: Optional[str] = None,
    label_columns: Sequence[str] = (),
    multilabel_column: Optional[str] = None,
    multilabel_separator: str = ", ",
    keep_columns: Sequence[str] = (),
    images_dir: Optional[str | os.PathLike] = None,
    images: str = "symlink",
    on_empty: str = "drop",
    missing_images: str = "skip",
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> pd.DataFrame:
    """Build a manifest from a CSV and its images and write it to ``out``.

    Args:
        root: the data folder.
        out: path of the manifest CSV; the images are linked or copied under its
            folder unless ``images="relative"``.
        csv: the CSV, relative to ``root`` or absolute; default: the only ``.csv``
            in ``root``.
        image_column: column of image paths.
        text_columns: columns joined, in order, into ``text``; blank cells are skipped.
        text_separator: string placed between the joined columns.
        patient_column: column of patient ids; default: one patient per image.
        study_column: column of study ids; default: the image path.
        label_columns: columns copied into the manifest as labels.
        multilabel_column: column of separated findings, kept and one-hot encoded.
        multilabel_separator: separator inside ``multilabel_column``.
        keep_columns: other columns copied as they are.
        images_dir: folder that relative image paths start from; default ``root``.
        images: ``"symlink"``, ``"copy"`` or ``"relative"`` (module docstring).
        on_empty: ``"drop"`` or ``"error"`` for rows whose text is empty.
        missing_images: ``"skip"``, ``"error"`` or ``"ignore"``.
        fractions: train/val/test shares of patients.
        seed: seed of the patient split.

    Returns:
        The manifest as written.
    """
    common.check_choice("images", images, common.IMAGE_PLACEMENT)
    root = Path(root)
    csv_path = _csv_path(root, csv)
    images_dir = Path(images_dir) if images_dir else root
    text_columns = [text_columns] if isinstance(text_columns, str) else list(text_columns)
    required = [image_column, *text_columns, *label_columns, *keep_columns]
    required += [c for c in (patient_column, study_column, multilabel_column) if c]
    table = common.read_table(csv_path, required=required, dtype=str, keep_default_na=False)

    frame = pd.DataFrame({"image": table[image_column].str.strip()})
    frame["text"] = [
        text_separator.join(common.normalise_whitespace(v) for v in values if common.normalise_whitespace(v))
        for values in table[text_columns].itertuples(index=False)
    ]
    frame["study_id"] = table[study_column] if study_column else frame["image"]
    frame["patient_id"] = table[patient_column].str.strip() if patient_column else frame["image"]
    if not patient_column:
        logger.warning("folder_csv: no patient column given, so every image counts as its own patient")

    extra = [*label_columns, *keep_columns]
    for column in extra:
        frame[column] = table[column]
    if multilabel_column:
        extra += _add_multilabel(frame, table[multilabel_column], multilabel_column, multilabel_separator, csv_path)

    frame.attrs["counts"] = {"rows": len(frame)}
    frame = common.drop_empty_text(frame, on_empty=on_empty, source=str(csv_path), id_column="image")
    frame["split"] = split_by_patient(frame["patient_id"], fractions=fractions, seed=seed)
    frame["source_path"] = [str(_resolve(images_dir, image)) for image in frame["image"]]
    frame = common.check_images(frame, missing_images=missing_images, source=str(csv_path), id_column="image")

    out = Path(out)
    placed = common.place_images(list(frame["source_path"]), out.parent, images)
    return common.finish_manifest(frame, out, source=DATASET, extra_columns=extra, image_paths=placed)


def _csv_path(root: Path, csv: Optional[str | os.PathLike]) -> Path:
    if csv is not None:
        path = Path(csv)
        return path if path.is_absolute() else root / path

    candidates = sorted(root.glob("*.csv"))
    if len(candidates) != 1:
        raise common.DataPrepError(
            f"{root}: found {len(candidates)} CSV files ({[c.name for c in candidates]}); "
            "name the one to use with csv= (--csv)"
        )
    return candidates[0]


def _resolve(images_dir: Path, image: str) -> Path:
    path = Path(image)
    return path if path.is_absolute() else images_dir / path


def _add_multilabel(frame: pd.DataFrame, values: pd.Series, column: str, separator: str, source: Path) -> list:
    """Keep ``column`` as it is and add one 0/1 column per separated value; return the new names."""
    frame[column] = values.to_numpy()
    items = values.map(lambda v: {part.strip() for part in str(v).split(separator) if part.strip()})
    names = sorted(set().union(*items)) if len(items) else []

    added = [column]
    for name in names:
        label = common.label_column_name(name)
        if not label or label in frame.columns or label in REQUIRED_COLUMNS:
            raise common.DataPrepError(
                f"{source}: the {column} value {name!r} would become column {label!r}, which is empty or already "
                "used; rename the value in the CSV"
            )
        frame[label] = items.map(lambda found, name=name: int(name in found)).to_numpy()
        added.append(label)
    logger.info("folder_csv: %s has %d distinct values: %s", column, len(names), names)
    return added
