"""Downstream evaluation: embeddings, zero-shot classification, linear probe and retrieval.

The three protocols, each returning a pandas DataFrame of metrics:

* ``zero_shot(embeddings, model, prompts, task=...)``: classes described by prompt
  ensembles from a prompt file (``load_prompts``); multiclass tasks report accuracy and
  macro-F1, multilabel tasks per-class AUC-ROC.
* ``linear_probe(train, train_labels, test, test_labels)``: logistic regression on
  frozen embeddings at 1 %, 10 % and 100 % of the training labels, several seeds.
* ``retrieval(image_emb, text_emb, texts)``: image-to-text and text-to-image
  Recall@K and Precision@K, where identical reports count as hits.

``evaluate_checkpoint`` runs all three on a manifest split, optionally beside a
randomly initialised model of the same architecture, and writes CSV tables, figures
and ``summary.md``. The pieces live in ``embeddings``, ``zeroshot``, ``probe``,
``metrics`` and ``report``; this module gathers them under one name.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .checkpoint import find_checkpoint
from .data import ImageTextDataset
from .embeddings import Embeddings, cache_key, embed
from .manifest import ManifestError
from .metrics import UndefinedMetricWarning, retrieval, zero_shot_scores
from .model import DualEncoder, ModelSpec
from .probe import linear_probe
from .report import ReportInputs, write_report
from .zeroshot import (PromptSet, PromptTask, class_embeddings, load_prompts, task_targets, zero_shot,
                       zero_shot_predictions)

__all__ = [
    "Embeddings", "embed", "cache_key", "load_prompts", "PromptSet", "PromptTask", "class_embeddings",
    "zero_shot", "zero_shot_predictions", "zero_shot_scores", "linear_probe", "retrieval",
    "UndefinedMetricWarning", "random_baseline", "evaluate_checkpoint", "stack_results",
]

logger = logging.getLogger(__name__)

BASELINES = ("random", "none")


def random_baseline(spec: ModelSpec, seed: int = 0) -> DualEncoder:
    """Build a ``DualEncoder`` of the architecture ``spec`` describes with random weights, in eval mode.

    Weights are drawn under ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``,
    so the baseline is the same on every call and the caller's random state is untouched.
    Pretrained towers are not loaded: this is the "no pretraining" reference.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DualEncoder.from_spec(spec)
    return model.eval()


