"""Command line: ``python -m msd_core pretrain | evaluate | info | phantom``.

The main job, offline on the embedded PhantomCXR set::

    python -m msd_core pretrain --preset cpu-demo

pretrains, then evaluates the final checkpoint on PhantomCXR's test split and writes
the results next to the checkpoints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from .config import load_yaml

logger = logging.getLogger("msd_core")

# Errors a user can fix from the message alone; they are printed without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ImportError, RuntimeError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of the output went away (``info RUN | head``). Point stdout at
        # /dev/null so that flushing it at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except USER_ERRORS as error:
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser, one sub-command per task."""
    parser = argparse.ArgumentParser(prog="python -m msd_core", description=terminal_text(__doc__.split("\n\n")[0]))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    pretrain = commands.add_parser("pretrain", help="pretrain a dual encoder with MSD",
                                   description="Pretrain a dual encoder with MSD, then evaluate it.")
    pretrain.add_argument("--preset", default="cpu-demo", help="named settings: smoke, cpu-demo, colab-t4, paper "
                          "(default: cpu-demo)")
    pretrain.add_argument("--config", type=Path, help="a YAML config written by TrainConfig.to_yaml; replaces --preset")
    pretrain.add_argument("--manifest", help="train on this manifest CSV instead of generating PhantomCXR")
    pretrain.add_argument("--output-dir", help="folder for checkpoints, history and figures")
    pretrain.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    pretrain.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in total")
    pretrain.add_argument("--skip-bad-rows", action="store_true",
                          help="drop manifest rows with a missing image or empty report instead of stopping")
    pretrain.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                          help="override one config field, e.g. --set negatives=gradcache --set lr=3e-4")
    pretrain.add_argument("--resume", action="store_true",
                          help="continue from the newest readable checkpoint in the output folder")
    pretrain.add_argument("--no-evaluate", action="store_true", help="skip the evaluation after pretraining")
    pretrain.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    pretrain.set_defaults(handler=run_pretrain)

    info = commands.add_parser("info", help="print a checkpoint's step, config, package versions and git commit")
    info.add_argument("checkpoint", type=Path, help="a step-*.pt file or a run folder")
    info.set_defaults(handler=run_info)

    phantom = commands.add_parser("phantom", help="generate the synthetic PhantomCXR dataset")
    phantom.add_argument("--out", type=Path, required=True, help="output folder")
    phantom.add_argument("--n-pairs", type=int, default=2000, help="number of image-report pairs (default: 2000)")
    phantom.add_argument("--image-size", type=int, default=128, help="image side in pixels (default: 128)")
    phantom.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    phantom.set_defaults(handler=run_phantom)

    try:
        from .evaluate_cli import add_evaluate_arguments, run_evaluate
    except ImportError:
        pass
    else:
        evaluate = commands.add_parser("evaluate", help="zero-shot, linear-probe and retrieval evaluation")
        add_evaluate_arguments(evaluate)
        evaluate.set_defaults(handler=run_evaluate)
    return parser


def terminal_text(docstring: str) -> str:
    """Replace the double backticks of reStructuredText literals with single ones, for ``--help``."""
    return docstring.replace("``", "`")


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """Turn ``["lr=3e-4", "negatives=gradcache"]`` into typed values (parsed as YAML scalars, ``3e-4`` a float)."""
    overrides = {}
    for pair in pairs:
        field, separator, value = pair.partition("=")
        if not separator or not field:
            raise ValueError(f"invalid --set {pair!r}: expected FIELD=VALUE, e.g. --set lr=3e-4")
        overrides[field.strip()] = load_yaml(value)
    return overrides


def config_from_args(args: argparse.Namespace):
    """Build the ``TrainConfig`` the pretrain arguments describe."""
    from .config import TrainConfig, get_preset

    overrides = parse_overrides(args.set)
    for field, value in (("manifest", args.manifest), ("output_dir", args.output_dir), ("max_steps", args.max_steps)):
        if value is not None:
            overrides[field] = value
    if args.skip_bad_rows:
        overrides["skip_bad_rows"] = True
    if args.config is not None:
        return TrainConfig.from_yaml(args.config).replace(**overrides)
    return get_preset(args.preset, **overrides)


def run_pretrain(args: argparse.Namespace) -> int:
    """Pretrain (or resume), then evaluate the final checkpoint unless ``--no-evaluate`` is given."""
    from .train import load_trainer, Trainer

    config = config_from_args(args)
    progress = not args.no_progress
    if args.resume:
        from .train import RESUME_CHANGES

        changes = {field: value for field, value in parse_overrides(args.set).items() if field in RESUME_CHANGES}
        ignored = sorted(set(parse_overrides(args.set)) - set(changes))
        if ignored:
            logger.warning("--resume keeps the saved config; ignoring --set for %s (only %s can change)",
                           ignored, list(RESUME_CHANGES))
        trainer = load_trainer(config.output_dir, device=args.device, max_steps=args.max_steps, progress=progress,
                               **changes)
    else:
        trainer = Trainer(config, device=args.device, progress=progress)
    history = trainer.fit()
    if not trainer.distributed.is_main:
        return 0  # Under torchrun, rank 0 alone reports and evaluates.

    last = history.records[-1]
    print(f"pretraining finished at step {trainer.step}: loss {last['loss']:.4f}, tau {last['tau']:.4f}; "
          f"checkpoint {history.checkpoint}")
    if trainer.dataset.dropped or trainer.skipped_rows:
        print(f"rows dropped: {dict(trainer.dataset.dropped)}; unreadable images skipped: {trainer.skipped_rows}")
    if history.interrupted:
        print(f"interrupted: continue with python -m msd_core pretrain --resume --output-dir {config.output_dir}")
        return 130
    if args.no_evaluate:
        return 0
    return _evaluate_after_pretraining(trainer, args)


def _evaluate_after_pretraining(trainer, args: argparse.Namespace) -> int:
    try:
        from .evaluate_cli import evaluate_after_pretraining
    except ImportError:
        logger.warning("msd_core.evaluate_cli is not available; skipping the evaluation")
        return 0
    return evaluate_after_pretraining(trainer, device=args.device)


def run_info(args: argparse.Namespace) -> int:
    """Print what a checkpoint records about its run."""
    from .checkpoint import find_checkpoint

    path, state = find_checkpoint(args.checkpoint)
    provenance = state.get("provenance", {})
    print(f"checkpoint: {path}")
    print(f"step: {state['step']}")
    print(f"git commit: {provenance.get('git_commit')}")
    print(f"created: {provenance.get('created')} on {provenance.get('device')} ({provenance.get('precision')})")
    print("package versions:")
    for name, version in provenance.get("versions", {}).items():
        print(f"  {name}: {version}")
    print("config:")
    print(yaml.safe_dump(state["config"], sort_keys=False).rstrip())
    if state.get("history"):
        print(f"last record: {json.dumps(state['history'][-1], default=str)}")
    return 0


def run_phantom(args: argparse.Namespace) -> int:
    """Generate PhantomCXR and print the manifest path."""
    from .phantom import generate_phantom

    manifest = generate_phantom(args.out, n_pairs=args.n_pairs, image_size=args.image_size, seed=args.seed)
    print(manifest)
    return 0
