"""One step-cost configuration, measured in a process of its own.

A configuration is a method, a micro-batch size b and an accumulation count k. The
worker builds a ``Trainer`` on a PhantomCXR manifest, collates the same first B = k * b
training pairs for every method, runs warm-up steps, then times ``repeats`` steps and
records their peak memory (see ``benchmarks.measure``). Methods:

- ``floor``: forward and backward of both towers over the k micro-batches with the sum
  of the embeddings as a dummy loss. No loss, optimizer step or teacher: the least any
  method must spend to train on B pairs in micro-batches of b.
- ``clip``: plain CLIP, one forward and backward of all B pairs at once, then gradient
  clipping, the optimizer step and the temperature clamp. No teacher.
- ``local``, ``momentum``, ``gradcache``: ``Trainer.train_step`` on the k pre-built
  micro-batches with that ``negatives`` mode: loss, backward, clipping, optimizer step
  and EMA teacher update. ``local`` runs with alpha 0, which is naive accumulation with
  no teacher pass. ``momentum`` and ``gradcache`` use the given alpha from the first
  measured step on, because the alpha ramp is set to one step.

Run a configuration isolated with ``run_isolated(spec)``; in a process it shares with
others, ``run_spec(spec)`` gives numbers whose memory depends on what ran before.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.common import OFFLINE_T4, REPO_ROOT, benchmark_config, offline_t4_missing_parameters
from benchmarks.measure import PeakMemory, time_step
from msd_core.train import Trainer, TrainingOutOfMemoryError

logger = logging.getLogger(__name__)

METHODS = ("floor", "clip", "local", "momentum", "gradcache")
TRAINER_METHODS = ("local", "momentum", "gradcache")
RESULT_PREFIX = "STEP_COST_RESULT "
# With ``exact_memory`` a worker tells glibc to serve every block of 64 KiB or more with
# a mapping of its own, which goes back to the kernel when freed. The resident set then
# follows the live tensors instead of the heap's fragmentation, but every large block
# costs fresh page faults, which adds system time to the step (about 20 % here).
MMAP_THRESHOLD_BYTES = 64 * 1024


@dataclass
class WorkerSpec:
    """One configuration to measure.

    Attributes:
        method: one of ``METHODS``.
        preset: msd_core preset name, or ``"colab-t4-offline"``.
        manifest: PhantomCXR manifest with at least B = k * b train rows.
        micro_batch_size, accumulation_steps: b and k.
        warmup: untimed steps before the measured ones.
        repeats: measured steps.
        warmup_pairs: pairs per warm-up step, taken from the front of the batch; None
            for all B. One micro-batch's worth is enough to create the optimizer state
            when only memory is wanted.
        device: "cpu", "cuda", ...
        threads: torch intra-op threads on the CPU; None keeps torch's default.
        pad_to_max_length: pad every report to ``max_text_length`` tokens (the worst case).
        alpha: distillation weight of ``momentum`` and ``gradcache``.
        exact_memory: in ``run_isolated``, map large blocks one by one so the resident
            set tracks live tensors (for memory-only runs; it slows the step).
        overrides: further ``TrainConfig`` fields.
    """

    method: str
    preset: str
    manifest: str
    micro_batch_size: int
    accumulation_steps: int
    warmup: int = 1
    repeats: int = 3
    warmup_pairs: int | None = None
    device: str = "cpu"
    threads: int | None = None
    pad_to_max_length: bool = False
    alpha: float = 0.4
    exact_memory: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"invalid method={self.method!r}: must be one of {list(METHODS)}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"invalid repeats={self.repeats} or warmup={self.warmup}: need repeats >= 1, warmup >= 0")


def build_trainer(spec: WorkerSpec, output_dir: str):
    """Build a ``Trainer`` for the spec's method, sizes and device, without progress bars."""
    negatives = spec.method if spec.method in TRAINER_METHODS else "momentum"  # floor and clip ignore it
    alpha = spec.alpha if spec.method in ("momentum", "gradcache") else 0.0
    values = dict(manifest=spec.manifest, output_dir=output_dir, micro_batch_size=spec.micro_batch_size,
                  accumulation_steps=spec.accumulation_steps, negatives=negatives, alpha=alpha, alpha_ramp_steps=1,
                  queue_size=0, num_workers=0, max_steps=10_000)
    config = benchmark_config(spec.preset, **{**values, **spec.overrides})
    return Trainer(config, device=spec.device, progress=False)


