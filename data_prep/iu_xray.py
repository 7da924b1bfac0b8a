"""IU X-ray (Indiana University chest X-ray collection, Open-i) to a manifest.

Files needed (public, CC BY-NC-ND 4.0), all in ``--root``:

- ``NLMCXR_reports.tgz``: the report archive as published, one XML file per study
  with COMPARISON, INDICATION, FINDINGS, IMPRESSION, MeSH terms and the ids of the
  study's images. It is read in place, without extracting. An extracted folder of
  XML files works too (``--reports``).
- ``NLMCXR_png/``: the extracted ``NLMCXR_png.tgz``, files named
  ``CXR<id>_IM-<nnnn>-<nnnn>.png``. Images are found by name anywhere under it.
- ``nlmcxr_dicom_metadata.csv.gz`` (optional): DICOM header fields per image id,
  used for the view position.

Both archives come from https://openi.nlm.nih.gov/imgs/collections/ , and
``python -m data_prep iu_xray --download`` fetches them into the cache folder.

Policies:

- Text: FINDINGS followed by IMPRESSION; a report with only one of them keeps that
  one. A report with neither is dropped and counted (``empty_text``).
- Images: one manifest row per chosen frontal image of a study. A study without images
  is dropped and counted (``no_image``). The view comes from the metadata's
  ``View Position`` (PA or AP is frontal; LL, RL, LATERAL are lateral). Where the
  view is missing (about a third of the images have none) the fallback
  ``unknown_view="first"`` takes the first image listed in the report as frontal
  and the others as lateral. In the studies whose views are all known, the first
  listed image is frontal in about 95% of them. ``"frontal"`` keeps every image of
  unknown view, and ``"lateral"`` drops them all.
- One frontal image per study by default (``frontal_per_study="first"``: the first
  listed image that the rules above call frontal). The metadata cannot be trusted
  for more, because one CR device labels both images of about 1,100 two-image
  studies ``PA``. The second image of each such pair has the processing code
  (60003) that the device's few ``LL`` images carry, so it is most likely lateral.
  ``frontal_per_study="all"`` keeps every image called frontal.
- Patients: the collection is de-identified per study, and the metadata's
  ``Patient ID`` equals the report id, so each study counts as its own patient
  (``patient_id == study_id``). Splits are by patient.
- Labels: 0/1 columns from the report's MeSH major terms, matched on the term's
  head (the part before the first ``/``), see ``LABEL_TERMS``. ``normal`` is the
  MeSH term "normal". Automatic (machine-extracted) MeSH terms are kept in the
  ``mesh_automatic`` column and used for labels only with
  ``use_automatic_mesh=True``.
- Report text keeps the collection's ``XXXX`` de-identification marks as they are.
"""

from __future__ import annotations

import logging
import os
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

import pandas as pd
from tqdm.auto import tqdm

from data_prep import common
from msd_core.manifest import split_by_patient

logger = logging.getLogger(__name__)

DATASET = "iu_xray"
REPORTS_URL = "https://openi.nlm.nih.gov/imgs/collections/NLMCXR_reports.tgz"
IMAGES_URL = "https://openi.nlm.nih.gov/imgs/collections/NLMCXR_png.tgz"
REPORT_SECTIONS = ("COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION")
FRONTAL_VIEWS = ("PA", "AP")
UNKNOWN_VIEW_POLICIES = ("first", "frontal", "lateral")
FRONTAL_PER_STUDY = ("first", "all")

