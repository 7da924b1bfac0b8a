"""Zero-shot classification from prompt files.

A prompt file (YAML, one per dataset, packaged ones under ``msd_core/prompts/``) lists
tasks. A ``multiclass`` task names the manifest column that contains each row's class and
gives a few prompts per class. A ``multilabel`` task gives, per class, prompts that
state the finding (``positive``) and prompts that deny it (``negative``). Each of its
classes is read from the 0/1 manifest column of the same name, or from the column
that the class's ``column`` key names::

    name: phantomcxr
    tasks:
      finding:
        type: multiclass
        column: finding
        classes:
          no_finding: ["No acute cardiopulmonary abnormality.", "..."]
          cardiomegaly: ["The heart is enlarged.", "..."]
      labels:
        type: multilabel
        classes:
          cardiomegaly:
            positive: ["Cardiomegaly."]
            negative: ["Heart size is normal."]

A class embedding is the mean of its L2-normalised prompt embeddings, normalised
again (a prompt ensemble).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import yaml

from .metrics import contrast_scores, multiclass_metrics, multilabel_auc, zero_shot_scores

logger = logging.getLogger(__name__)

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
TASK_TYPES = ("multiclass", "multilabel")


@dataclass(frozen=True)
class PromptTask:
    """One zero-shot task of a prompt file.

    Attributes:
        name: the task's key in the file.
        type: "multiclass" or "multilabel".
        classes: class names, in file order.
        prompts: class name -> prompts (multiclass), or -> positive prompts (multilabel).
        negative_prompts: class name -> negative prompts (multilabel only).
        column: manifest column holding the class name of each row (multiclass only).
        label_columns: class name -> its 0/1 manifest column (multilabel only).
    """

    name: str
    type: str
    classes: tuple[str, ...]
    prompts: dict[str, tuple[str, ...]]
    negative_prompts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    column: str | None = None
    label_columns: dict[str, str] = field(default_factory=dict)

    def manifest_columns(self) -> list[str]:
        """Return the manifest columns this task reads."""
        return [self.column] if self.type == "multiclass" else [self.label_columns[c] for c in self.classes]


@dataclass(frozen=True)
class PromptSet:
    """A parsed prompt file: its name, its tasks by name, and where it was read from."""

    name: str
    tasks: dict[str, PromptTask]
    path: Path | None = None

    def task(self, name: str | None = None) -> PromptTask:
        """Return the task called ``name``; None selects the only task of a one-task file."""
        if name is None:
            if len(self.tasks) == 1:
                return next(iter(self.tasks.values()))
            raise ValueError(f"prompt file {self.path or self.name} has several tasks {list(self.tasks)}; "
                             "choose one with task=...")
        if name not in self.tasks:
            raise ValueError(f"unknown task {name!r} in prompt file {self.path or self.name}; "
                             f"it has {list(self.tasks)}")
        return self.tasks[name]


def available_prompt_sets() -> list[str]:
    """Names of the packaged prompt files, usable as ``load_prompts(name)``."""
    return sorted(path.stem for path in PROMPT_DIR.glob("*.yaml"))


def load_prompts(name_or_path: str | os.PathLike | PromptSet) -> PromptSet:
    """Read and validate a prompt file.

    Args:
        name_or_path: a bare name such as ``"phantomcxr"`` reads the packaged
            ``msd_core/prompts/phantomcxr.yaml``. A path reads that file: anything that
            ends in .yaml or .yml, contains a folder separator, or names an existing
            file counts as a path. A ``PromptSet`` is returned as it is.

    Raises:
        FileNotFoundError: no such file or packaged name (the message lists the packaged names).
        ValueError: the file does not follow the format in this module's docstring
            (the message names the file and the key).
    """
    if isinstance(name_or_path, PromptSet):
        return name_or_path
    text = str(name_or_path)
    as_path = Path(text)
    is_path = as_path.suffix in (".yaml", ".yml") or os.sep in text or "/" in text or as_path.is_file()
    path = as_path if is_path else PROMPT_DIR / f"{text}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}; pass a YAML path or one of the packaged "
                                f"names {available_prompt_sets()}")

    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: invalid YAML ({error})") from None
    if not isinstance(content, dict) or not isinstance(content.get("tasks"), dict) or not content["tasks"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty 'tasks' mapping at the top level")
    tasks = {str(name): _parse_task(path, str(name), spec) for name, spec in content["tasks"].items()}
    return PromptSet(str(content.get("name", path.stem)), tasks, path)


def _parse_task(path: Path, name: str, spec) -> PromptTask:
    where = f"{path}: task {name!r}"
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a mapping with 'type' and 'classes'")
    kind = spec.get("type")
    if kind not in TASK_TYPES:
        raise ValueError(f"{where} has type {kind!r}; expected one of {list(TASK_TYPES)}")
    classes = spec.get("classes")
    if not isinstance(classes, dict) or len(classes) < (2 if kind == "multiclass" else 1):
        raise ValueError(f"{where}: 'classes' must map class names to prompts, with at least "
                         f"{2 if kind == 'multiclass' else 1} classes")
    names = tuple(str(c) for c in classes)

    if kind == "multiclass":
        prompts = {str(c): _prompt_list(f"{where}, class {c!r}", value) for c, value in classes.items()}
        return PromptTask(name, kind, names, prompts, column=str(spec.get("column", name)))

    positive, negative, columns = {}, {}, {}
    for class_name, value in classes.items():
        label = f"{where}, class {class_name!r}"
        if not isinstance(value, dict) or "positive" not in value or "negative" not in value:
            raise ValueError(f"{label} needs 'positive' and 'negative' prompt lists")
        positive[str(class_name)] = _prompt_list(f"{label}, positive", value["positive"])
        negative[str(class_name)] = _prompt_list(f"{label}, negative", value["negative"])
        columns[str(class_name)] = str(value.get("column", class_name))
    return PromptTask(name, kind, names, positive, negative_prompts=negative, label_columns=columns)


def _prompt_list(where: str, value) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(p, str) and p.strip() for p in value):
        raise ValueError(f"{where}: expected a non-empty list of non-empty prompt strings, got {value!r}")
    return tuple(value)


def class_embeddings(model, prompts: Mapping[str, Sequence[str]] | PromptTask, *,
                     batch_size: int = 256) -> np.ndarray:
    """Embed each class's prompt ensemble.

    Args:
        model: a ``DualEncoder``; it runs on the device of its parameters, in eval mode.
        prompts: class name -> one or more prompts, or a ``PromptTask`` (its
            ``prompts``, the positive ones for a multilabel task).
        batch_size: prompts per forward pass.

    Returns:
        (C, D) float32: row c is the renormalised mean of the L2-normalised embeddings
        of class c's prompts, in the mapping's order.
    """
    if isinstance(prompts, PromptTask):
        prompts = prompts.prompts
    names = list(prompts)
    flat = [text for name in names for text in prompts[name]]
    owner = np.repeat(np.arange(len(names)), [len(prompts[name]) for name in names])  # (P,) class of each prompt
    embedded = _encode_texts(model, flat, batch_size)  # (P, D)
    embedded /= np.maximum(np.linalg.norm(embedded, axis=1, keepdims=True), 1e-12)

    means = np.stack([embedded[owner == c].mean(axis=0) for c in range(len(names))])  # (C, D)
    return (means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _encode_texts(model, texts: list[str], batch_size: int) -> np.ndarray:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                tokens = model.tokenize(texts[start:start + batch_size])
                chunks.append(model.encode_text(tokens["input_ids"].to(device),
                                                tokens["attention_mask"].to(device)).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(chunks).astype(np.float64)


def task_targets(frame: pd.DataFrame, task: PromptTask) -> np.ndarray:
    """Ground truth of ``task`` for each manifest row.

    Returns:
        Multiclass: (N,) object array of class names, None where the row's value is
        not one of the task's classes. Multilabel: (N, C) float64 of 0/1, NaN where a
        value is blank or anything other than 0/1 (for example -1 for uncertain).

    Raises:
        ValueError: a column the task reads is missing (the message lists the columns).
    """
    missing = [column for column in task.manifest_columns() if column not in frame.columns]
    if missing:
        raise ValueError(f"task {task.name!r} reads manifest column(s) {missing}, which the manifest lacks; "
                         f"it has {list(frame.columns)}. Use a prompt file written for this manifest.")
    if task.type == "multiclass":
        values = frame[task.column].astype(str).str.strip()
        return np.array([value if value in task.prompts else None for value in values], dtype=object)

    columns = []
    for name in task.classes:
        numbers = pd.to_numeric(frame[task.label_columns[name]], errors="coerce").to_numpy(dtype=np.float64)
        columns.append(np.where(np.isin(numbers, (0.0, 1.0)), numbers, np.nan))
    return np.stack(columns, axis=1)


def zero_shot_predictions(embeddings, model, prompts, task: str | None = None) -> pd.DataFrame:
    """Per-row zero-shot scores and, for a multiclass task, the predicted class.

    Args:
        embeddings: an ``Embeddings`` from ``msd_core.evaluate.embed``.
        model: the model that produced ``embeddings``; it embeds the prompts.
        prompts: a prompt-file name, path or ``PromptSet``.
        task: the task name; None for a file with one task.

    Returns:
        One row per embedded pair: ``row`` (manifest row), ``true`` (class name or None)
        and ``predicted`` for multiclass tasks, then one ``score_<class>`` column per
        class: cosine similarity to the class (multiclass), or similarity to the
        positive minus the negative prompts (multilabel).
    """
    task_spec = load_prompts(prompts).task(task)
    if task_spec.type == "multiclass":
        scores = zero_shot_scores(embeddings.image, class_embeddings(model, task_spec.prompts))  # (N, C)
    else:
        positive = class_embeddings(model, task_spec.prompts)
        negative = class_embeddings(model, task_spec.negative_prompts)
        scores = contrast_scores(embeddings.image, positive, negative)  # (N, C)

    result = pd.DataFrame({"row": embeddings.frame["row"].to_numpy()})
    if task_spec.type == "multiclass":
        result["true"] = task_targets(embeddings.frame, task_spec)
        result["predicted"] = np.asarray(task_spec.classes, dtype=object)[scores.argmax(axis=1)]
    for index, name in enumerate(task_spec.classes):
        result[f"score_{name}"] = scores[:, index]
    return result


def zero_shot(embeddings, model, prompts, task: str | None = None) -> pd.DataFrame:
    """Compute the zero-shot classification metrics of one task.

    Multiclass: the predicted class is the prompt ensemble most similar to the image.
    Rows whose class is not in the prompt file are left out with a warning. The table
    has ``accuracy``, ``macro_f1`` and per-class ``f1`` rows, and the confusion matrix
    is in ``frame.attrs["confusion"]``. Multilabel: each class is scored on its own from
    an (N, C) score matrix (never an argmax), and the table has per-class ``auc`` rows
    and ``macro_auc``. A class whose labels have one value in the split is NaN, with an
    ``UndefinedMetricWarning``.

    Args:
        embeddings: an ``Embeddings`` of the split to evaluate.
        model: the model that produced ``embeddings``.
        prompts: a prompt-file name, path or ``PromptSet``.
        task: the task name; None for a file with one task.

    Returns:
        A DataFrame with columns ``task, metric, class, value, chance, support``;
        per-row predictions are in ``frame.attrs["predictions"]``.
    """
    prompt_set = load_prompts(prompts)
    task_spec = prompt_set.task(task)
    targets = task_targets(embeddings.frame, task_spec)
    predictions = zero_shot_predictions(embeddings, model, prompt_set, task_spec.name)
    scores = predictions[[f"score_{name}" for name in task_spec.classes]].to_numpy()

    if task_spec.type == "multiclass":
        known = np.array([value is not None for value in targets])
        _warn_unknown_classes(embeddings.frame[task_spec.column], known, task_spec)
        index = {name: position for position, name in enumerate(task_spec.classes)}
        true = np.array([index[value] for value in targets[known]], dtype=np.int64)
        metrics = multiclass_metrics(true, scores[known].argmax(axis=1), task_spec.classes)
    else:
        metrics = multilabel_auc(targets, scores, task_spec.classes)

    metrics.insert(0, "task", task_spec.name)
    metrics.attrs["predictions"] = predictions
    return metrics


def _warn_unknown_classes(values: pd.Series, known: np.ndarray, task: PromptTask) -> None:
    if known.all():
        return
    if not known.any():
        raise ValueError(f"no row of column {task.column!r} contains a class of task {task.name!r}: values "
                         f"{sorted(set(values.astype(str)))[:10]}, classes {list(task.classes)}. "
                         "Use a prompt file whose class names match the manifest.")
    unknown = sorted(set(values[~known].astype(str)))
    logger.warning("zero-shot task %r: %d of %d rows have a %r value outside the prompt classes and are left "
                   "out: %s", task.name, int((~known).sum()), len(known), task.column, unknown[:10])
