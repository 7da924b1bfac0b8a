"""Time and peak memory of one optimizer step: plain CLIP, local, momentum (MSD), gradcache.

For one pair of encoders and one effective batch B = k * b, this measures each method's
step (see ``benchmarks.step_worker`` for what each one runs) against the floor, the bare
forward and backward of both towers over the B pairs in micro-batches. Each
configuration runs in a fresh process, so its peak memory is its own. Three tables come
out, printed and written to ``--out``:

1. step cost: median step time (wall clock and CPU time) after warm-up, its ratio to the
   floor and to plain CLIP, and peak memory;
2. memory against accumulation: with b fixed and k = 1, 2, 4, ..., the peak memory of
   ``momentum`` next to plain CLIP at the same effective batch (also drawn as a PNG);
3. data pipeline: samples per second of the DataLoader alone against what the
   ``momentum`` step consumes.

    python -m benchmarks.step_cost --preset cpu-demo
    python -m benchmarks.step_cost --preset smoke --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from benchmarks.common import (OFFLINE_T4, benchmark_config, load_average, machine_record, markdown_table,
                               parse_choices, parse_int_list, prepare_phantom, write_json, write_markdown)
from benchmarks.step_worker import METHODS, MMAP_THRESHOLD_BYTES, WorkerSpec, run_isolated, run_spec

logger = logging.getLogger(__name__)

QUICK = dict(repeats=2, rounds=1, sweep_k="1,4,16", loader_batches=5)
DEFAULTS = dict(warmup=1, repeats=3, rounds=1, sweep_k="1,2,4,8,16", sweep_micro_batch=8, loader_batches=20)

# Colab's T4 has 15 GiB of device memory. The CUDA context and cuDNN workspaces take
# part of it outside PyTorch's allocator, so 14 GiB is assumed allocatable (an estimate).
T4_ALLOCATABLE_MIB = 14 * 1024


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the step-cost benchmark."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_cost", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-demo",
                        help="encoders and sizes: an msd_core preset (smoke, cpu-demo, ...) or colab-t4-offline, "
                             "the T4 preset's architectures with random weights (default: cpu-demo)")
    parser.add_argument("--micro-batch", type=int, help="b, pairs per micro-batch (default: the preset's)")
    parser.add_argument("--accumulation", type=int, help="k, micro-batches per optimizer step (default: the preset's)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"methods to time (default: {','.join(METHODS)})")
    parser.add_argument("--warmup", type=int, help=f"untimed steps per configuration (default: {DEFAULTS['warmup']})")
    parser.add_argument("--repeats", type=int, help=f"timed steps per configuration (default: {DEFAULTS['repeats']})")
    parser.add_argument("--rounds", type=int,
                        help="times every configuration is measured, in turn, so that changes in machine load "
                             f"spread over all methods (default: {DEFAULTS['rounds']})")
    parser.add_argument("--sweep-k", help="accumulation counts of the memory sweep; empty skips it "
                                          f"(default: {DEFAULTS['sweep_k']})")
    parser.add_argument("--sweep-micro-batch", type=int,
                        help=f"the fixed b of the memory sweep (default: {DEFAULTS['sweep_micro_batch']})")
    parser.add_argument("--sweep-methods", default="clip,momentum", help="methods of the memory sweep "
                                                                         "(default: clip,momentum)")
    parser.add_argument("--loader-workers", default="0,1,2",
                        help="DataLoader num_workers values to time; empty skips the loader (default: 0,1,2)")
    parser.add_argument("--loader-batches", type=int,
                        help=f"micro-batches timed per worker count (default: {DEFAULTS['loader_batches']})")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    parser.add_argument("--threads", type=int, help="torch threads on the CPU (default: torch's choice)")
    parser.add_argument("--alpha", type=float, default=0.4, help="distillation weight of momentum and gradcache "
                                                                 "(default: 0.4)")
    parser.add_argument("--pad-to-max-length", action="store_true",
                        help="pad every report to the preset's max_text_length (the worst case for memory)")
    parser.add_argument("--isolation", choices=("process", "none"), default="process",
                        help="process: each configuration in a fresh Python process (honest peak memory); none: "
                             "all in this process, faster, memory affected by what ran before (default: process)")
    parser.add_argument("--worker-timeout", type=float, default=1800, help="seconds one configuration may take "
                                                                          "(default: 1800)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, sweep k = 1,4,16 and fewer loader batches, for a first look")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/step_cost"),
                        help="folder for the CSV, JSON and Markdown results (default: runs/benchmarks/step_cost)")
    parser.add_argument("--figure", type=Path, help="path of the memory plot (default: OUT/memory_vs_accumulation.png)")
    return parser


def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from ``--quick`` or the defaults, and the sizes from the preset."""
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, QUICK.get(name, value) if args.quick else value)
    config = benchmark_config(args.preset)
    args.micro_batch = args.micro_batch or config.micro_batch_size
    args.accumulation = args.accumulation or config.accumulation_steps
    args.methods = parse_choices(args.methods, METHODS, "--methods")
    args.sweep_methods = parse_choices(args.sweep_methods, METHODS, "--sweep-methods")
    args.sweep_k = parse_int_list(args.sweep_k)
    args.loader_workers = parse_int_list(args.loader_workers)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.figure = args.figure or args.out / "memory_vs_accumulation.png"
    return args