# Manifest label column -> MeSH term heads (lower case) that set it. The heads are
# the most frequent findings among the archive's 3,955 reports.
LABEL_TERMS = {
    "normal": ("normal",),
    "cardiomegaly": ("cardiomegaly",),
    "effusion": ("pleural effusion",),
    "opacity": ("opacity", "density", "airspace disease"),
    "atelectasis": ("pulmonary atelectasis", "atelectasis"),
    "consolidation": ("consolidation",),
    "pneumothorax": ("pneumothorax",),
    "nodule": ("nodule",),
    "mass": ("mass",),
    "edema": ("pulmonary edema", "edema"),
    "emphysema": ("emphysema", "pulmonary emphysema"),
    "pneumonia": ("pneumonia",),
    "infiltrate": ("infiltrate",),
    "granuloma": ("calcified granuloma", "granuloma", "granulomatous disease"),
    "calcinosis": ("calcinosis",),
    "scarring": ("cicatrix",),
    "congestion": ("pulmonary congestion",),
    "copd": ("pulmonary disease, chronic obstructive",),
    "fibrosis": ("pulmonary fibrosis",),
    "hiatal_hernia": ("hernia, hiatal",),
    "fracture": ("fractures, bone",),
    "scoliosis": ("scoliosis",),
    "support_device": (
        "catheters, indwelling",
        "implanted medical device",
        "surgical instruments",
        "tube, inserted",
        "medical device",
        "stents",
    ),
}

EXTRA_COLUMNS = ("findings", "impression", "indication", "comparison", "mesh_major", "mesh_automatic", "view_position")


def parse_reports(reports: str | os.PathLike) -> pd.DataFrame:
    """Parse every XML report of the archive (``.tgz``) or of a folder of XML files.

    Returns:
        One row per report, sorted by numeric id, with columns ``study_id`` (for
        example ``"CXR1"``), ``comparison``, ``indication``, ``findings``,
        ``impression`` (whitespace collapsed, ``""`` where empty), ``mesh_major`` and
        ``mesh_automatic`` (lists of terms as written), and ``image_ids`` (list, in
        report order).

    Raises:
        FileNotFoundError: ``reports`` does not exist.
        common.DataPrepError: an XML file cannot be parsed; the message names it.
    """
    reports = Path(reports)
    if not reports.exists():
        raise FileNotFoundError(f"IU X-ray reports not found: {reports}")

    progress = tqdm(_iter_xml(reports), desc="IU X-ray reports", unit="report")
    rows = [_parse_report(name, data) for name, data in progress]
    frame = pd.DataFrame(rows)
    frame["_number"] = frame["study_id"].str.extract(r"(\d+)", expand=False).astype(int)
    return frame.sort_values("_number").drop(columns="_number").reset_index(drop=True)


def _iter_xml(reports: Path) -> Iterator[Tuple[str, bytes]]:
    if reports.is_dir():
        for path in sorted(reports.rglob("*.xml")):
            yield str(path), path.read_bytes()
        return

    with tarfile.open(reports, "r:*") as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".xml"):
                yield f"{reports}:{member.name}", archive.extractfile(member).read()


def _parse_report(name: str, data: bytes) -> dict:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as error:
        raise common.DataPrepError(f"cannot parse IU X-ray report {name}: {error}") from None

    uid = root.find("uId")
    study_id = uid.get("id") if uid is not None else Path(name.split(":")[-1]).stem
    sections = {s: "" for s in REPORT_SECTIONS}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").upper()
        if label in sections:
            sections[label] = common.normalise_whitespace("".join(node.itertext()))

    return {
        "study_id": study_id,
        **{section.lower(): text for section, text in sections.items()},
        "mesh_major": [common.normalise_whitespace(n.text) for n in root.iter("major") if n.text],
        "mesh_automatic": [common.normalise_whitespace(n.text) for n in root.iter("automatic") if n.text],
        "image_ids": [n.get("id") for n in root.iter("parentImage") if n.get("id")],
    }


def mesh_labels(terms: Sequence[str]) -> dict:
    """Return ``{label: 0 or 1}`` for every label of ``LABEL_TERMS`` from MeSH terms.

    A term such as ``"Opacity/lung/upper lobe/right"`` matches on its head
    ``"opacity"``, case-insensitively.
    """
    heads = {term.split("/")[0].strip().lower() for term in terms}
    return {label: int(any(head in heads for head in wanted)) for label, wanted in LABEL_TERMS.items()}


def read_view_positions(metadata: Optional[str | os.PathLike]) -> dict:
    """Return ``{image_id: view position}`` from the DICOM metadata table, or ``{}`` without one.

    Rows whose ``View Position`` is blank are left out, so their images count as
    unknown view.
    """
    if metadata is None:
        return {}
    table = common.read_table(metadata, required=("imageid", "View Position"), usecols=["imageid", "View Position"])
    table = table.dropna(subset=["View Position"])
    return dict(zip(table["imageid"], table["View Position"].str.strip().str.upper()))


