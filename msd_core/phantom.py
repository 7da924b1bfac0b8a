"""PhantomCXR: a seeded generator of synthetic chest radiographs with matching reports.

Every study is a schematic frontal (PA) chest radiograph drawn with numpy. It shows a
body with soft-tissue density, two dark lung fields with vessel markings, mediastinum
and heart shadow, trachea, spine, ribs, clavicles, diaphragm domes and costophrenic
angles. Exposure and noise vary from study to study. A study shows no finding or one
primary finding, sometimes with a second one (a support device, or a pleural effusion
beside cardiomegaly or consolidation). Its report, written from the templates in ``msd_core.phantom_reports``,
describes exactly what was drawn, so labels, images and text always agree.

Images follow the radiological convention: the patient faces the viewer, so the
patient's left side is on the image's right. ``laterality`` and every side word in the
reports name the patient's side.

Reproducibility: each study draws from its own ``numpy.random.Generator`` seeded by
``SeedSequence(seed, spawn_key=(0, index))``, and each patient from one seeded by
``(1, patient_index)``, so the same seed gives the same manifest and the same PNG bytes
in any process (for the same numpy, zlib and Pillow builds). The global numpy and
``random`` states are never touched. A larger ``n_pairs`` with the same seed keeps the
first studies unchanged, but the train/val/test assignment is recomputed over all
patients.

Run ``python -m msd_core.phantom --out data/phantomcxr`` to write a dataset.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from .manifest import split_by_patient, write_manifest
from .phantom_draw import draw_study
from .phantom_reports import format_report, write_report

logger = logging.getLogger(__name__)

FINDINGS = (
    "no_finding",
    "cardiomegaly",
    "pleural_effusion",
    "pneumothorax",
    "consolidation",
    "nodule",
    "atelectasis",
    "support_device",
)
"""Finding names: the values of the ``finding`` column and the 0/1 label column names."""

# Bump whenever a change alters images, reports or the manifest for the same parameters.
GENERATOR_VERSION = 1

SIDECAR_NAME = "phantom.json"
MANIFEST_NAME = "manifest.csv"
IMAGE_FOLDER = "images"
MIN_IMAGE_SIZE = 32

# Relative frequency of each primary finding. No finding is twice as common as each other class.
PRIMARY_WEIGHTS = {name: (2.0 if name == "no_finding" else 1.0) for name in FINDINGS}
SECONDARY_DEVICE_PROBABILITY = 0.2
SECONDARY_EFFUSION_PROBABILITY = 0.2
MAX_STUDIES_PER_PATIENT = 3

SEVERITIES = ("mild", "moderate", "severe")
ZONES = ("upper", "middle", "lower")
DEVICES = ("endotracheal_tube", "jugular_catheter", "subclavian_catheter", "pacemaker", "enteric_tube")

_STUDY_STREAM, _PATIENT_STREAM, _SCHEDULE_STREAM = 0, 1, 2
_STUDY_FILE_PATTERN = re.compile(r"s\d+\.png")


@dataclass(frozen=True)
class Finding:
    """One drawn abnormality and the words that describe it.

    ``laterality`` is the patient's side ("left", "right", "bilateral" or "none").
    ``extent`` in [0, 1) places the finding within its severity band (a larger effusion,
    a larger nodule), so drawing and report use the same number.
    """

    name: str
    laterality: str = "none"
    severity: str = "none"
    zone: str = "none"
    device: str = "none"
    extent: float = 0.0


@dataclass(frozen=True)
class Patient:
    """Body habitus and exposure traits shared by all studies of one synthetic patient.

    Lengths are in image half-widths: the image spans -1 to 1 in both directions.
    """

    patient_id: str
    body_half_width: float  # half-width of the torso at the shoulders
    lung_scale: float  # lateral extent of the lungs relative to an average chest
    apex_level: float  # vertical position of the lung apices (negative is up)
    diaphragm_level: float  # vertical position of the right hemidiaphragm dome, laterally
    heart_ratio: float  # normal cardiothoracic ratio of this patient
    soft_tissue_density: float  # brightness of the body before exposure mapping
    lung_density: float  # brightness of aerated lung before exposure mapping
    exposure_contrast: float
    exposure_gamma: float


@dataclass(frozen=True)
class Study:
    """One image-report pair: its ids, its patient, what is drawn and how it was exposed."""

    study_id: str
    index: int
    patient: Patient
    findings: tuple[Finding, ...] = field(default_factory=tuple)
    inspiration: float = 0.0  # shift of both domes, positive is lower (deeper breath)
    shift: float = 0.0  # horizontal positioning offset of the whole chest
    brightness: float = 0.0  # additive exposure offset
    noise_sigma: float = 0.02  # standard deviation of pixel noise, in [0, 1] intensity units

    @property
    def primary(self) -> str:
        """Name of the primary finding, or "no_finding" when nothing is drawn."""
        return self.findings[0].name if self.findings else "no_finding"


def study_rng(seed: int, index: int) -> np.random.Generator:
    """Return the random generator of study ``index``; independent of every other study."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_STUDY_STREAM, index)))