def required_pairs(args: argparse.Namespace) -> int:
    """PhantomCXR pairs to generate so the train split covers the largest batch (about 80 % is train)."""
    largest = max([args.micro_batch * args.accumulation, args.micro_batch * (args.loader_batches + 1)]
                  + [args.sweep_micro_batch * k for k in args.sweep_k])
    return max(64, math.ceil(largest * 1.4) + 16)


def measure(spec: WorkerSpec, args: argparse.Namespace) -> dict[str, Any]:
    """Run one configuration, in its own process unless ``--isolation none``."""
    logger.info("measuring %s with b=%d, k=%d", spec.method, spec.micro_batch_size, spec.accumulation_steps)
    if args.isolation == "process":
        return run_isolated(spec, timeout=args.worker_timeout)
    return run_spec(spec)


def base_spec(args: argparse.Namespace, manifest: Path) -> WorkerSpec:
    """Return the spec fields that every configuration of this run shares (method and sizes are replaced)."""
    return WorkerSpec(method="floor", preset=args.preset, manifest=str(manifest), micro_batch_size=args.micro_batch,
                      accumulation_steps=args.accumulation, warmup=args.warmup, repeats=args.repeats,
                      device=args.device, threads=args.threads, pad_to_max_length=args.pad_to_max_length,
                      alpha=args.alpha)


def run_timing(args: argparse.Namespace, manifest: Path) -> list[dict[str, Any]]:
    """Measure every method at (b, k), ``rounds`` times in turn."""
    spec = base_spec(args, manifest)
    records = []
    for round_index in range(args.rounds):
        for method in args.methods:
            # Plain CLIP takes the whole effective batch as one batch.
            sizes = (args.micro_batch * args.accumulation, 1) if method == "clip" else (args.micro_batch,
                                                                                        args.accumulation)
            record = measure(dataclasses.replace(spec, method=method, micro_batch_size=sizes[0],
                                                 accumulation_steps=sizes[1]), args)
            records.append({**record, "round": round_index, "method": method})
    return records


def run_sweep(args: argparse.Namespace, manifest: Path) -> list[dict[str, Any]]:
    """Measure peak memory with b fixed and k swept. Plain CLIP runs one batch of k * b.

    Only memory is wanted, so the warm-up step, which creates the optimizer state, runs
    on b pairs only, and one step is measured.
    """
    b = args.sweep_micro_batch
    spec = dataclasses.replace(base_spec(args, manifest), warmup=1, repeats=1, warmup_pairs=b, exact_memory=True)
    records = []
    for k in args.sweep_k:
        for method in args.sweep_methods:
            sizes = (b * k, 1) if method == "clip" else (b, k)
            record = measure(dataclasses.replace(spec, method=method, micro_batch_size=sizes[0],
                                                 accumulation_steps=sizes[1]), args)
            records.append({**record, "method": method, "k": k, "sweep_micro_batch": b})
    return records


