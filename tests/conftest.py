"""Shared fixtures: a tiny manifest of made-up image-text pairs, and the real-data folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

# Keep torch and tokenizers to one thread each: tests are small, and two cores are shared.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The real-data folder: MSD_REAL_DATA when set, else shared/data beside the repository.
SHARED_DATA = Path(os.environ.get("MSD_REAL_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")

WORDS = ["heart", "enlarged", "effusion", "left", "right", "pneumothorax", "clear", "lungs", "nodule", "normal"]


def requires_shared_data(*parts: str) -> Path:
    """Return a path under the real-data folder, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (set MSD_REAL_DATA to the real-data folder; "
                    "the README's Tests section lists what it holds)")
    return path


def write_tiny_manifest(folder: Path, pairs: int = 48, size: int = 32, seed: int = 0) -> Path:
    """Write ``pairs`` random greyscale images with short made-up reports and a manifest."""
    rng = np.random.default_rng(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(pairs):
        name = f"images/pair{index:04d}.png"
        pixels = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / name)
        words = rng.choice(WORDS, size=6)
        rows.append({
            "image_path": name,
            "text": "FINDINGS: " + " ".join(words) + ". IMPRESSION: " + words[0] + ".",
            "split": "train" if index % 6 else "test",
            "study_id": f"s{index:04d}",
            "patient_id": f"p{index // 2:04d}",
            "finding": str(words[0]),
        })
    path = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def tiny_manifest(tmp_path: Path) -> Path:
    """A 48-pair manifest of random 32 px images (40 train, 8 test)."""
    return write_tiny_manifest(tmp_path / "tiny")


@pytest.fixture(scope="session")
def cxr_notes_manifest(tmp_path_factory) -> Path:
    """A manifest of the 44 real chest X-rays and their clinical notes, split by patient."""
    root = requires_shared_data("cxr-notes-44")
    from data_prep import folder_csv

    out = tmp_path_factory.mktemp("cxr-notes-44") / "manifest.csv"
    folder_csv.build_manifest(root, out, text_columns=["clinical_notes"], patient_column="patient_id",
                              multilabel_column="finding")
    return out
