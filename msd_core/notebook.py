"""Helpers for the numbered notebooks: run modes, the environment report, the shared run, step cost.

Every notebook reads ``MSD_MODE`` and passes it here. The three modes map to presets:

- ``smoke``: the ``smoke`` preset, tiny random towers that train in seconds on a CPU.
  CI runs the notebooks in this mode.
- ``cpu-demo``: the ``cpu-demo`` preset, minutes on two CPU cores.
- ``full``: the ``colab-t4`` preset, pretrained Hub encoders on a 16 GB GPU.

Notebook 02 pretrains one run per mode, and notebooks 03 to 07 load it.
``notebook_run(mode)`` returns that run's checkpoint: it trains the run when no
checkpoint exists, resumes it when the newest checkpoint is unfinished, and loads it
otherwise. Runs live under ``<project root>/runs/notebooks/<mode>/run-<hash>/``, where
the hash covers every setting that changes the trained weights. A changed setting
therefore trains a new run in a new folder and never reuses a checkpoint made with
other settings.

``step_cost`` times optimizer steps and measures the activation memory they hold
(``ActivationMemory``), for the memory and ablation notebooks.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from . import runtime
from .checkpoint import CheckpointError, list_checkpoints
from .config import TrainConfig, get_preset
from .manifest import read_manifest
from .model import DualEncoder, build_model
from .train import Trainer, load_trainer, prepare_manifest, run_manifest, train

logger = logging.getLogger(__name__)

MODES = {"smoke": "smoke", "cpu-demo": "cpu-demo", "full": "colab-t4"}
"""Notebook mode -> the preset it runs."""

DEFAULT_MODE = "cpu-demo"
MODE_VARIABLE = "MSD_MODE"
RUN_FOLDER = Path("runs") / "notebooks"

# Settings that change where or how often a run writes files, but not its weights.
BOOKKEEPING_FIELDS = ("output_dir", "num_workers", "checkpoint_every", "keep_checkpoints", "log_every")

MIB = 2**20


def resolve_mode(mode: str | None = None) -> str:
    """Return ``mode``, or the ``MSD_MODE`` environment variable, or ``"cpu-demo"``, checked against ``MODES``."""
    if mode is None:
        mode = os.environ.get(MODE_VARIABLE, DEFAULT_MODE)
    if mode not in MODES:
        raise ValueError(f"invalid MSD_MODE={mode!r}: must be one of {list(MODES)} "
                         f"(set it with os.environ['{MODE_VARIABLE}'] or in the notebook's parameters cell)")
    return mode


def project_root(start: str | os.PathLike | None = None) -> Path:
    """Return the nearest folder at or above ``start`` (default: the working directory) with this project's pyproject.toml.

    Notebooks run with their own folder as the working directory, so this finds the
    repository root from ``notebooks/``. Outside a checkout (for example a Colab session
    that installed the package with pip) it returns ``start`` itself.
    """
    start = Path(start if start is not None else os.getcwd()).resolve()
    for folder in (start, *start.parents):
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and (folder / "msd_core").is_dir():
            return folder
    return start


def settings_digest(config: TrainConfig) -> str:
    """Return the first 8 hex digits of the SHA-256 of every setting that changes the trained weights.

    The fields in ``BOOKKEEPING_FIELDS`` are left out, so moving a run or changing
    how often it writes checkpoints does not change the digest.
    """
    values = {name: value for name, value in config.to_dict().items() if name not in BOOKKEEPING_FIELDS}
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def notebook_config(mode: str | None = None, *, root: str | os.PathLike | None = None,
                    **overrides: Any) -> TrainConfig:
    """Return the preset of ``mode`` with ``overrides``, writing to the mode's run folder.

    Args:
        mode: ``"smoke"``, ``"cpu-demo"`` or ``"full"``; None reads ``MSD_MODE``.
        root: the folder that contains ``runs/``, by default ``project_root()``.
        overrides: config fields to change, for example ``alpha=0.0``. An explicit
            ``output_dir`` is kept as given.

    Returns:
        A ``TrainConfig`` whose ``output_dir`` is
        ``<root>/runs/notebooks/<mode>/run-<settings_digest>``.
    """
    mode = resolve_mode(mode)
    config = get_preset(MODES[mode], **overrides)
    if "output_dir" in overrides:
        return config
    base = Path(root) if root is not None else project_root()
    folder = base / RUN_FOLDER / mode / f"run-{settings_digest(config)}"
    return config.replace(output_dir=str(folder))


def load_history(config: TrainConfig) -> pd.DataFrame:
    """Read the ``history.csv`` of a run (one row per optimizer step).

    Raises:
        FileNotFoundError: the run has not written a history yet.
    """
    path = Path(config.output_dir) / "history.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no training history at {path}; train the run first (notebook 02, or "
                                "msd_core.notebook.notebook_run)")
    return pd.read_csv(path)


def initial_model(config: TrainConfig, *, device: str | torch.device = "cpu") -> DualEncoder:
    """Build the model a run starts from, in eval mode: the weights ``train(config)`` has at step 0.

    The weights are drawn under ``torch.manual_seed(config.seed)`` inside
    ``torch.random.fork_rng``, as the training loop draws them, so the caller's random
    state is untouched. Pretrained towers (the ``cpu-demo`` text encoder, the
    ``colab-t4`` encoders) keep their pretrained weights. The run's manifest must exist.
    """
    frame = read_manifest(run_manifest(config))
    texts = frame.loc[frame["split"] == "train", "text"].astype(str).tolist()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config, tokenizer_texts=texts)
    return model.to(runtime.resolve_device(device)).eval()


class NotebookRun(NamedTuple):
    """A pretrained run the notebooks share: its settings, its last checkpoint and its manifest."""

    config: TrainConfig
    checkpoint: Path
    manifest: Path


def finished_checkpoint(config: TrainConfig, *, device: str | torch.device = "cpu") -> Path | None:
    """Return the last checkpoint of the finished run in ``config.output_dir``, or None.

    None means no readable checkpoint exists, the newest one is not at the run's last
    step, or it was made with other settings.
    """
    trainer = _existing_trainer(config, device, progress=False, delete_stale=False)
    if trainer is None or trainer.step < trainer.total_steps:
        return None
    return trainer.last_checkpoint


def notebook_run(mode: str | None = None, *, device: str | torch.device | None = None,
                 root: str | os.PathLike | None = None, retrain: bool = False, progress: bool = True,
                 **overrides: Any) -> NotebookRun:
    """Return the mode's pretrained run, training or resuming it when needed.

    Args:
        mode: ``"smoke"``, ``"cpu-demo"`` or ``"full"``; None reads ``MSD_MODE``.
        device: where to train when training is needed; None picks CUDA when available.
        root: the folder that contains ``runs/``, by default ``project_root()``.
        retrain: train from scratch even when a finished run exists.
        progress: show progress bars.
        overrides: config fields to change; a changed setting gets its own run folder.

    Raises:
        RuntimeError: training was interrupted (Ctrl-C or the notebook's stop button);
            call again to resume from the checkpoint it wrote.
    """
    config = notebook_config(mode, root=root, **overrides)
    checkpoint = None
    if not retrain:
        trainer = _existing_trainer(config, device, progress, delete_stale=True)
        if trainer is not None and trainer.step < trainer.total_steps:
            logger.info("resuming the run in %s at step %d of %d", config.output_dir, trainer.step,
                        trainer.total_steps)
            _check_finished(trainer.fit(), config)
        if trainer is not None:
            checkpoint = trainer.last_checkpoint
            logger.info("using the run in %s (step %d)", config.output_dir, trainer.step)

    if checkpoint is None:
        logger.info("training a new run in %s", config.output_dir)
        history = train(config, device=device, progress=progress)
        _check_finished(history, config)
        checkpoint = history.checkpoint
    return NotebookRun(config, Path(checkpoint), run_manifest(config))


def _existing_trainer(config: TrainConfig, device, progress: bool, delete_stale: bool) -> Trainer | None:
    """Rebuild the trainer of the newest readable checkpoint in the run folder, if it has the same settings.

    With ``delete_stale``, checkpoints made with other settings are deleted, because a
    stale checkpoint with a higher step number would otherwise stay the newest one.
    """
    folder = Path(config.output_dir)
    if not list_checkpoints(folder / "checkpoints"):
        return None
    try:
        trainer = load_trainer(folder, device=device, progress=progress)
    except CheckpointError as error:
        logger.warning("cannot reuse the run in %s (%s); training it again", folder, error)
        return None

    saved = trainer.config
    if config.manifest is None:
        saved = saved.replace(manifest=None)  # load_trainer fills in the generated manifest
    if settings_digest(saved) != settings_digest(config):
        if delete_stale:
            stale = list_checkpoints(folder / "checkpoints")
            logger.warning("the checkpoints in %s were made with other settings; deleting %s to train again",
                           folder, [path.name for path in stale])
            for path in stale:
                path.unlink()
                path.with_suffix(".json").unlink(missing_ok=True)
        return None
    return trainer


def _check_finished(history, config: TrainConfig) -> None:
    if history.interrupted:
        raise RuntimeError(f"training in {config.output_dir} was interrupted after step {len(history)}; "
                           "run the cell again to resume from its last checkpoint")


# ---------------------------------------------------------------- environment


@dataclass
class Environment:
    """The machine a notebook runs on: the mode and preset, the device, and the memory available.

    Memory sizes are in GiB; ``accelerator_memory_gib`` is None on a CPU.
    """

    mode: str
    preset: str
    device: str
    device_name: str
    on_colab: bool
    python_version: str
    torch_version: str
    cpu_count: int
    memory_total_gib: float
    memory_available_gib: float
    accelerator_memory_gib: float | None

    def describe(self) -> str:
        """Return the report as aligned ``name: value`` lines."""
        rows = [
            ("mode", f"{self.mode} (preset {self.preset})"),
            ("device", f"{self.device} ({self.device_name})"),
            ("running on Colab", "yes" if self.on_colab else "no"),
            ("python / torch", f"{self.python_version} / {self.torch_version}"),
            ("CPU cores", str(self.cpu_count)),
            ("RAM", f"{self.memory_available_gib:.1f} GiB free of {self.memory_total_gib:.1f} GiB"),
        ]
        if self.accelerator_memory_gib is not None:
            rows.append(("GPU memory", f"{self.accelerator_memory_gib:.1f} GiB"))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def setup(mode: str | None = None, *, device: str | torch.device | None = None,
          log_level: int | None = logging.INFO) -> Environment:
    """Resolve the notebook mode and the device, show the library's log messages, and describe the machine.

    Args:
        mode: ``"smoke"``, ``"cpu-demo"`` or ``"full"``; None reads ``MSD_MODE``.
        device: "cpu", "cuda", ...; None picks CUDA when available.
        log_level: level of the handler added to the ``msd_core`` and ``data_prep``
            loggers, so their messages appear under the cells; None leaves logging alone.
    """
    import psutil

    mode = resolve_mode(mode)
    if log_level is not None:
        _show_logs(log_level)
    resolved = runtime.resolve_device(device)
    memory = psutil.virtual_memory()
    accelerator_memory = None
    if resolved.type == "cuda":
        properties = torch.cuda.get_device_properties(resolved)
        device_name, accelerator_memory = properties.name, properties.total_memory / 2**30
    else:
        device_name = _cpu_name()
    return Environment(
        mode=mode, preset=MODES[mode], device=str(resolved), device_name=device_name,
        on_colab="google.colab" in sys.modules, python_version=platform.python_version(),
        torch_version=torch.__version__, cpu_count=os.cpu_count() or 1,
        memory_total_gib=memory.total / 2**30, memory_available_gib=memory.available / 2**30,
        accelerator_memory_gib=accelerator_memory,
    )


def _cpu_name() -> str:
    """Return the processor's model name from /proc/cpuinfo on Linux, else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _show_logs(level: int) -> None:
    """Attach one stderr handler to the project's loggers; calling it again only changes the level."""
    for name in ("msd_core", "data_prep"):
        log = logging.getLogger(name)
        log.setLevel(level)
        handler = next((h for h in log.handlers if getattr(h, "_msd_notebook", False)), None)
        if handler is None:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            handler._msd_notebook = True
            log.addHandler(handler)
            log.propagate = False
        handler.setLevel(level)


# ---------------------------------------------------------------- step cost


class _SavedTensor:
    """A tensor autograd saved, wrapped so that its release can be observed."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class ActivationMemory:
    """Count the bytes that autograd keeps for the backward pass while the block runs, and their peak.

    Every tensor saved for backward inside the ``with`` block is counted once per
    storage, from the forward pass that saves it until the backward pass (or the
    deletion of the graph) frees it. These are the activations whose size grows with the
    batch. The parameters of the ``exclude`` modules are not counted, and neither are
    parameters, gradients, optimizer state, or tensors made under ``torch.no_grad()``
    (the teacher pass), because autograd saves none of these.

    The count is the same on every device, which makes it usable on a CPU, where
    PyTorch reports no allocator peak. On CUDA, ``torch.cuda.max_memory_allocated``
    also counts weights, gradients and temporary buffers.

    Example::

        with ActivationMemory(model) as memory:
            loss = model(batch).sum()
            loss.backward()
        memory.peak_mb  # MiB
    """

    def __init__(self, *exclude: nn.Module):
        self._excluded = {p.untyped_storage().data_ptr() for module in exclude for p in module.parameters()}
        self._live: dict[int, list[int]] = {}  # storage address -> [references, bytes]
        self.current_bytes = 0
        self.peak_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @property
    def peak_mb(self) -> float:
        """Largest number of MiB held at once inside the block."""
        return self.peak_bytes / MIB

    def reset_peak(self) -> None:
        """Start a new peak from the bytes held now."""
        self.peak_bytes = self.current_bytes

    def __enter__(self) -> "ActivationMemory":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._hooks.__exit__(*exc_info)

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._excluded:
            return tensor
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = [1, storage.nbytes()]
            self.current_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        else:
            entry[0] += 1
        saved = _SavedTensor(tensor)
        weakref.finalize(saved, self._release, key)
        return saved

    @staticmethod
    def _unpack(saved):
        return saved.tensor if isinstance(saved, _SavedTensor) else saved

    def _release(self, key: int) -> None:
        entry = self._live[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self._live[key]
            self.current_bytes -= entry[1]


def step_cost(config: TrainConfig, *, steps: int = 3, warmup: int = 1, device: str | torch.device | None = None,
              ) -> dict[str, Any]:
    """Time full optimizer steps of ``config`` and measure the activation memory they hold.

    A ``Trainer`` is built from ``config`` in a temporary folder, so it writes no
    checkpoint or history into the run's folder. Like training, it generates PhantomCXR
    in the run's folder when ``config.manifest`` is None and the data is missing. Then
    ``warmup + steps`` calls of ``Trainer.train_step`` run on the first micro-batches
    of the train split, in order. Each call includes the teacher pass, the k student
    passes with their backward passes, the optimizer step and the EMA update.

    Args:
        config: the run's settings; ``negatives``, ``micro_batch_size`` and
            ``accumulation_steps`` are the usual subjects of a comparison.
        steps: measured steps.
        warmup: steps run first and not measured (the first step pays one-off costs).
        device: where to run; None picks CUDA when available.

    Returns:
        ``negatives``, ``micro_batch_size``, ``accumulation_steps``,
        ``effective_batch_size``, ``step_time_s`` (median over the measured steps, in
        seconds), ``activation_peak_mb`` (the largest ``ActivationMemory`` peak of a
        measured step, MiB) and ``device_peak_mb`` (CUDA's peak allocated memory in a
        measured step, MiB; NaN on other devices).
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"invalid steps={steps}, warmup={warmup}: need steps >= 1 and warmup >= 0")
    manifest = prepare_manifest(config)
    with tempfile.TemporaryDirectory(prefix="msd-step-cost-") as scratch:
        trainer = Trainer(config.replace(max_steps=warmup + steps, output_dir=scratch, manifest=str(manifest)),
                          device=device, progress=False)
        return _time_steps(trainer, steps, warmup)


