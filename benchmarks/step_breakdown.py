"""The parts of an MSD step, timed one by one on the same batches.

``step_cost`` reports how much slower ``momentum`` and ``gradcache`` are than the floor
(forward and backward of both towers). This script explains the difference: it times,
in one process and on the same B = k * b pairs, the floor, the teacher's forward pass
(per micro-batch as ``msd_core.step`` runs it, and over all B pairs at once), a
gradient-free student forward (the first pass of ``gradcache``), gradient clipping with
the optimizer step, the EMA update, and the full ``momentum`` and ``gradcache`` steps.
For a text tower with frozen lower layers it also times those layers alone, which is
the forward work the teacher and the student repeat on identical weights.

    python -m benchmarks.step_breakdown --preset cpu-demo --threads 1
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from benchmarks.common import benchmark_config, load_average, markdown_table, prepare_phantom
from benchmarks.measure import time_step
from benchmarks.step_worker import WorkerSpec, build_trainer, fixed_batch, floor_step, split_batch

logger = logging.getLogger(__name__)


def frozen_text_prefix(model) -> torch.nn.Module | None:
    """Return a copy of the text tower cut after its frozen layers, or None when every layer trains."""
    encoder = model.text_encoder
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if layers is None:
        return None
    frozen = sum(1 for layer in layers if not any(p.requires_grad for p in layer.parameters()))
    if frozen == 0:
        return None
    prefix = copy.deepcopy(encoder)
    prefix.encoder.layer = prefix.encoder.layer[:frozen]
    return prefix.eval()


def median_times(step: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """Return the median (wall seconds, CPU seconds) of ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        time_step(step, device)
    times = [time_step(step, device) for _ in range(repeats)]
    walls = [wall for wall, _ in times]
    cpus = [cpu for _, cpu in times if cpu is not None]
    return float(np.median(walls)), float(np.median(cpus)) if cpus else float("nan")


def breakdown(preset: str, micro_batch: int, accumulation: int, manifest: Path, device: str, warmup: int,
              repeats: int, alpha: float = 0.4) -> pd.DataFrame:
    """Time each part of a step: one row per part with median wall and CPU seconds, and their ratio to the floor."""
    spec = WorkerSpec(method="momentum", preset=preset, manifest=str(manifest), micro_batch_size=micro_batch,
                      accumulation_steps=accumulation, device=device, alpha=alpha)
    trainer = build_trainer(spec, str(manifest.parent.parent / "breakdown-run"))
    batch = fixed_batch(trainer, micro_batch * accumulation, pad_to_max_length=False)
    micro_batches = split_batch(batch, accumulation)
    model, teacher = trainer.model, trainer.teacher

    def teacher_per_micro_batch():
        for micro in micro_batches:
            with trainer.autocast():
                teacher(micro["pixel_values"], micro["input_ids"], micro["attention_mask"])

    def teacher_whole_batch():
        with trainer.autocast():
            teacher(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])

    def student_forward_no_grad():
        with torch.no_grad(), trainer.autocast():
            for micro in micro_batches:
                model(micro["pixel_values"], micro["input_ids"], micro["attention_mask"])

    def optimizer_step():
        trainer.scaler.unscale_(trainer.optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.config.grad_clip)
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()

    def full_step(mode: str):
        def run():
            trainer.config.negatives = mode
            trainer.train_step(micro_batches)
        return run

    parts = [("floor: forward + backward of both towers", lambda: floor_step(trainer, micro_batches)),
             ("teacher forward, k micro-batches", teacher_per_micro_batch),
             ("teacher forward, all B pairs at once", teacher_whole_batch),
             ("student forward without gradients, k micro-batches", student_forward_no_grad),
             ("gradient clipping + optimizer step", optimizer_step),
             ("EMA update of the teacher", teacher.update)]
    prefix = frozen_text_prefix(model)  # the student: the teacher's parameters never require gradients
    if prefix is not None:
        def frozen_layers():
            with torch.no_grad(), trainer.autocast():
                for micro in micro_batches:
                    prefix(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"])
        parts.append((f"frozen text layers only ({len(prefix.encoder.layer)}), k micro-batches", frozen_layers))
    parts += [("full momentum step (train_step)", full_step("momentum")),
              ("full gradcache step (train_step)", full_step("gradcache"))]

    trainer.train_step(micro_batches)  # creates the optimizer state and gradients the optimizer part needs
    rows = []
    for name, step in parts:
        wall, cpu = median_times(step, trainer.device, warmup, repeats)
        rows.append({"part": name, "wall_s": wall, "cpu_s": cpu})
        logger.info("%s: %.3f s wall, %.3f s CPU", name, wall, cpu)
    frame = pd.DataFrame(rows)
    floor = frame.iloc[0]
    frame["wall_x_floor"] = frame["wall_s"] / floor["wall_s"]
    frame["cpu_x_floor"] = frame["cpu_s"] / floor["cpu_s"]
    return frame


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the step breakdown."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_breakdown", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-demo", help="msd_core preset or colab-t4-offline (default: cpu-demo)")
    parser.add_argument("--micro-batch", type=int, help="b (default: the preset's)")
    parser.add_argument("--accumulation", type=int, help="k (default: the preset's)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each part (default: 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each part (default: 5)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    parser.add_argument("--threads", type=int, help="torch threads on the CPU (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/breakdown"),
                        help="folder for breakdown.csv and tables.md (default: runs/benchmarks/breakdown)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Time the parts of a step and print the table."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = benchmark_config(args.preset)
    micro_batch = args.micro_batch or config.micro_batch_size
    accumulation = args.accumulation or config.accumulation_steps
    load_before = load_average()
    manifest = prepare_phantom(args.out / "phantomcxr", max(64, 2 * micro_batch * accumulation),
                               config.phantom_image_size)
    frame = breakdown(args.preset, micro_batch, accumulation, manifest, args.device, args.warmup, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "breakdown.csv", index=False)
    text = (f"{args.preset}, B = {micro_batch * accumulation} (b = {micro_batch}, k = {accumulation}), {args.device}, "
            f"{torch.get_num_threads()} thread(s), load average {load_before} before, {load_average()} after\n\n"
            + markdown_table(frame))
    (args.out / "tables.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