def select_frontal(image_ids: Sequence[str], views: dict, unknown_view: str, frontal_per_study: str = "first") -> list:
    """Return ``(image_id, view)`` pairs of the frontal images of one study.

    ``view`` is the metadata's view position, or ``""`` where it is unknown. See the
    module docstring for the ``unknown_view`` and ``frontal_per_study`` policies.
    """
    common.check_choice("frontal_per_study", frontal_per_study, FRONTAL_PER_STUDY)
    chosen = []
    for index, image_id in enumerate(image_ids):
        view = views.get(image_id, "")
        if view:
            if view in FRONTAL_VIEWS:
                chosen.append((image_id, view))
        elif unknown_view == "frontal" or (unknown_view == "first" and index == 0):
            chosen.append((image_id, ""))
    return chosen[:1] if frontal_per_study == "first" else chosen


def build_manifest(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    reports: Optional[str | os.PathLike] = None,
    images_dir: Optional[str | os.PathLike] = None,
    metadata: Optional[str | os.PathLike] = None,
    unknown_view: str = "first",
    frontal_per_study: str = "first",
    use_automatic_mesh: bool = False,
    missing_images: str = "skip",
    on_empty: str = "drop",
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> pd.DataFrame:
    """Build the IU X-ray manifest and write it to ``out``.

    Args:
        root: folder with ``NLMCXR_reports.tgz``, ``NLMCXR_png/`` and, optionally,
            ``nlmcxr_dicom_metadata.csv.gz``.
        out: path of the manifest CSV. Image paths are relative to its folder.
        reports: report archive or folder, if not ``root/NLMCXR_reports.tgz``.
        images_dir: folder searched for ``<image id>.png``, if not ``root/NLMCXR_png``
            (or ``root`` when that folder is absent).
        metadata: view-position table, if not ``root/nlmcxr_dicom_metadata.csv.gz``.
            Without one, every view is unknown and ``unknown_view`` decides.
        unknown_view: ``"first"``, ``"frontal"`` or ``"lateral"`` (module docstring).
        frontal_per_study: ``"first"`` or ``"all"`` (module docstring).
        use_automatic_mesh: also set labels from the automatic MeSH terms.
        missing_images: ``"skip"``, ``"error"`` or ``"ignore"`` (see ``data_prep.common``).
        on_empty: ``"drop"`` or ``"error"`` for reports with neither FINDINGS nor IMPRESSION.
        fractions: train/val/test shares of patients.
        seed: seed of the patient split.

    Returns:
        The manifest, one row per frontal image, with label columns of
        ``LABEL_TERMS`` and the report sections. ``attrs["counts"]`` contains the
        number of reports parsed and of rows dropped per reason.
    """
    common.check_choice("unknown_view", unknown_view, UNKNOWN_VIEW_POLICIES)
    common.check_choice("frontal_per_study", frontal_per_study, FRONTAL_PER_STUDY)
    root = Path(root)
    if reports is None:
        reports = common.find_file(root, ("NLMCXR_reports.tgz", "ecgen-radiology"), "IU X-ray reports", DATASET)
    reports = Path(reports)
    if images_dir is None:
        images_dir = root / "NLMCXR_png" if (root / "NLMCXR_png").is_dir() else root
    images_dir = Path(images_dir)
    metadata = _metadata_path(root, metadata)

    studies = parse_reports(reports)
    studies["text"] = [common.join_sections(f, i) for f, i in zip(studies["findings"], studies["impression"])]
    studies.attrs["counts"] = {"reports": len(studies)}
    studies = common.drop_empty_text(studies, on_empty=on_empty, source=str(reports), id_column="study_id")

    views = read_view_positions(metadata)
    rows, no_frontal = _image_rows(studies, views, unknown_view, frontal_per_study, use_automatic_mesh)
    frame = pd.DataFrame(rows)
    frame.attrs = studies.attrs
    common.add_count(frame, "no_image", int((studies["image_ids"].map(len) == 0).sum()))
    common.add_count(frame, "no_frontal_image", no_frontal)
    no_image = frame.attrs["counts"]["no_image"]
    logger.info("iu_xray: %d report(s) list no image, %d list images but no frontal one", no_image, no_frontal)

    # Split before the image check, so that a study's split does not depend on which
    # images have been downloaded.
    frame["patient_id"] = frame["study_id"]
    frame["split"] = split_by_patient(frame["patient_id"], fractions=fractions, seed=seed)
    frame["source_path"] = _image_paths(frame["image_id"], images_dir, missing_images)
    frame = common.check_images(frame, missing_images=missing_images, source=str(reports), id_column="study_id")
    return common.finish_manifest(
        frame, out, source="iu_xray", label_columns=tuple(LABEL_TERMS), extra_columns=EXTRA_COLUMNS
    )


def _metadata_path(root: Path, metadata: Optional[str | os.PathLike]) -> Optional[Path]:
    if metadata:
        return Path(metadata)
    default = root / "nlmcxr_dicom_metadata.csv.gz"
    if default.is_file():
        return default
    logger.warning("no %s; every view is unknown, so unknown-view images follow the fallback policy", default)
    return None


def _image_rows(
    studies: pd.DataFrame, views: dict, unknown_view: str, frontal_per_study: str, use_automatic_mesh: bool
) -> Tuple[list, int]:
    """Return one row per frontal image, and the number of studies with images but no frontal one."""
    rows = []
    no_frontal = 0
    for study in studies.itertuples(index=False):
        terms = list(study.mesh_major) + (list(study.mesh_automatic) if use_automatic_mesh else [])
        labels = mesh_labels(terms)
        frontal = select_frontal(study.image_ids, views, unknown_view, frontal_per_study)
        if study.image_ids and not frontal:
            no_frontal += 1
        for image_id, view in frontal:
            rows.append(
                {
                    "image_id": image_id,
                    "study_id": study.study_id,
                    "text": study.text,
                    **labels,
                    "findings": study.findings,
                    "impression": study.impression,
                    "indication": study.indication,
                    "comparison": study.comparison,
                    "mesh_major": "; ".join(study.mesh_major),
                    "mesh_automatic": "; ".join(study.mesh_automatic),
                    "view_position": view,
                }
            )
    return rows, no_frontal


def _image_paths(image_ids: pd.Series, images_dir: Path, missing_images: str) -> list:
    """Find ``<image id>.png`` anywhere under ``images_dir``; unfound ids get the flat path."""
    found = {}
    if images_dir.is_dir():
        for path in images_dir.rglob("*.png"):
            found.setdefault(path.stem, path)
    elif missing_images != "ignore":
        logger.warning("image folder %s does not exist", images_dir)
    return [str(found.get(image_id, images_dir / f"{image_id}.png")) for image_id in image_ids]


def download() -> Path:
    """Download both IU X-ray archives into the cache and extract the PNG images.

    Returns:
        The dataset's cache folder ``MSD_DATA_DIR/iu_xray``, holding
        ``NLMCXR_reports.tgz`` and ``NLMCXR_png/``; pass it as ``root``.
    """
    from data_prep.download import fetch

    # NOTE: Open-i publishes no checksums for these archives, so they are not verified.
    reports = fetch(REPORTS_URL, "NLMCXR_reports.tgz", dataset=DATASET)
    images = fetch(IMAGES_URL, "NLMCXR_png.tgz", dataset=DATASET)

    png_dir = reports.parent / "NLMCXR_png"
    if not png_dir.is_dir() or not any(png_dir.iterdir()):
        png_dir.mkdir(exist_ok=True)
        logger.info("extracting %s into %s", images, png_dir)
        with tarfile.open(images, "r:*") as archive:
            # The "data" filter rejects absolute paths and links leaving png_dir. Python
            # releases before 3.10.12 and 3.11.4 lack it and extract without the check.
            if hasattr(tarfile, "data_filter"):
                archive.extractall(png_dir, filter="data")
            else:
                archive.extractall(png_dir)
    return reports.parent