def sample_patient(seed: int, patient_index: int) -> Patient:
    """Draw the habitus and exposure traits of one patient from its own generator."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_PATIENT_STREAM, patient_index)))
    return Patient(
        patient_id=f"p{patient_index:05d}",
        body_half_width=float(rng.uniform(0.84, 0.97)),
        lung_scale=float(rng.uniform(0.9, 1.03)),
        apex_level=float(rng.uniform(-0.8, -0.7)),
        diaphragm_level=float(rng.uniform(0.42, 0.56)),
        heart_ratio=float(rng.uniform(0.4, 0.47)),
        soft_tissue_density=float(rng.uniform(0.52, 0.64)),
        lung_density=float(rng.uniform(0.1, 0.2)),
        exposure_contrast=float(rng.uniform(0.9, 1.15)),
        exposure_gamma=float(rng.uniform(0.85, 1.2)),
    )


def assign_patients(seed: int, n_pairs: int) -> np.ndarray:
    """Return the patient index of each study: consecutive runs of 1 to 3 studies.

    Returns:
        (n_pairs,) int array, non-decreasing. The first studies keep their patients when
        ``n_pairs`` grows.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SCHEDULE_STREAM,)))
    studies_per_patient = rng.integers(1, MAX_STUDIES_PER_PATIENT + 1, size=n_pairs)
    return np.repeat(np.arange(n_pairs), studies_per_patient)[:n_pairs]


def sample_findings(rng: np.random.Generator) -> tuple[Finding, ...]:
    """Draw the primary finding and, sometimes, a secondary one.

    Returns:
        An empty tuple for a normal study, else the primary finding first.
    """
    names = list(FINDINGS)
    weights = np.array([PRIMARY_WEIGHTS[name] for name in names])
    primary_name = names[rng.choice(len(names), p=weights / weights.sum())]
    if primary_name == "no_finding":
        return ()

    findings = [_sample_finding(primary_name, rng)]
    if primary_name in ("cardiomegaly", "consolidation") and rng.random() < SECONDARY_EFFUSION_PROBABILITY:
        findings.append(_sample_finding("pleural_effusion", rng))
    if primary_name != "support_device" and rng.random() < SECONDARY_DEVICE_PROBABILITY:
        findings.append(_sample_finding("support_device", rng))
    return tuple(findings)


