"""Helpers shared by the benchmark scripts: configs, the data set, the machine record, tables."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from msd_core.config import TrainConfig, get_preset

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]

# A stand-in for the colab-t4 preset that needs no download: the same architectures as
# microsoft/resnet-50 (bottleneck ResNet, depths 3-4-6-3) and a BERT-base text tower
# (12 layers of width 768, as in Bio_ClinicalBERT), with random weights. Step time and
# memory depend on the shapes, not on the weights. The one difference is the
# vocabulary: the WordPiece vocabulary trained on PhantomCXR reports is far smaller
# than Bio_ClinicalBERT's 28,996 tokens, which ``OFFLINE_T4_MISSING_PARAMETERS`` counts.
OFFLINE_T4 = "colab-t4-offline"
_RESNET50 = dict(num_channels=3, embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                 layer_type="bottleneck")
_BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
BIO_CLINICAL_BERT_VOCAB = 28996


def benchmark_config(preset: str, **overrides: Any) -> TrainConfig:
    """Return a preset's config with ``overrides``; ``"colab-t4-offline"`` is the download-free T4 stand-in."""
    if preset == OFFLINE_T4:
        stand_in = dict(image_model="resnet", image_model_kwargs=_RESNET50, text_model="bert",
                        text_model_kwargs=_BERT_BASE, vocab_size=BIO_CLINICAL_BERT_VOCAB)
        return get_preset("colab-t4", **{**stand_in, **overrides}).replace(preset=OFFLINE_T4)
    return get_preset(preset, **overrides)


def offline_t4_missing_parameters(model) -> int:
    """Count the parameters the offline stand-in lacks against the real colab-t4 towers (its smaller vocabulary)."""
    embeddings = model.text_encoder.embeddings.word_embeddings
    return max(0, BIO_CLINICAL_BERT_VOCAB - embeddings.num_embeddings) * embeddings.embedding_dim


def prepare_phantom(folder: str | os.PathLike, pairs: int, image_size: int, seed: int = 0) -> Path:
    """Generate (or reuse) a PhantomCXR set under ``folder`` and return its manifest path."""
    from msd_core.phantom import generate_phantom

    return generate_phantom(folder, n_pairs=pairs, image_size=image_size, seed=seed, overwrite=True, progress=False)


def load_average() -> tuple[float, float, float] | None:
    """Return the 1, 5 and 15 minute load averages, or None where the platform has none."""
    try:
        return tuple(round(value, 2) for value in os.getloadavg())
    except OSError:
        return None


def cpu_model() -> str:
    """Return the CPU's model name from /proc/cpuinfo, else ``platform``'s processor name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Return the number of CPU cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_record(device: str) -> dict[str, Any]:
    """Describe the machine the numbers come from: CPU, cores, threads, GPU, versions, load and time."""
    import torch

    from msd_core import runtime

    record = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "device": device,
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "git_commit": runtime.git_commit(REPO_ROOT),
    }
    record.update(runtime.package_versions())
    return record


def parse_int_list(text: str) -> list[int]:
    """Parse "1,2,4" into [1, 2, 4]; an empty string gives []."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"invalid integer list {text!r}: write comma-separated integers such as 1,2,4") from None


def parse_choices(text: str, allowed: Sequence[str], option: str) -> list[str]:
    """Parse "a,b" into ["a", "b"], raising on a name outside ``allowed``."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ValueError(f"invalid {option} {unknown}: choose from {list(allowed)}")
    return names


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """Format a DataFrame as a GitHub Markdown table, floats rounded to ``digits`` significant places."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "n/a" if value != value else f"{value:.{digits}g}"
        return str(value)

    header = "| " + " | ".join(str(column) for column in frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = ["| " + " | ".join(cell(value) for value in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def write_json(path: str | os.PathLike, value: Any) -> Path:
    """Write ``value`` as indented JSON and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def write_markdown(path: str | os.PathLike, sections: Iterable[tuple[str, str]]) -> Path:
    """Write ``(title, body)`` sections as one Markdown file and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(f"## {title}\n\n{body}" for title, body in sections)
    path.write_text(text + "\n", encoding="utf-8")
    return path