def _time_steps(trainer: Trainer, steps: int, warmup: int) -> dict[str, Any]:
    config = trainer.config
    trainer.model.train()
    groups = _step_groups(trainer, warmup + steps)
    cuda = trainer.device.type == "cuda"

    times, activation_peaks, device_peaks = [], [], []
    for index, group in enumerate(groups):
        if cuda:
            torch.cuda.synchronize(trainer.device)
            torch.cuda.reset_peak_memory_stats(trainer.device)
        started = time.perf_counter()
        with ActivationMemory(trainer.model) as memory:
            trainer.train_step(group)
        if cuda:
            torch.cuda.synchronize(trainer.device)
        elapsed = time.perf_counter() - started
        if index >= warmup:
            times.append(elapsed)
            activation_peaks.append(memory.peak_mb)
            device_peaks.append(torch.cuda.max_memory_allocated(trainer.device) / MIB if cuda else float("nan"))

    return {
        "negatives": config.negatives,
        "micro_batch_size": config.micro_batch_size,
        "accumulation_steps": config.accumulation_steps,
        "effective_batch_size": config.effective_batch_size,
        "step_time_s": statistics.median(times),
        "activation_peak_mb": max(activation_peaks),
        "device_peak_mb": max(device_peaks),
    }


def _step_groups(trainer: Trainer, count: int) -> list[list[dict[str, Any]]]:
    """``count`` groups of k micro-batches, cycling through the train split in manifest order."""
    config = trainer.config
    loader = DataLoader(trainer.dataset, batch_size=config.micro_batch_size, shuffle=False, drop_last=True,
                        collate_fn=trainer.collator, num_workers=0)
    if len(loader) == 0:
        raise ValueError(f"the train split has {len(trainer.dataset)} rows, fewer than one micro-batch of "
                         f"{config.micro_batch_size}")
    batches: Iterable = itertools.chain.from_iterable(itertools.repeat(loader))
    flat = list(itertools.islice(batches, count * config.accumulation_steps))
    k = config.accumulation_steps
    return [flat[start:start + k] for start in range(0, len(flat), k)]
