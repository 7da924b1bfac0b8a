"""The ``evaluate`` sub-command: arguments, the run, and the tables printed to stdout.

``msd_core.cli`` registers it as::

    python -m msd_core evaluate --checkpoint runs/cpu-demo --manifest data/phantomcxr/manifest.csv

This is the command-line layer, so it prints its results; the library itself only logs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

DEFAULT_OUT = "evaluation"


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``evaluate`` to ``parser`` and return it."""
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a step-*.pt checkpoint, or a run folder (its newest readable checkpoint is used)")
    parser.add_argument("--manifest", type=Path,
                        help="manifest CSV to evaluate on (default: the manifest the checkpoint was trained on)")

    parser.add_argument("--out", type=Path,
                        help=f"output folder for tables, figures and summary.md (default: {DEFAULT_OUT}/ inside "
                             "the run folder)")
    parser.add_argument("--prompts", default="phantomcxr",
                        help="zero-shot prompt file: a packaged name such as phantomcxr, or a YAML path "
                             "(default: phantomcxr)")
    parser.add_argument("--no-prompts", action="store_true", help="skip zero-shot and the linear probe")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--probe-train-split", default="train",
                        help="split the linear probe is fitted on (default: train)")
    parser.add_argument("--baseline", choices=["random", "none"], default="random",
                        help="also evaluate a randomly initialised model of the same architecture (default: random)")

    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--projection", choices=["umap", "tsne", "pca"], default="umap",
                        help="2-D projection of the embedding maps (default: umap)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0],
                        help="shares of the training labels for the linear probe (default: 0.01 0.1 1.0)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="linear-probe seeds (default: 0 1 2)")

    parser.add_argument("--batch-size", type=int, default=64, help="pairs per forward pass (default: 64)")
    parser.add_argument("--cache-dir", type=Path,
                        help="folder for cached embeddings (default: cache/ inside the output folder)")
    parser.add_argument("--no-cache", action="store_true", help="always recompute the embeddings")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="drop manifest rows with a missing image or empty report instead of stopping")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``evaluate_checkpoint`` with the parsed options, print its tables, and return 0."""
    from .evaluate import evaluate_checkpoint

    out_dir = args.out if args.out is not None else _default_out(args.checkpoint)
    cache_dir = None if args.no_cache else (args.cache_dir or out_dir / "cache")
    tables = evaluate_checkpoint(
        args.checkpoint, args.manifest, out_dir=out_dir, prompts=None if args.no_prompts else args.prompts,
        split=args.split, device=args.device, probe_train_split=args.probe_train_split, baseline=args.baseline,
        fractions=tuple(args.fractions), seeds=tuple(args.seeds), projection=args.projection,
        batch_size=args.batch_size, cache_dir=cache_dir, skip_bad_rows=args.skip_bad_rows,
        progress=not args.no_progress,
    )
    print(format_tables(tables))
    print(f"report: {out_dir / 'summary.md'}")
    return 0


def evaluate_after_pretraining(trainer, *, device: str | None = None) -> int:
    """Evaluate a finished ``Trainer``'s last checkpoint on its manifest's test split and print the tables.

    The report goes to ``<output_dir>/evaluation``. PhantomCXR prompts are used; on
    another manifest their tasks are skipped unless its columns match, and retrieval
    still runs.
    """
    from .evaluate import evaluate_checkpoint

    out_dir = Path(trainer.output_dir) / DEFAULT_OUT
    tables = evaluate_checkpoint(trainer.last_checkpoint, trainer.manifest, out_dir=out_dir,
                                 device=str(trainer.device) if device is None else device,
                                 cache_dir=out_dir / "cache", progress=trainer.progress)
    print(format_tables(tables))
    print(f"report: {out_dir / 'summary.md'}")
    return 0


def format_tables(tables: dict[str, pd.DataFrame]) -> str:
    """Format the result tables as aligned plain text, one titled block per table."""
    blocks = []
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 3):
        for name, frame in tables.items():
            if frame.empty:
                continue
            if name == "zero_shot":
                frame = frame[frame["class"] == "all"]  # per-class rows are in the CSV
            blocks.append(f"{name.replace('_', ' ')}:\n{frame.to_string(index=False)}")
    return "\n\n".join(blocks)


def _default_out(checkpoint: Path) -> Path:
    """``<run folder>/evaluation`` for a checkpoint file, a checkpoints folder or a run folder."""
    checkpoint = Path(checkpoint)
    run = checkpoint.parent if checkpoint.is_file() else checkpoint
    if run.name == "checkpoints":
        run = run.parent
    return run / DEFAULT_OUT