def fixed_batch(trainer, size: int, pad_to_max_length: bool) -> dict[str, Any]:
    """Collate the first ``size`` training pairs into one batch on the trainer's device."""
    dataset = trainer.dataset
    if len(dataset) < size:
        raise ValueError(f"{trainer.manifest} has {len(dataset)} train rows, fewer than the effective batch {size}; "
                         "generate more pairs")
    batch = trainer.collator([dataset[index] for index in range(size)])
    if pad_to_max_length:
        tokens = trainer.model.tokenizer(batch["texts"], padding="max_length", truncation=True,
                                         max_length=trainer.model.spec.max_text_length, return_tensors="pt",
                                         return_token_type_ids=False)
        batch["input_ids"], batch["attention_mask"] = tokens["input_ids"], tokens["attention_mask"]
    return {key: value.to(trainer.device) if torch.is_tensor(value) else value for key, value in batch.items()}


def split_batch(batch: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """Cut a batch into ``parts`` equal micro-batches (every list and tensor sliced by rows)."""
    size = len(batch["index"]) // parts
    micro_batches = []
    for part in range(parts):
        rows = slice(part * size, (part + 1) * size)
        micro = {key: value[rows] for key, value in batch.items() if key != "skipped"}
        micro["skipped"] = 0
        micro_batches.append(micro)
    return micro_batches


def floor_step(trainer, micro_batches: list[dict[str, Any]]) -> float:
    """Run forward and backward of both towers per micro-batch with a dummy loss, and no optimizer step."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    total = 0.0
    for batch in micro_batches:
        with trainer.autocast():
            image, text = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])  # (b, D) each
        dummy = image.float().sum() + text.float().sum()
        dummy.backward()
        total += dummy.detach()
    return float(total)


def clip_step(trainer, batch: dict[str, Any]) -> float:
    """Run one plain CLIP optimizer step on the whole batch: loss, backward, clipping, optimizer step."""
    from msd_core.losses import clip_loss

    model, optimizer, scaler = trainer.model, trainer.optimizer, trainer.scaler
    optimizer.zero_grad(set_to_none=True)
    with trainer.autocast():
        image, text = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])  # (B, D) each
    loss = clip_loss(image, text, model.scale())
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if trainer.config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    trainer.scheduler.step()
    model.clamp_logit_scale_()
    return float(loss.detach())


def make_step(trainer, method: str, batch: dict[str, Any], micro_batches: list[dict[str, Any]]):
    """Return a zero-argument function that runs one step of ``method`` on these batches."""
    if method == "floor":
        return lambda: floor_step(trainer, micro_batches)
    if method == "clip":
        return lambda: clip_step(trainer, batch)
    return lambda: trainer.train_step(micro_batches)["loss"]


def _warmup_step(trainer, spec: WorkerSpec, batch: dict[str, Any], micro_batches: list[dict[str, Any]]):
    """Return the warm-up step: the measured step, or the same method on the first ``warmup_pairs`` pairs."""
    total = len(batch["index"])
    pairs = min(spec.warmup_pairs or total, total)
    if pairs == total:
        return make_step(trainer, spec.method, batch, micro_batches)
    small_batch = {key: value[:pairs] for key, value in batch.items() if key != "skipped"}
    small_batch["skipped"] = 0
    count = max(1, pairs // spec.micro_batch_size)
    return make_step(trainer, spec.method, small_batch, micro_batches[:count])


def run_spec(spec: WorkerSpec) -> dict[str, Any]:
    """Measure one configuration in this process and return its result record.

    The record contains the spec's fields, ``step_times_s`` and ``cpu_times_s`` (one per
    measured step; CPU time is None on CUDA), ``peak_mb``, ``base_mb``, ``step_mb``,
    ``memory_method``, parameter counts, ``last_value`` (the last step's loss, or the
    dummy loss of ``floor``), and ``out_of_memory``. That flag is True when a step ran
    out of device memory, and the times and memory are then missing.
    """
    if spec.threads and torch.device(spec.device).type == "cpu":
        torch.set_num_threads(spec.threads)
    with tempfile.TemporaryDirectory(prefix="step-cost-") as output_dir:
        trainer = build_trainer(spec, output_dir)
        record = dataclasses.asdict(spec)
        record.update(effective_batch=spec.micro_batch_size * spec.accumulation_steps, device=str(trainer.device),
                      precision=trainer.precision, threads=torch.get_num_threads(),
                      parameters=sum(p.numel() for p in trainer.model.parameters()),
                      trainable_parameters=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad))
        if spec.preset == OFFLINE_T4:
            record["missing_parameters"] = offline_t4_missing_parameters(trainer.model)
        batch = fixed_batch(trainer, record["effective_batch"], spec.pad_to_max_length)
        record["text_tokens"] = int(batch["input_ids"].shape[1])
        micro_batches = split_batch(batch, spec.accumulation_steps)
        step = make_step(trainer, spec.method, batch, micro_batches)
        memory = PeakMemory(trainer.device)
        try:
            record.update(_measure(trainer, spec, step, _warmup_step(trainer, spec, batch, micro_batches), memory))
        except (torch.OutOfMemoryError, TrainingOutOfMemoryError):
            record.update(out_of_memory=True, step_times_s=[], cpu_times_s=[], peak_mb=None, base_mb=None,
                          step_mb=None, memory_method=memory.method, last_value=None)
    return record


def _measure(trainer, spec: WorkerSpec, step, warmup_step, memory: PeakMemory) -> dict[str, Any]:
    for _ in range(spec.warmup):
        time_step(warmup_step, trainer.device)
    memory.start()
    walls, cpus, losses = [], [], []
    for _ in range(spec.repeats):
        wall, cpu = time_step(lambda: losses.append(step()), trainer.device)
        walls.append(wall)
        cpus.append(cpu)
    peak = memory.peak_mb()
    return dict(out_of_memory=False, step_times_s=walls, cpu_times_s=cpus, peak_mb=peak, base_mb=memory.base_mb,
                step_mb=peak - memory.base_mb, memory_method=memory.method, last_value=float(losses[-1]))


def run_isolated(spec: WorkerSpec, timeout: float | None = None) -> dict[str, Any]:
    """Measure one configuration in a fresh Python process and return its result record.

    Raises:
        RuntimeError: the worker failed or printed no result; the message has its stderr tail.
    """
    environment = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if spec.exact_memory:
        environment.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD_BYTES))
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "benchmarks.step_worker", json.dumps(dataclasses.asdict(spec))]
    try:
        finished = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
                                  timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"step-cost worker for {spec.method} (b={spec.micro_batch_size}, "
                           f"k={spec.accumulation_steps}) timed out after {timeout} s; lower the sizes or "
                           "raise --worker-timeout") from None
    for line in reversed(finished.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = "\n".join(finished.stderr.strip().splitlines()[-15:])
    raise RuntimeError(f"step-cost worker for {spec.method} (b={spec.micro_batch_size}, k={spec.accumulation_steps}) "
                       f"exited with status {finished.returncode} and no result. Its stderr ends with:\n{tail}")


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: measure the JSON spec given as the only argument and print the result line."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.step_worker '<WorkerSpec as JSON>'", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    record = run_spec(WorkerSpec(**json.loads(argv[0])))
    print(RESULT_PREFIX + json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
