"""Quality ablation: zero-shot accuracy and Recall@5 of CLIP and MSD arms on PhantomCXR, at equal compute.

Every arm trains from the same initialisation seed on the same PhantomCXR set and
consumes the same number of training pairs. It is then scored on the held-out test
split: zero-shot accuracy of the multiclass ``finding`` task of
``msd_core/prompts/phantomcxr.yaml`` and image-to-text Recall@5 (identical reports
count as hits). Arms, for a micro-batch b and k accumulation steps (B = k * b):

- ``clip-b``: plain CLIP at batch b (alpha 0, no queue, k = 1). To see as many pairs as
  the others it runs k times more optimizer steps, with a k times longer lr warm-up, so
  the compute budget (pairs seen, forward and backward passes) is the same;
- ``clip-B``: plain CLIP at batch B, the large-batch reference;
- ``local``: naive accumulation of k micro-batches of b, alpha 0, each micro-batch its
  own negatives;
- ``msd-momentum``: MSD, k micro-batches of b, teacher keys of all B pairs, alpha > 0;
- ``msd-gradcache``: MSD with exact large-batch student negatives, alpha > 0;
- ``momentum-alpha0`` (optional): the momentum negatives without distillation, to
  separate the two effects.

"Plain CLIP" runs as ``negatives="local"`` with k = 1 and alpha 0, which is exactly the
symmetric CLIP loss over the batch (the EMA teacher is still updated, but unused).
The student is evaluated. Seeds change the initialisation and the batch order; the
data set is the same for every seed.

    python -m benchmarks.quality_ablation
    python -m benchmarks.quality_ablation --quick
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from benchmarks.common import (benchmark_config, load_average, machine_record, markdown_table, parse_choices,
                               parse_int_list, prepare_phantom, write_json, write_markdown)
from msd_core.cli import parse_overrides

logger = logging.getLogger(__name__)

ARMS = ("clip-b", "clip-B", "local", "msd-momentum", "msd-gradcache", "momentum-alpha0")
DEFAULT_ARMS = ARMS[:5]
# Fields each arm sets itself, which --set must not change.
FIXED_FIELDS = {"manifest", "output_dir", "seed", "negatives", "alpha", "micro_batch_size", "accumulation_steps",
                "max_steps", "warmup_steps", "queue_size", "momentum", "num_workers", "checkpoint_every",
                "keep_checkpoints"}
QUICK = dict(steps=20, seeds="0", pairs=600)
DEFAULTS = dict(steps=150, seeds="0,1,2", pairs=2000)


@dataclass(frozen=True)
class ArmPlan:
    """The settings of one arm; ``samples_seen`` = steps * micro-batch * accumulation."""

    name: str
    negatives: str
    alpha: float
    micro_batch_size: int
    accumulation_steps: int
    steps: int
    warmup_steps: int

    @property
    def samples_seen(self) -> int:
        """Training pairs the arm consumes over the whole run."""
        return self.steps * self.micro_batch_size * self.accumulation_steps


def plan_arms(names: Sequence[str], micro_batch: int, accumulation: int, steps: int, warmup: int,
              alpha: float) -> list[ArmPlan]:
    """Plan the arms of one ablation: equal pairs seen, ``steps`` optimizer steps at the effective batch.

    Args:
        names: arm names from ``ARMS``.
        micro_batch, accumulation: b and k.
        steps: optimizer steps of the arms with effective batch B = k * b.
        warmup: lr warm-up steps of those arms; ``clip-b`` gets k times as many.
        alpha: distillation weight of the MSD arms.
    """
    big = micro_batch * accumulation
    table = {
        "clip-b": ("local", 0.0, micro_batch, 1, steps * accumulation, warmup * accumulation),
        "clip-B": ("local", 0.0, big, 1, steps, warmup),
        "local": ("local", 0.0, micro_batch, accumulation, steps, warmup),
        "msd-momentum": ("momentum", alpha, micro_batch, accumulation, steps, warmup),
        "msd-gradcache": ("gradcache", alpha, micro_batch, accumulation, steps, warmup),
        "momentum-alpha0": ("momentum", 0.0, micro_batch, accumulation, steps, warmup),
    }
    return [ArmPlan(name, *table[name]) for name in names]


def train_and_score(plan: ArmPlan, seed: int, args: argparse.Namespace, manifest: Path) -> dict[str, Any]:
    """Train one arm with one seed, score the student on ``args.split`` and return a result row."""
    from msd_core.train import Trainer

    run_dir = args.out / "runs" / f"{plan.name}-seed{seed}"
    # A run kept by an earlier --keep-runs would make the new Trainer raise, so it is deleted first.
    shutil.rmtree(run_dir, ignore_errors=True)
    config = benchmark_config(
        args.preset, manifest=str(manifest), output_dir=str(run_dir), seed=seed, negatives=plan.negatives,
        alpha=plan.alpha, micro_batch_size=plan.micro_batch_size, accumulation_steps=plan.accumulation_steps,
        max_steps=plan.steps, warmup_steps=plan.warmup_steps, queue_size=0, momentum=args.momentum,
        num_workers=0, checkpoint_every=plan.steps + 1, keep_checkpoints=1, **args.overrides)
    started = time.perf_counter()
    trainer = Trainer(config, device=args.device, progress=False)
    history = trainer.fit().to_frame()
    train_seconds = time.perf_counter() - started

    scores = score_model(trainer.model.eval(), manifest, args.split, trainer.device)
    if not args.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)

    row = {"arm": plan.name, "seed": seed, "negatives": plan.negatives, "alpha": plan.alpha,
           "b": plan.micro_batch_size, "k": plan.accumulation_steps,
           "B": plan.micro_batch_size * plan.accumulation_steps, "steps": plan.steps,
           "samples_seen": plan.samples_seen, **scores, "final_loss": float(history["loss"].iloc[-1]),
           "train_seconds": train_seconds}
    logger.info("%s seed %d: zero-shot accuracy %.3f, image-to-text R@5 %.3f (%.0f s)", plan.name, seed,
                row["zero_shot_accuracy"], row["i2t_recall_at_5"], train_seconds)
    return row


def score_model(model, manifest: Path, split: str, device) -> dict[str, float]:
    """Score a model on one split: zero-shot ``finding`` accuracy and macro-F1, and retrieval recalls.

    Also returns the chance levels: ``zero_shot_chance`` (1 / number of classes),
    ``zero_shot_majority`` (the share of the most common class, what always guessing it
    scores) and ``i2t_recall_at_5_chance`` (Recall@5 of a random ranking).
    """
    from msd_core.data import ImageTextDataset
    from msd_core.evaluate import embed, retrieval, zero_shot

    dataset = ImageTextDataset.for_model(manifest, model, split=split)
    embeddings = embed(model, dataset, batch_size=64, device=device, progress=False)
    zero_shot_table = zero_shot(embeddings, model, "phantomcxr", "finding")
    retrieval_table = retrieval(embeddings.image, embeddings.text, texts=embeddings.texts, ks=(1, 5, 10))
    image_to_text = retrieval_table[retrieval_table["direction"] == "image_to_text"].set_index("k")
    text_to_image = retrieval_table[retrieval_table["direction"] == "text_to_image"].set_index("k")
    by_metric = zero_shot_table[zero_shot_table["class"] == "all"].set_index("metric")
    return {
        "zero_shot_accuracy": float(by_metric.loc["accuracy", "value"]),
        "zero_shot_macro_f1": float(by_metric.loc["macro_f1", "value"]),
        "i2t_recall_at_1": float(image_to_text.loc[1, "recall"]),
        "i2t_recall_at_5": float(image_to_text.loc[5, "recall"]),
        "t2i_recall_at_5": float(text_to_image.loc[5, "recall"]),
        "zero_shot_chance": float(by_metric.loc["accuracy", "chance"]),
        "zero_shot_majority": float(embeddings.frame["finding"].value_counts(normalize=True).max()),
        "i2t_recall_at_5_chance": float(image_to_text.loc[5, "recall_chance"]),
        "test_pairs": len(embeddings),
    }


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Summarize per arm: mean, sample standard deviation, min and max over seeds of the two headline metrics."""
    rows = []
    for arm, group in results.groupby("arm", sort=False):
        row = {"arm": arm, "b": group["b"].iloc[0], "k": group["k"].iloc[0], "B": group["B"].iloc[0],
               "steps": group["steps"].iloc[0], "samples_seen": group["samples_seen"].iloc[0], "seeds": len(group)}
        for column, short in (("zero_shot_accuracy", "zs_acc"), ("i2t_recall_at_5", "i2t_r5")):
            values = group[column].to_numpy(float)
            row[f"{short}_mean"] = float(values.mean())
            row[f"{short}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
            row[f"{short}_min"] = float(values.min())
            row[f"{short}_max"] = float(values.max())
        row["train_s_mean"] = float(group["train_seconds"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def gap_closed(summary: pd.DataFrame, metric: str = "zs_acc_mean") -> pd.DataFrame:
    """Compute the share of the clip-b to clip-B gap each arm closes: (arm - clip-b) / (clip-B - clip-b).

    1 means as good as large-batch CLIP and 0 as good as small-batch CLIP. The share is
    NaN when either reference arm is missing, or when clip-B does not beat clip-b, since
    there is then no gap to close. ``gap`` is clip-B minus clip-b whenever both exist.
    """
    values = dict(zip(summary["arm"], summary[metric]))
    if "clip-b" not in values or "clip-B" not in values:
        return pd.DataFrame({"arm": summary["arm"], "gap": math.nan, "closed": math.nan})
    gap = values["clip-B"] - values["clip-b"]
    if gap <= 0:
        return pd.DataFrame({"arm": summary["arm"], "gap": gap, "closed": math.nan})
    closed = [(values[arm] - values["clip-b"]) / gap for arm in summary["arm"]]
    return pd.DataFrame({"arm": summary["arm"], "gap": gap, "closed": closed})


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the quality ablation."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality_ablation",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smoke",
                        help="encoders: an msd_core preset or colab-t4-offline (default: smoke, the only towers that "
                             "train long enough in minutes on two CPU cores)")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"arms to run, from {','.join(ARMS)} "
                                                                       f"(default: {','.join(DEFAULT_ARMS)})")
    parser.add_argument("--micro-batch", type=int, default=8, help="b (default: 8)")
    parser.add_argument("--accumulation", type=int, default=8, help="k (default: 8)")
    parser.add_argument("--steps", type=int, help="optimizer steps at the effective batch; clip-b runs k times "
                                                  f"as many (default: {DEFAULTS['steps']})")
    parser.add_argument("--warmup", type=int, default=5, help="lr warm-up steps at the effective batch (default: 5)")
    parser.add_argument("--alpha", type=float, default=0.4, help="distillation weight of the MSD arms (default: 0.4)")
    parser.add_argument("--momentum", type=float, default=0.97,
                        help="EMA momentum of the teacher, replacing the preset's (default: 0.97, a time constant "
                             "of about 33 steps, a fifth of the default run)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a TrainConfig field for every arm, value parsed as YAML, e.g. --set lr=3e-3 "
                             "(repeatable)")
    parser.add_argument("--seeds", help=f"comma-separated training seeds (default: {DEFAULTS['seeds']})")
    parser.add_argument("--pairs", type=int, help=f"PhantomCXR pairs, 80/10/10 train/val/test by patient "
                                                  f"(default: {DEFAULTS['pairs']})")
    parser.add_argument("--split", default="test", help="split to score; tune settings on val, report test "
                                                        "(default: test)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: CUDA when available)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on the CPU; 0 keeps torch's choice (default: 1, because the tiny "
                             "towers' operators are too small to gain from more threads, and on shared cores "
                             "every thread barrier can wait for a descheduled thread)")
    parser.add_argument("--keep-runs", action="store_true", help="keep each arm's checkpoints and history")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['steps']} steps, seed 0 and {QUICK['pairs']} "
                                                             "pairs, for a first look")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/quality"),
                        help="folder for the result tables (default: runs/benchmarks/quality)")
    return parser