def _sample_finding(name: str, rng: np.random.Generator) -> Finding:
    """Draw laterality, severity, zone, device and extent that make sense for ``name``."""
    severity = str(rng.choice(SEVERITIES))
    extent = float(rng.random())
    side = str(rng.choice(("left", "right")))

    if name == "cardiomegaly":
        return Finding(name, severity=severity, extent=extent)
    if name == "pleural_effusion":
        laterality = str(rng.choice(("left", "right", "bilateral"), p=(0.35, 0.35, 0.3)))
        return Finding(name, laterality=laterality, severity=severity, extent=extent)
    if name == "pneumothorax":
        return Finding(name, laterality=side, severity=severity, extent=extent)
    if name in ("consolidation", "nodule"):
        # Nodules come in two size bands only; "severe" would be a mass.
        if name == "nodule":
            severity = str(rng.choice(SEVERITIES[:2]))
        return Finding(name, laterality=side, severity=severity, zone=str(rng.choice(ZONES)), extent=extent)
    if name == "atelectasis":
        laterality = str(rng.choice(("left", "right", "bilateral"), p=(0.4, 0.4, 0.2)))
        return Finding(name, laterality=laterality, severity=severity, zone="lower", extent=extent)
    if name == "support_device":
        return _sample_device(rng, extent)
    raise ValueError(f"unknown finding {name!r}; expected one of {FINDINGS}")


def _sample_device(rng: np.random.Generator, extent: float) -> Finding:
    device = str(rng.choice(DEVICES))
    laterality = {
        "endotracheal_tube": "none",
        "enteric_tube": "none",
        "jugular_catheter": str(rng.choice(("right", "left"), p=(0.8, 0.2))),
        "subclavian_catheter": str(rng.choice(("right", "left"))),
        "pacemaker": str(rng.choice(("left", "right"), p=(0.85, 0.15))),
    }[device]
    return Finding("support_device", laterality=laterality, device=device, extent=extent)


def sample_study(seed: int, index: int, patient: Patient, id_width: int = 6) -> tuple[Study, np.random.Generator]:
    """Draw study ``index`` of ``patient``.

    Returns:
        The study and its generator, already advanced past the study's own draws; the
        caller uses it for drawing and report wording, in that order.
    """
    rng = study_rng(seed, index)
    findings = sample_findings(rng)
    study = Study(
        study_id=f"s{index:0{id_width}d}",
        index=index,
        patient=patient,
        findings=findings,
        inspiration=float(rng.uniform(-0.04, 0.04)),
        shift=float(rng.uniform(-0.03, 0.03)),
        brightness=float(rng.normal(0.0, 0.025)),
        noise_sigma=float(rng.uniform(0.012, 0.028)),
    )
    return study, rng


def encode_png(pixels: np.ndarray) -> bytes:
    """Encode a (H, W) uint8 array as an 8-bit greyscale PNG without metadata chunks."""
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"expected a (H, W) uint8 array, got shape {pixels.shape} and dtype {pixels.dtype}")
    buffer = io.BytesIO()
    # A 2-D uint8 array becomes a mode "L" image; Pillow adds no time or text chunks.
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def manifest_row(study: Study, image_path: str, findings_text: str, impression_text: str) -> dict:
    """Build the manifest row of one study (without its split)."""
    primary = study.findings[0] if study.findings else Finding("no_finding")
    present = {f.name for f in study.findings} or {"no_finding"}
    row = {
        "image_path": image_path,
        "text": format_report(findings_text, impression_text),
        "findings": findings_text,
        "impression": impression_text,
        "split": "",
        "study_id": study.study_id,
        "patient_id": study.patient.patient_id,
        "finding": primary.name,
        "laterality": primary.laterality,
        "severity": primary.severity,
    }
    for name in FINDINGS:
        row[name] = int(name in present)
    return row


