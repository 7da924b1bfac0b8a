"""CheXpert 5x200 to a manifest: 200 frontal images for each of five findings.

Files needed (Stanford University research use agreement), under ``--root``:

- ``CheXpert-v1.0-small/train.csv`` (or ``CheXpert-v1.0/train.csv``): the training
  label table with a ``Path`` column, ``Frontal/Lateral`` and the 14 observations
  (1 positive, 0 negative, -1 uncertain, blank not mentioned). ``--labels`` points to
  another copy, for example a ``.csv.gz``.
- the images that ``Path`` names, relative to ``--root`` (for example
  ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``).

Register and download at https://stanfordaimi.azurewebsites.net/datasets .

Selection:

- Classes: atelectasis, cardiomegaly, consolidation, edema, pleural effusion.
- Eligible rows are frontal views with exactly one of the five classes positive
  after the uncertain policy, so every selected image has exactly one positive.
- ``uncertain`` decides what -1 means among the five. Under ``"zeros"`` (default)
  -1 is negative. Under ``"ones"`` it is positive, so a row with -1 in two classes
  is not eligible. Under ``"ignore"`` a row with -1 in any of the five is not
  eligible.
  Blank is negative under every policy.
- For each class in the order above, ``per_class`` rows are drawn without
  replacement from its eligible rows sorted by ``Path``, with one
  ``numpy.random.default_rng(seed)`` shared by the five draws. The same table, seed
  and policy give the same 1,000 rows on every machine.
- The selection is written to a split file (``Path``, ``class``, ``split``) next
  to the manifest. Passing that file back as ``selection`` rebuilds the same manifest
  without sampling, so users can share it to compare results.

Other columns:

- ``patient_id`` is the ``patientNNNNN`` part of ``Path`` and ``study_id`` the
  ``patientNNNNN/studyN`` part. Splits are by patient (default 80/10/10).
- CheXpert has no reports, so ``text`` is a templated sentence naming the class,
  for example "Frontal chest radiograph showing pleural effusion.". It carries the
  label, so use the set for zero-shot and linear-probe evaluation, not for
  image-text pretraining or retrieval.
- ``label`` is the class name, and the five 0/1 columns one-hot encode it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from data_prep import common
from msd_core.manifest import split_by_patient

logger = logging.getLogger(__name__)

DATASET = "chexpert_5x200"
CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
CLASS_PHRASES = {
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Consolidation": "consolidation",
    "Edema": "pulmonary edema",
    "Pleural Effusion": "pleural effusion",
}
LABEL_TABLES = (
    "CheXpert-v1.0-small/train.csv",
    "CheXpert-v1.0/train.csv",
    "train.csv",
    "chexpert_train.csv.gz",
)
SPLIT_FILE_COLUMNS = ("Path", "class", "split")


def read_labels(path: str | os.PathLike) -> pd.DataFrame:
    """Read a CheXpert label table and check it has ``Path``, ``Frontal/Lateral`` and the five classes."""
    return common.read_table(path, required=("Path", "Frontal/Lateral", *CLASSES))


def select_5x200(table: pd.DataFrame, *, per_class: int = 200, seed: int = 0, uncertain: str = "zeros") -> pd.DataFrame:
    """Draw ``per_class`` frontal rows per class with exactly that class positive.

    Args:
        table: CheXpert label table (``read_labels``).
        per_class: rows per class.
        seed: seed of ``numpy.random.default_rng``.
        uncertain: ``"zeros"``, ``"ones"`` or ``"ignore"`` (module docstring).

    Returns:
        A frame with columns ``Path`` and ``class``, ``5 * per_class`` rows, grouped
        by class in ``CLASSES`` order and sorted by ``Path`` within a class.

    Raises:
        common.DataPrepError: a class has fewer than ``per_class`` eligible rows.
    """
    common.require_columns(table, ("Path", "Frontal/Lateral", *CLASSES), "CheXpert label table")
    frontal = table[table["Frontal/Lateral"].astype(str).str.strip().str.lower() == "frontal"]
    values = common.apply_uncertain_policy(frontal[list(CLASSES)], uncertain)  # (rows, 5) of -1/0/1

    eligible = (values == 1).sum(axis=1) == 1
    if uncertain == "ignore":
        eligible &= ~(values == -1).any(axis=1)

    rng = np.random.default_rng(seed)
    chosen = []
    for name in CLASSES:
        candidates = np.sort(frontal.loc[eligible & (values[name] == 1), "Path"].to_numpy(dtype=str))
        if len(candidates) < per_class:
            raise common.DataPrepError(
                f"CheXpert 5x200: only {len(candidates)} eligible frontal images for {name} under "
                f"uncertain={uncertain!r}, {per_class} requested; lower per_class or use another policy"
            )
        picked = np.sort(rng.choice(len(candidates), size=per_class, replace=False))
        chosen.append(pd.DataFrame({"Path": candidates[picked], "class": name}))
    return pd.concat(chosen, ignore_index=True)


def build_manifest(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    labels: Optional[str | os.PathLike | pd.DataFrame] = None,
    per_class: int = 200,
    seed: int = 0,
    uncertain: str = "zeros",
    selection: Optional[str | os.PathLike] = None,
    split_file: Optional[str | os.PathLike] = None,
    missing_images: str = "error",
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> pd.DataFrame:
    """Build the CheXpert 5x200 manifest and its split file.

    Args:
        root: folder that the table's ``Path`` values are relative to (it contains
            ``CheXpert-v1.0-small/``); the CheXpert folder itself works too.
        out: path of the manifest CSV. Image paths are relative to its folder.
        labels: label table path, or an already read table; default: the first of
            ``LABEL_TABLES`` under ``root``.
        per_class, seed, uncertain: see ``select_5x200``.
        selection: a split file written earlier; its rows and splits are used as
            they are, and the table, seed and policy are not consulted.
        split_file: where to write the split file; default
            ``<out folder>/chexpert_5x200_split.csv``.
        missing_images: ``"error"`` (default, because skipping rows would change
            the fixed selection), ``"skip"`` or ``"ignore"``.
        fractions: train/val/test shares of patients.

    Returns:
        The manifest: ``5 * per_class`` rows with ``label`` and five one-hot columns.
    """
    root = Path(root)
    out = Path(out)
    if selection is not None:
        chosen = common.read_table(selection, required=SPLIT_FILE_COLUMNS)
    else:
        table = labels if isinstance(labels, pd.DataFrame) else read_labels(labels or _find_labels(root))
        chosen = select_5x200(table, per_class=per_class, seed=seed, uncertain=uncertain)

    frame = _describe(chosen, root)
    if selection is None:
        frame["split"] = split_by_patient(frame["patient_id"], fractions=fractions, seed=seed)
    else:
        frame["split"] = chosen["split"].to_numpy()
    frame.attrs["counts"] = {}
    frame = common.check_images(frame, missing_images=missing_images, source=DATASET, id_column="Path")

    split_path = Path(split_file) if split_file else out.parent / "chexpert_5x200_split.csv"
    split_path.parent.mkdir(parents=True, exist_ok=True)
    frame.rename(columns={"label": "class"})[list(SPLIT_FILE_COLUMNS)].to_csv(split_path, index=False)
    logger.info("chexpert_5x200: wrote the selection to %s", split_path)

    label_columns = [common.label_column_name(name) for name in CLASSES]
    return common.finish_manifest(
        frame, out, source=DATASET, label_columns=["label", *label_columns], extra_columns=("Path",)
    )


def _find_labels(root: Path) -> Path:
    return common.find_file(root, LABEL_TABLES, "CheXpert label table (train.csv)", DATASET)


def _describe(chosen: pd.DataFrame, root: Path) -> pd.DataFrame:
    """Add ids, text, one-hot labels and image paths to the ``Path``/``class`` rows."""
    unknown = sorted(set(chosen["class"]) - set(CLASSES))
    if unknown:
        raise common.DataPrepError(f"CheXpert 5x200 selection: unknown classes {unknown}; expected {list(CLASSES)}")

    parts = chosen["Path"].str.extract(r"(?P<patient>patient\d+)/(?P<study>study\d+)/")
    if parts["patient"].isna().any():
        bad = chosen.loc[parts["patient"].isna(), "Path"].iloc[0]
        raise common.DataPrepError(f"CheXpert Path without patientNNNNN/studyN: {bad}")

    frame = pd.DataFrame(
        {
            "Path": chosen["Path"].to_numpy(),
            "label": chosen["class"].to_numpy(),
            "patient_id": parts["patient"].to_numpy(),
            "study_id": (parts["patient"] + "/" + parts["study"]).to_numpy(),
            "text": [f"Frontal chest radiograph showing {CLASS_PHRASES[c]}." for c in chosen["class"]],
        }
    )
    for name in CLASSES:
        frame[common.label_column_name(name)] = (frame["label"] == name).astype(int)
    frame["source_path"] = [str(_image_path(root, p)) for p in frame["Path"]]
    return frame


def _image_path(root: Path, table_path: str) -> Path:
    """Resolve a table ``Path`` under ``root``, also when ``root`` is the CheXpert folder itself."""
    relative = Path(table_path)
    candidates = [root / relative, root / Path(*relative.parts[1:])]
    if relative.parts and relative.parts[0] == "CheXpert-v1.0-small":
        candidates.append(root / "CheXpert-v1.0" / Path(*relative.parts[1:]))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return candidates[0]
