"""Checkpoints: atomic writes, rotation, provenance sidecars, and recovery from corrupt files.

A checkpoint ``checkpoints/step-000050.pt`` contains everything an exact resume needs:
student and teacher weights, the queues and their pointers, optimizer, scheduler and
gradient-scaler states, the random generators, the step, the history so far, the
config and the model spec (so the model is rebuilt without network access). Beside it,
``step-000050.json`` records the config, package versions and git commit in a form a
person can read.

Writes go to a temporary file in the same folder, are flushed to disk, and are then
renamed over the final name, so a crash mid-write leaves the previous checkpoints
intact and never a half-written file under a checkpoint name.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)\.pt$")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """No usable checkpoint: none found, or every candidate is corrupt."""


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint written after ``step`` optimizer steps."""
    return f"step-{step:06d}.pt"


def save_checkpoint(state: dict[str, Any], folder: str | os.PathLike, step: int, keep: int,
                    provenance: dict[str, Any] | None = None) -> Path:
    """Write ``state`` atomically as ``folder/step-NNNNNN.pt`` and keep only the newest ``keep``.

    Returns:
        The path of the new checkpoint.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / checkpoint_name(step)
    _atomic_write(path, lambda stream: torch.save({**state, "format": FORMAT_VERSION}, stream))
    if provenance is not None:
        text = json.dumps(provenance, indent=2, default=str).encode("utf-8")
        _atomic_write(path.with_suffix(".json"), lambda stream: stream.write(text))
    _remove_old(folder, keep)
    return path


def _atomic_write(path: Path, write) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _remove_old(folder: Path, keep: int) -> None:
    for path in list_checkpoints(folder)[keep:]:
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Checkpoints in ``folder``, newest (highest step) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / name) for name in os.listdir(folder) if (m := CHECKPOINT_PATTERN.match(name))]
    return [path for _, path in sorted(found, reverse=True)]


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one checkpoint file.

    Checkpoints hold NumPy random states and Python objects, so they are unpickled in
    full (``weights_only=False``): load only checkpoints you or your own runs wrote.

    Raises:
        CheckpointError: the file is missing, truncated or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch.load raises many types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path} is not an msd_core checkpoint (no 'model' or 'step' entry)")
    return state


def find_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]]:
    """Load the checkpoint at ``path``, or the newest readable one in a run or checkpoint folder.

    A corrupt or partial newest checkpoint is skipped with a warning that names it and
    the older checkpoint used instead.

    Raises:
        CheckpointError: nothing usable was found.
    """
    path = Path(path)
    if path.is_file():
        return path, read_checkpoint(path, map_location)
    if path.suffix == ".pt":
        raise CheckpointError(f"checkpoint file not found: {path}; pass an existing step-*.pt file, or the run "
                              "folder to take its newest checkpoint")

    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    candidates = list_checkpoints(folder)
    if not candidates:
        raise CheckpointError(f"no checkpoint (step-*.pt) found in {folder}; train first, or pass a checkpoint file")

    failures = []
    for candidate in candidates:
        try:
            state = read_checkpoint(candidate, map_location)
        except CheckpointError as error:
            failures.append((candidate, error))
            continue
        for bad, error in failures:
            logger.warning("checkpoint %s is corrupt or partial (%s); using the previous one, %s instead",
                           bad, error, candidate)
        return candidate, state
    raise CheckpointError(f"every checkpoint in {folder} is unreadable: " +
                          "; ".join(f"{p.name}: {e}" for p, e in failures))