def generate_phantom(
    out_dir: str | os.PathLike,
    n_pairs: int = 2000,
    image_size: int = 128,
    seed: int = 0,
    *,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a PhantomCXR dataset: PNG images, a manifest and a parameter sidecar.

    Files written under ``out_dir``: ``images/<study_id>.png`` (8-bit greyscale,
    ``image_size`` x ``image_size`` pixels), ``manifest.csv`` and ``phantom.json``.
    Manifest columns, in order: ``image_path`` (posix, relative to ``out_dir``),
    ``text`` ("FINDINGS: ... IMPRESSION: ..."), ``findings``, ``impression``, ``split``
    (train/val/test, by patient), ``study_id``, ``patient_id``, ``finding`` (the primary
    finding, one of ``FINDINGS``), ``laterality`` (the patient's left/right/bilateral or
    none), ``severity`` (mild/moderate/severe or none), then one 0/1 column per name in
    ``FINDINGS``.

    Idempotence: if ``phantom.json`` records the same parameters and generator version
    and the manifest exists, the call returns at once and rewrites nothing. If the folder
    contains a dataset made with other parameters (or files without a sidecar), the call
    raises ``FileExistsError`` naming the difference unless ``overwrite=True``, which
    regenerates it and deletes stale ``images/s<digits>.png`` files. The sidecar is
    written last, so an interrupted run leaves none and the next call starts over.

    Args:
        out_dir: dataset folder; created if missing.
        n_pairs: number of image-report pairs (studies), at least 1.
        image_size: image side in pixels, at least 32.
        seed: seed of every random draw; equal seeds give byte-identical files.
        split_fractions: shares of patients in train, val and test.
        overwrite: replace a dataset made with other parameters.
        progress: show a progress bar.

    Returns:
        Path of ``manifest.csv``.
    """
    out_dir = Path(out_dir)
    parameters = _check_parameters(n_pairs, image_size, seed, split_fractions)
    manifest_path = out_dir / MANIFEST_NAME
    if _is_up_to_date(out_dir, parameters, overwrite):
        logger.info("PhantomCXR in %s is up to date; nothing to do", out_dir)
        return manifest_path

    image_dir = out_dir / IMAGE_FOLDER
    image_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SIDECAR_NAME).unlink(missing_ok=True)
    _remove_stale_images(image_dir, n_pairs)
    logger.info("writing %d PhantomCXR pairs at %d px (seed %d) to %s", n_pairs, image_size, seed, out_dir)

    rows = _write_studies(image_dir, n_pairs, image_size, seed, progress)
    frame = pd.DataFrame(rows)
    frame["split"] = split_by_patient(frame["patient_id"], fractions=parameters["split_fractions"], seed=seed)
    write_manifest(frame, manifest_path)
    _write_sidecar(out_dir, parameters)

    logger.info("wrote %s (%s)", manifest_path, frame["split"].value_counts().to_dict())
    return manifest_path


def _write_studies(image_dir: Path, n_pairs: int, image_size: int, seed: int, progress: bool) -> list[dict]:
    patient_of_study = assign_patients(seed, n_pairs)
    id_width = max(6, len(str(n_pairs - 1)))
    patients: dict[int, Patient] = {}
    rows = []
    for index in tqdm(range(n_pairs), desc="PhantomCXR", unit="pair", disable=not progress):
        patient_index = int(patient_of_study[index])
        if patient_index not in patients:
            patients[patient_index] = sample_patient(seed, patient_index)
        study, rng = sample_study(seed, index, patients[patient_index], id_width)

        pixels = draw_study(study, image_size, rng)
        findings_text, impression_text = write_report(study.findings, rng)
        image_name = f"{study.study_id}.png"
        (image_dir / image_name).write_bytes(encode_png(pixels))
        rows.append(manifest_row(study, f"{IMAGE_FOLDER}/{image_name}", findings_text, impression_text))
    return rows


def _check_parameters(n_pairs: int, image_size: int, seed: int, split_fractions: Sequence[float]) -> dict:
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, (int, np.integer)) or n_pairs < 1:
        raise ValueError(f"invalid n_pairs={n_pairs!r}: pass a positive integer")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"invalid image_size={image_size!r}: pass an integer of at least {MIN_IMAGE_SIZE} pixels, "
            "below which nodules and lines vanish"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"invalid seed={seed!r}: pass a non-negative integer")
    fractions = [float(f) for f in split_fractions]
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(
            f"invalid split_fractions={list(split_fractions)}: pass three non-negative shares "
            "(train, val, test) that sum to 1"
        )
    return {"n_pairs": int(n_pairs), "image_size": int(image_size), "seed": int(seed), "split_fractions": fractions}


def _is_up_to_date(out_dir: Path, parameters: dict, overwrite: bool) -> bool:
    """Return True when ``out_dir`` contains this exact dataset, False when it must be written.

    Raises:
        FileExistsError: ``out_dir`` contains a different or unrecorded dataset and
            ``overwrite`` is False.
    """
    sidecar_path = out_dir / SIDECAR_NAME
    manifest_path = out_dir / MANIFEST_NAME
    recorded = _read_sidecar(sidecar_path)
    if recorded is not None and manifest_path.is_file():
        differences = _describe_differences(recorded, parameters)
        if not differences:
            return True
        if not overwrite:
            raise FileExistsError(
                f"{out_dir} contains a PhantomCXR dataset made with {', '.join(differences)}; "
                "pass overwrite=True (--overwrite) to regenerate it, or choose another folder"
            )
        return False

    has_files = manifest_path.exists() or any((out_dir / IMAGE_FOLDER).glob("*.png"))
    if has_files and recorded is None and not overwrite:
        raise FileExistsError(
            f"{out_dir} contains {MANIFEST_NAME} or images but no readable {SIDECAR_NAME}, so its "
            "parameters are unknown; pass overwrite=True (--overwrite) to regenerate it, or choose another folder"
        )
    return False


def _describe_differences(recorded: dict, parameters: dict) -> list[str]:
    differences = []
    if recorded.get("version") != GENERATOR_VERSION:
        differences.append(f"generator version {recorded.get('version')!r} (current: {GENERATOR_VERSION})")
    stored = recorded.get("parameters", {})
    for name, value in parameters.items():
        if stored.get(name) != value:
            differences.append(f"{name}={stored.get(name)!r} (requested: {value!r})")
    return differences


def _read_sidecar(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        logger.warning("ignoring unreadable %s: %s", path, error)
        return None
    return content if isinstance(content, dict) else None


def _write_sidecar(out_dir: Path, parameters: dict) -> None:
    content = {"generator": "PhantomCXR", "version": GENERATOR_VERSION, "parameters": parameters}
    (out_dir / SIDECAR_NAME).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _remove_stale_images(image_dir: Path, n_pairs: int) -> None:
    """Delete study PNGs that the new dataset will not overwrite; leave other files alone."""
    id_width = max(6, len(str(n_pairs - 1)))
    keep = {f"s{index:0{id_width}d}.png" for index in range(n_pairs)}
    for path in image_dir.iterdir():
        if _STUDY_FILE_PATTERN.fullmatch(path.name) and path.name not in keep:
            path.unlink()


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser of ``python -m msd_core.phantom``."""
    parser = argparse.ArgumentParser(
        prog="python -m msd_core.phantom",
        description="Write the synthetic PhantomCXR chest X-ray dataset: PNG images, manifest.csv, phantom.json.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--n-pairs", type=int, default=2000, help="number of image-report pairs (default: 2000)")
    parser.add_argument("--image-size", type=int, default=128, help="image side in pixels (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; equal seeds give identical files (default: 0)")
    parser.add_argument(
        "--split-fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"),
        help="shares of patients per split (default: 0.8 0.1 0.1)",
    )
    parser.add_argument("--overwrite", action="store_true", help="regenerate a folder made with other parameters")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        manifest_path = generate_phantom(
            args.out, n_pairs=args.n_pairs, image_size=args.image_size, seed=args.seed,
            split_fractions=args.split_fractions, overwrite=args.overwrite, progress=not args.no_progress,
        )
    except (ValueError, FileExistsError) as error:
        logger.error("%s", error)
        return 2
    logger.info("manifest: %s", manifest_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