def evaluate_checkpoint(checkpoint: str | os.PathLike, manifest: str | os.PathLike | None = None, *,
                        out_dir: str | os.PathLike, prompts: str | os.PathLike | PromptSet | None = "phantomcxr",
                        split: str = "test", device: str = "cpu", probe_train_split: str | None = "train",
                        baseline: str | None = "random", fractions: Sequence[float] = (0.01, 0.1, 1.0),
                        seeds: Sequence[int] = (0, 1, 2), projection: str = "umap", batch_size: int = 64,
                        cache_dir: str | os.PathLike | None = None, skip_bad_rows: bool = False,
                        progress: bool = True) -> dict[str, pd.DataFrame]:
    """Run zero-shot, linear-probe and retrieval evaluation of a checkpoint and write a report.

    Args:
        checkpoint: a ``step-*.pt`` file, or a run or checkpoint folder (its newest
            readable checkpoint is used).
        manifest: the manifest CSV; None uses the manifest the checkpoint was trained on.
        out_dir: folder for ``zero_shot.csv``, ``linear_probe.csv``, ``retrieval.csv``,
            the PNG figures and ``summary.md``.
        prompts: prompt-file name or path; tasks whose manifest columns are missing are
            skipped with a warning. None skips zero-shot and the probe.
        split: the split every metric is computed on.
        device: where the models run.
        probe_train_split: the split the linear probe is fitted on; None (or a split the
            manifest lacks) skips the probe.
        baseline: "random" adds a randomly initialised model of the same architecture
            (``random_baseline``, seed 0) to every table; "none" or None evaluates the
            checkpoint only.
        fractions, seeds: label fractions and seeds of the linear probe.
        projection: "umap", "tsne" or "pca" for the embedding maps.
        batch_size: pairs per forward pass when embedding.
        cache_dir: folder for cached embeddings; None disables the cache.
        skip_bad_rows: drop rows with a missing image or empty report instead of raising.
        progress: show progress bars.

    Returns:
        ``{"zero_shot": ..., "linear_probe": ..., "retrieval": ...}``: the tables written
        as CSV, each with a ``model`` column ("trained", and "random" with the baseline).
    """
    if baseline not in (None, *BASELINES):
        raise ValueError(f"invalid baseline={baseline!r}: must be one of {list(BASELINES)} or None")
    out_dir = Path(out_dir)
    checkpoint_path, state = find_checkpoint(checkpoint)
    manifest = Path(manifest if manifest is not None else state["manifest"])
    trained = DualEncoder.from_spec(ModelSpec(**state["model_spec"]))
    trained.load_state_dict(state["model"])
    models = {"trained": trained.eval()}
    descriptions = {"trained": f"checkpoint `{checkpoint_path}` (step {state['step']})"}
    if baseline == "random":
        models["random"] = random_baseline(trained.spec, seed=0)
        descriptions["random"] = "the same architecture with random weights (seed 0), no pretraining"

    test_set = ImageTextDataset.for_model(manifest, trained, split=split, skip_bad_rows=skip_bad_rows)
    prompt_set = load_prompts(prompts) if prompts is not None else None
    tasks = _usable_tasks(prompt_set, test_set.frame)
    notes = _skipped_task_notes(prompt_set, tasks)
    train_set = None
    if tasks and probe_train_split is not None:
        train_set = _optional_split(manifest, trained, probe_train_split, skip_bad_rows, notes)

    tables = {"zero_shot": [], "linear_probe": [], "retrieval": []}
    inputs = ReportInputs(
        checkpoint=str(checkpoint_path), manifest=str(manifest), split=split, test_pairs=len(test_set),
        probe_split=probe_train_split if train_set is not None else None,
        probe_pairs=len(train_set) if train_set is not None else 0,
        prompts=str(prompt_set.path or prompt_set.name) if prompt_set else None, models=descriptions, notes=notes,
    )
    embed_split = functools.partial(embed, batch_size=batch_size, device=device, cache_dir=cache_dir,
                                    progress=progress)
    with _metric_warnings_as_notes(notes):
        for name, model in models.items():
            _evaluate_model(name, model, embed_split, test_set, train_set, prompt_set, tasks, fractions, seeds,
                            tables, inputs)

    inputs.color_labels = _colour_labels(tasks, inputs.embeddings["trained"].frame)
    results = {key: stack_results(frames) for key, frames in tables.items()}
    write_report(out_dir, results, inputs, projection=projection)
    return results


def _evaluate_model(name: str, model: DualEncoder, embed_split, test_set: ImageTextDataset,
                    train_set: ImageTextDataset | None, prompt_set: PromptSet | None, tasks: list[PromptTask],
                    fractions: Sequence[float], seeds: Sequence[int], tables: dict[str, list[pd.DataFrame]],
                    inputs: ReportInputs) -> None:
    """Run the three protocols for one model and append its rows to ``tables``."""
    test_embeddings = embed_split(model, test_set)
    inputs.embeddings[name] = test_embeddings
    for task in tasks:
        scores = zero_shot(test_embeddings, model, prompt_set, task.name)
        tables["zero_shot"].append(scores.assign(model=name))
        if name == "trained" and task.type == "multiclass":
            inputs.confusion[task.name] = scores.attrs["confusion"]

    if train_set is not None:
        train_embeddings = embed_split(model, train_set)
        for task in tasks:
            probe = _probe_task(task, train_embeddings, test_embeddings, fractions, seeds, inputs.notes)
            if probe is not None:
                tables["linear_probe"].append(probe.assign(model=name, task=task.name))

    ranked = retrieval(test_embeddings.image, test_embeddings.text, texts=test_embeddings.texts)
    tables["retrieval"].append(ranked.assign(model=name))


