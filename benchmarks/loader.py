"""Data pipeline throughput: samples per second of the training DataLoader alone.

The loader is built as ``Trainer`` builds it (``EpochBatchSampler``, ``PairCollator``,
``seed_worker``), reads PhantomCXR PNGs, resizes them and tokenises the reports, but
no model runs. Compare its rate with the samples per second one training step
consumes: a loader slower than the step starves the model. With ``num_workers=0`` the
loader runs inside the training loop, so its time adds to every step. Workers overlap
loading with the step, but on a CPU they compete with the model for the same cores.

    python -m benchmarks.loader --preset cpu-demo --workers 0,1,2
    python -m benchmarks.loader --preset cpu-demo --manifest data/iu_xray/manifest.csv
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from torch.utils.data import DataLoader

from benchmarks.common import benchmark_config, markdown_table, parse_int_list, prepare_phantom

logger = logging.getLogger(__name__)


def build_loader(dataset, collator, micro_batch_size: int, workers: int, device: torch.device, seed: int = 0):
    """Build a DataLoader with the sampler, collator and worker seeding that ``Trainer`` uses."""
    from msd_core.data import EpochBatchSampler
    from msd_core.runtime import seed_worker

    sampler = EpochBatchSampler(len(dataset), micro_batch_size, seed)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=workers,
                      pin_memory=device.type == "cuda", worker_init_fn=seed_worker, persistent_workers=False)


def measure_loader(config, manifest: str | Path, workers: Sequence[int], batches: int,
                   device: str | torch.device = "cpu") -> pd.DataFrame:
    """Measure the samples per second of the training DataLoader for each worker count.

    Args:
        config: the ``TrainConfig`` whose model fixes image size, normalisation and tokenizer.
        manifest: the manifest to read (its train split).
        workers: DataLoader ``num_workers`` values to try.
        batches: micro-batches timed per worker count, after the first one.
        device: decides ``pin_memory``, as in training.

    Returns:
        One row per worker count: ``workers``, ``micro_batch``, ``first_batch_s`` (worker
        start-up plus one batch), ``samples_per_s`` over the timed batches, ``batches``.
    """
    from msd_core.data import ImageTextDataset, PairCollator
    from msd_core.manifest import read_manifest
    from msd_core.model import build_model

    device = torch.device(device)
    frame = read_manifest(manifest)
    model = build_model(config, tokenizer_texts=frame.loc[frame["split"] == "train", "text"].astype(str).tolist())
    dataset = ImageTextDataset.for_model(manifest, model, split="train")
    collator = PairCollator(model.tokenizer, model.spec.max_text_length)
    available = len(dataset) // config.micro_batch_size - 1
    if available < 1:
        raise ValueError(f"{manifest} has {len(dataset)} train rows, too few for two micro-batches of "
                         f"{config.micro_batch_size}; generate more pairs")
    timed = min(batches, available)

    rows = []
    for count in workers:
        loader = build_loader(dataset, collator, config.micro_batch_size, count, device)
        started = time.perf_counter()
        iterator = iter(loader)
        next(iterator)
        first = time.perf_counter() - started
        started = time.perf_counter()
        samples = sum(len(next(iterator)["index"]) for _ in range(timed))
        elapsed = time.perf_counter() - started
        del iterator
        rows.append({"workers": count, "micro_batch": config.micro_batch_size, "first_batch_s": first,
                     "samples_per_s": samples / elapsed, "batches": timed})
        logger.info("loader with %d workers: %.0f samples/s", count, samples / elapsed)
    return pd.DataFrame(rows)


def compare_with_step(loader: pd.DataFrame, step_samples_per_s: float, label: str) -> pd.DataFrame:
    """Add the ratio of loader rate to a training step's consumption (> 1: the loader keeps up)."""
    frame = loader.copy()
    frame[f"step consumes ({label})"] = step_samples_per_s
    frame["loader / step"] = frame["samples_per_s"] / step_samples_per_s
    return frame


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the stand-alone loader benchmark."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-demo", help="msd_core preset or colab-t4-offline (default: cpu-demo)")
    parser.add_argument("--micro-batch", type=int, help="pairs per batch (default: the preset's micro_batch_size)")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated num_workers values (default: 0,1,2)")
    parser.add_argument("--batches", type=int, default=20, help="batches timed per worker count (default: 20)")
    parser.add_argument("--manifest", type=Path, help="time this manifest's train split instead of PhantomCXR")
    parser.add_argument("--pairs", type=int, default=600, help="PhantomCXR pairs to generate without --manifest "
                                                               "(default: 600)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda; sets pin_memory as training does")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/loader"), help="folder for loader.csv")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the loader benchmark and print its table."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {}
    if args.micro_batch:
        overrides["micro_batch_size"] = args.micro_batch
    config = benchmark_config(args.preset, **overrides)
    manifest = args.manifest or prepare_phantom(args.out / "phantomcxr", args.pairs, config.phantom_image_size)
    table = measure_loader(config, manifest, parse_int_list(args.workers), args.batches, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "loader.csv", index=False)
    print(markdown_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