def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from ``--quick`` or the defaults and check the arm names."""
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, QUICK[name] if args.quick else value)
    args.arms = parse_choices(args.arms, ARMS, "--arms")
    args.seeds = parse_int_list(args.seeds)
    if not args.seeds:
        raise ValueError("--seeds is empty: give at least one seed, for example --seeds 0")
    args.overrides = parse_overrides(args.set)
    fixed = sorted(set(args.overrides) & FIXED_FIELDS)
    if fixed:
        raise ValueError(f"--set cannot change {fixed}: the ablation sets them per arm; use the dedicated options")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run every arm for every seed, write the tables under ``--out`` and print them."""
    args = resolve_options(build_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_record(args.device)
    config = benchmark_config(args.preset)
    manifest = prepare_phantom(args.out / "phantomcxr", args.pairs, config.phantom_image_size)
    plans = plan_arms(args.arms, args.micro_batch, args.accumulation, args.steps, args.warmup, args.alpha)

    rows = []
    started = time.perf_counter()
    for seed in args.seeds:  # seeds outermost, so a drift in machine load touches every arm alike
        for plan in plans:
            rows.append(train_and_score(plan, seed, args, manifest))
            # Written after every run, so an interrupted ablation keeps the runs it finished.
            pd.DataFrame(rows).to_csv(args.out / "quality_runs.csv", index=False)
    machine["load_average_after"] = load_average()
    machine["total_seconds"] = round(time.perf_counter() - started, 1)

    results = pd.DataFrame(rows)
    summary = summarize(results)
    closed = gap_closed(summary)
    results.to_csv(args.out / "quality_runs.csv", index=False)
    summary.to_csv(args.out / "quality_summary.csv", index=False)
    settings = {"preset": args.preset, "micro_batch": args.micro_batch, "accumulation": args.accumulation,
                "steps": args.steps, "warmup": args.warmup, "alpha": args.alpha, "momentum": args.momentum,
                "seeds": args.seeds, "pairs": args.pairs, "split": args.split, "overrides": args.overrides}
    write_json(args.out / "quality_raw.json", {"machine": machine, "settings": settings, "runs": rows})
    report = write_markdown(args.out / "tables.md", [
        ("Settings", markdown_table(pd.DataFrame([settings]).astype(str))),
        ("Quality per arm (mean and spread over seeds)", markdown_table(summary)),
        ("Share of the clip-b to clip-B zero-shot gap closed", markdown_table(closed)),
        ("Every run", markdown_table(results)),
        ("Machine", markdown_table(pd.DataFrame([{k: str(v) for k, v in machine.items()}]).T.reset_index()
                                   .set_axis(["field", "value"], axis=1))),
    ])
    print(report.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