def summarize_timing(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Summarize the timing: per method, medians over all measured steps of all rounds, and ratios to floor and CLIP."""
    rows = []
    for method in dict.fromkeys(record["method"] for record in records):
        mine = [record for record in records if record["method"] == method]
        walls = [t for record in mine for t in record["step_times_s"]]
        cpus = [t for record in mine for t in record["cpu_times_s"] if t is not None]
        first = mine[0]
        out_of_memory = any(record["out_of_memory"] for record in mine)
        wall = float(np.median(walls)) if walls else math.nan
        rows.append({
            "method": method,
            "B": first["effective_batch"],
            "b": first["micro_batch_size"],
            "k": first["accumulation_steps"],
            "steps": len(walls),
            "wall_s": wall,
            "wall_iqr_s": float(np.subtract(*np.percentile(walls, [75, 25]))) if walls else math.nan,
            "cpu_s": float(np.median(cpus)) if cpus else math.nan,
            "samples_per_s": first["effective_batch"] / wall if walls else math.nan,
            "peak_mb": _max_or_nan(record["peak_mb"] for record in mine),
            "step_mb": _max_or_nan(record["step_mb"] for record in mine),
            "out_of_memory": out_of_memory,
        })
    frame = pd.DataFrame(rows)
    for reference, label in (("floor", "floor"), ("clip", "clip")):
        if reference in set(frame["method"]):
            row = frame.loc[frame["method"] == reference].iloc[0]
            frame[f"wall_x_{label}"] = frame["wall_s"] / row["wall_s"]
            frame[f"cpu_x_{label}"] = frame["cpu_s"] / row["cpu_s"]
            if label == "clip":
                frame["step_mb_x_clip"] = frame["step_mb"] / row["step_mb"]
    return frame


def _max_or_nan(values) -> float:
    present = [value for value in values if value is not None]
    return float(max(present)) if present else math.nan


def summarize_sweep(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Summarize the sweep: per (method, k), effective batch, peak and step memory, and their ratio at the smallest k."""
    frame = pd.DataFrame([{"method": r["method"], "k": r["k"], "b": r["sweep_micro_batch"], "B": r["effective_batch"],
                           "peak_mb": r["peak_mb"], "step_mb": r["step_mb"], "base_mb": r["base_mb"],
                           "out_of_memory": r["out_of_memory"]} for r in records])
    frame = frame.astype({"peak_mb": float, "step_mb": float, "base_mb": float})
    smallest = frame.sort_values("k").groupby("method").first()
    frame["peak_x_k_min"] = frame["peak_mb"] / frame["method"].map(smallest["peak_mb"])
    frame["step_x_k_min"] = frame["step_mb"] / frame["method"].map(smallest["step_mb"])
    return frame.sort_values(["method", "k"]).reset_index(drop=True)


def per_sample_memory(sweep: pd.DataFrame, method: str = "clip") -> tuple[float, float] | None:
    """Fit a method's step memory against B by least squares: (MiB per pair, intercept MiB), or None."""
    rows = sweep[(sweep["method"] == method) & ~sweep["out_of_memory"]].dropna(subset=["step_mb"])
    if rows["B"].nunique() < 2:
        return None
    slope, intercept = np.polyfit(rows["B"].to_numpy(float), rows["step_mb"].to_numpy(float), 1)
    return float(slope), float(intercept)


def plot_sweep(sweep: pd.DataFrame, path: Path, title: str) -> Path:
    """Draw step memory and total peak memory against k, one line per method, and save a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"clip": ("o", "-"), "momentum": ("s", "-"), "gradcache": ("^", "--"), "local": ("v", ":"),
              "floor": ("x", ":")}  # distinct markers and lines, because momentum and gradcache overlap
    for method in sorted(set(sweep["method"]), key=lambda name: list(styles).index(name)):
        rows = sweep[sweep["method"] == method]
        label = "plain CLIP, one batch of k * b" if method == "clip" else f"{method}, k micro-batches of b"
        marker, line = styles.get(method, ("o", "-"))
        axes[0].plot(rows["k"], rows["step_mb"], marker=marker, linestyle=line, label=label)
        axes[1].plot(rows["k"], rows["peak_mb"], marker=marker, linestyle=line, label=label)
    for axis, name in zip(axes, ("memory added by the step (MiB)", "peak memory of the process (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted(sweep["k"].unique()), [str(k) for k in sorted(sweep["k"].unique())])
        axis.set_xlabel("accumulation steps k (effective batch = k * b)")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
        axis.set_ylim(bottom=0)
    axes[0].legend()
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def t4_estimate(records: list[dict[str, Any]], slope_mb: float, intercept_mb: float) -> pd.DataFrame:
    """Estimate the largest micro-batch on a T4 from the stand-in's measured memory per pair.

    Static memory is counted from the parameters (float32 weights of student and teacher,
    gradients and two AdamW moments of the trainable ones, plus the vocabulary the
    stand-in lacks). The activations per pair were measured in float32 on the CPU; under
    float16 autocast they are assumed to take between half of that and all of it, which
    gives the two rows. This is an estimate, not a measurement on a T4.
    """
    record = records[0]
    missing = record.get("missing_parameters", 0)
    parameters = record["parameters"] + missing
    trainable = record["trainable_parameters"] + missing
    static_mb = (2 * parameters + 3 * trainable) * 4 / 2**20
    rows = []
    for label, factor in (("fp16 activations at half of fp32 (optimistic)", 0.5),
                          ("fp16 activations as large as fp32 (conservative)", 1.0)):
        per_pair = slope_mb * factor
        largest = int((T4_ALLOCATABLE_MIB - static_mb - intercept_mb * factor) // per_pair)
        rows.append({"assumption": label, "static_mb": static_mb, "mb_per_pair": per_pair,
                     "largest_micro_batch": max(largest, 0)})
    return pd.DataFrame(rows)


def loader_section(args: argparse.Namespace, manifest: Path, timing: pd.DataFrame) -> pd.DataFrame | None:
    """Time the DataLoader and compare it with the ``momentum`` step's consumption."""
    from benchmarks.loader import compare_with_step, measure_loader

    if not args.loader_workers:
        return None
    config = benchmark_config(args.preset, micro_batch_size=args.micro_batch)
    loader = measure_loader(config, manifest, args.loader_workers, args.loader_batches, args.device)
    consumer = "momentum" if "momentum" in set(timing["method"]) else timing["method"].iloc[0]
    rate = float(timing.loc[timing["method"] == consumer, "samples_per_s"].iloc[0])
    return compare_with_step(loader, rate, consumer)


def check_targets(timing: pd.DataFrame | None, sweep: pd.DataFrame | None) -> pd.DataFrame:
    """Compare the measurements with the project's targets (reported, never asserted).

    Step time: ``momentum`` at most 1.45 x the floor and ``gradcache`` at most 2.1 x, on
    wall clock and on CPU time. Memory: ``momentum`` at the largest k within 1.1 x its
    value at the smallest k, on the step memory and on the process peak.
    """
    rows = []
    if timing is not None and "floor" in set(timing["method"]):
        for method, limit in (("momentum", 1.45), ("gradcache", 2.1)):
            if method not in set(timing["method"]):
                continue
            row = timing.loc[timing["method"] == method].iloc[0]
            for column, clock in (("wall_x_floor", "wall clock"), ("cpu_x_floor", "CPU time")):
                if column in row and not math.isnan(row[column]):
                    rows.append({"target": f"{method} step time / floor ({clock})", "limit": limit,
                                 "measured": row[column], "met": bool(row[column] <= limit)})
    if sweep is not None and "momentum" in set(sweep["method"]):
        rows_k = sweep[sweep["method"] == "momentum"].sort_values("k")
        last = rows_k.iloc[-1]
        for column, label in (("step_x_k_min", "step memory"), ("peak_x_k_min", "process peak")):
            rows.append({"target": f"momentum {label} at k = {last['k']} / k = {rows_k.iloc[0]['k']}", "limit": 1.1,
                         "measured": last[column], "met": bool(last[column] <= 1.1)})
    return pd.DataFrame(rows, columns=["target", "limit", "measured", "met"])


def timing_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Select the step-cost columns that exist, in reading order, for the printed table."""
    order = ["method", "B", "b", "k", "steps", "wall_s", "wall_iqr_s", "cpu_s", "samples_per_s", "wall_x_floor",
             "cpu_x_floor", "wall_x_clip", "cpu_x_clip", "peak_mb", "step_mb", "step_mb_x_clip"]
    frame = frame[[column for column in order if column in frame.columns]]
    return frame.dropna(axis=1, how="all")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, write its files under ``--out`` and print the tables."""
    args = resolve_options(build_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.threads and args.device == "cpu":
        import torch

        torch.set_num_threads(args.threads)  # the loader section runs here; the workers set their own
    machine = machine_record(args.device)
    config = benchmark_config(args.preset)
    manifest = prepare_phantom(args.out / "phantomcxr", required_pairs(args), config.phantom_image_size)

    sections = []
    raw: dict[str, Any] = {"machine": machine, "options": {k: str(v) for k, v in vars(args).items()}}
    timing = sweep = None
    if args.methods:
        raw["timing"] = run_timing(args, manifest)
        timing = summarize_timing(raw["timing"])
        timing.to_csv(args.out / "step_cost.csv", index=False)
        sections.append((f"Step cost: {args.preset}, B = {args.micro_batch * args.accumulation} "
                         f"(b = {args.micro_batch}, k = {args.accumulation}), {args.device}",
                         markdown_table(timing_columns(timing))))

    if args.sweep_k:
        raw["sweep"] = run_sweep(args, manifest)
        sweep = summarize_sweep(raw["sweep"])
        sweep.to_csv(args.out / "memory_sweep.csv", index=False)
        plot_sweep(sweep, args.figure, f"{args.preset}: peak memory against accumulation, b = {args.sweep_micro_batch}"
                                       f" ({args.device})")
        sections.append((f"Memory against accumulation: b = {args.sweep_micro_batch}", markdown_table(sweep)))
        fit = per_sample_memory(sweep)
        if fit is not None:
            sections.append(("Memory per pair (plain CLIP)",
                             f"step memory = {fit[1]:.1f} MiB + {fit[0]:.2f} MiB per pair (least squares over B)"))
            if args.preset == OFFLINE_T4:
                estimate = t4_estimate(raw["sweep"], *fit)
                sections.append(("T4 estimate (not measured on a T4)", markdown_table(estimate)))

    targets = check_targets(timing, sweep)
    if len(targets):
        sections.append(("Targets (measured, not asserted)", markdown_table(targets)))
    records = raw.get("timing") or raw.get("sweep") or []
    if records:
        note = records[0]["memory_method"]
        if raw.get("sweep") and args.device == "cpu":
            note += (f". Memory-sweep workers set MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD_BYTES}, so the resident "
                     "set follows live tensors; timing workers keep glibc's default allocator.")
        sections.append(("Peak memory method", note))

    if timing is not None:
        loader = loader_section(args, manifest, timing)
        if loader is not None:
            loader.to_csv(args.out / "loader.csv", index=False)
            sections.append(("Data pipeline", markdown_table(loader)))

    machine["load_average_after"] = load_average()
    sections.append(("Machine", markdown_table(pd.DataFrame([{k: str(v) for k, v in machine.items()}]).T
                                               .reset_index().set_axis(["field", "value"], axis=1))))
    write_json(args.out / "step_cost_raw.json", raw)
    report = write_markdown(args.out / "tables.md", sections)
    print(report.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