@contextlib.contextmanager
def _metric_warnings_as_notes(notes: list[str]):
    """Log each distinct metric warning once and list it in the summary.

    Without this, the same undefined-AUC warning would repeat for every model, task,
    label fraction and seed. Other warnings are passed on unchanged.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    seen = set()
    for item in caught:
        text = str(item.message)
        is_metric = issubclass(item.category, UndefinedMetricWarning) or text.startswith("retrieval over")
        if not is_metric:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
        elif text not in seen:
            seen.add(text)
            logger.warning("%s", text)
            notes.append(text)


def _usable_tasks(prompt_set: PromptSet | None, frame: pd.DataFrame) -> list[PromptTask]:
    if prompt_set is None:
        return []
    usable = []
    for task in prompt_set.tasks.values():
        missing = [column for column in task.manifest_columns() if column not in frame.columns]
        if missing:
            logger.warning("skipping zero-shot task %r: the manifest has no column(s) %s", task.name, missing)
            continue
        usable.append(task)
    return usable


def _skipped_task_notes(prompt_set: PromptSet | None, tasks: list[PromptTask]) -> list[str]:
    if prompt_set is None:
        return ["zero-shot and linear probe not run: no prompt file given"]
    kept = {task.name for task in tasks}
    return [f"task `{name}` skipped: the manifest lacks its column(s) {task.manifest_columns()}"
            for name, task in prompt_set.tasks.items() if name not in kept]


def _optional_split(manifest: Path, model: DualEncoder, split: str, skip_bad_rows: bool,
                    notes: list[str]) -> ImageTextDataset | None:
    try:
        return ImageTextDataset.for_model(manifest, model, split=split, skip_bad_rows=skip_bad_rows)
    except ManifestError as error:
        if f"split={split!r}" not in str(error):
            raise
        logger.warning("skipping the linear probe: %s", error)
        notes.append(f"linear probe not run: the manifest has no `{split}` rows")
        return None


def _probe_task(task: PromptTask, train: Embeddings, test: Embeddings, fractions: Sequence[float],
                seeds: Sequence[int], notes: list[str]) -> pd.DataFrame | None:
    """Linear probe on the labels of one prompt task; rows without a usable label are left out."""
    train_labels, train_rows = _labelled_rows(task_targets(train.frame, task))
    test_labels, test_rows = _labelled_rows(task_targets(test.frame, task))
    try:
        return linear_probe(train.image[train_rows], train_labels, test.image[test_rows], test_labels,
                            fractions=fractions, seeds=seeds,
                            class_names=task.classes if task.type == "multilabel" else None)
    except ValueError as error:
        logger.warning("skipping the linear probe of task %r: %s", task.name, error)
        note = f"linear probe of task `{task.name}` not run: {error}"
        if note not in notes:
            notes.append(note)
        return None


def _labelled_rows(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and row mask of the rows with a known label (every class known, for multilabel)."""
    if targets.ndim == 2:
        keep = ~np.isnan(targets).any(axis=1)
    else:
        keep = np.array([value is not None for value in targets], dtype=bool)
    return targets[keep], keep


def _colour_labels(tasks: list[PromptTask], frame: pd.DataFrame) -> list[str] | None:
    """Point labels for the embedding maps: the first multiclass task's class, else none."""
    for task in tasks:
        if task.type == "multiclass":
            return [str(value) for value in frame[task.column]]
    return None


def stack_results(results: Mapping[str, pd.DataFrame] | Sequence[pd.DataFrame], key: str = "model") -> pd.DataFrame:
    """Stack result tables into one, for example the same metric of several models.

    ``pd.concat`` fails on these tables: it compares the frames' ``attrs``, and the
    DataFrames kept there (a confusion matrix, the per-run probe table) cannot be
    compared with ``==``. The stacked copies leave ``attrs`` behind; the inputs keep theirs.

    Args:
        results: tables by name (the name goes into a ``key`` column), or a sequence
            of tables that contain such a column already.
        key: the column that receives the names of a mapping.

    Returns:
        One table with a fresh index and the ``model`` and ``task`` columns first where present.
    """
    if isinstance(results, Mapping):
        frames = [frame.assign(**{key: name}) for name, frame in results.items()]
    else:
        frames = [frame.copy() for frame in results]
    if not frames:
        return pd.DataFrame()
    for frame in frames:
        frame.attrs = {}
    combined = pd.concat(frames, ignore_index=True)
    leading = [column for column in dict.fromkeys((key, "model", "task")) if column in combined.columns]
    return combined[leading + [column for column in combined.columns if column not in leading]]
