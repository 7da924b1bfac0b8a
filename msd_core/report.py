"""Files of an evaluation run: CSV tables, PNG figures and a markdown summary.

``write_report`` is called by ``msd_core.evaluate.evaluate_checkpoint``; it only
formats results that are already computed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from . import viz
from .zeroshot import PROMPT_DIR

logger = logging.getLogger(__name__)

SIMILARITY_PAIRS = 32
FIGURE_DPI = 120


@dataclass
class ReportInputs:
    """Inputs of the summary besides the tables: the run's settings, the data of the figures, and notes."""

    checkpoint: str
    manifest: str
    split: str
    test_pairs: int
    probe_split: str | None
    probe_pairs: int
    prompts: str | None
    models: dict[str, str]
    embeddings: dict = field(default_factory=dict)  # model name -> Embeddings of the evaluated split
    confusion: dict[str, pd.DataFrame] = field(default_factory=dict)  # task -> confusion of the trained model
    color_labels: Sequence | None = None
    notes: list[str] = field(default_factory=list)


def write_report(out_dir: Path, tables: dict[str, pd.DataFrame], inputs: ReportInputs, *,
                 projection: str = "umap") -> Path:
    """Write the CSV tables, figures and ``summary.md`` under ``out_dir``; returns the summary path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        frame.to_csv(out_dir / f"{name}.csv", index=False)
    figures = _write_figures(out_dir, tables, inputs, projection)
    summary = out_dir / "summary.md"
    summary.write_text(_summary_markdown(tables, inputs, figures), encoding="utf-8")
    logger.info("wrote the evaluation report to %s", summary)
    return summary


def _write_figures(out_dir: Path, tables: dict[str, pd.DataFrame], inputs: ReportInputs,
                   projection: str) -> list[tuple[str, str]]:
    """Save every figure and return (caption, file name) pairs."""
    figures = []

    def save(figure, name: str, caption: str) -> None:
        figure.savefig(out_dir / name, dpi=FIGURE_DPI)
        figures.append((caption, name))

    for task, confusion in inputs.confusion.items():
        save(viz.plot_confusion(confusion, task=task, model="trained"), f"confusion_{task}.png",
             f"zero-shot confusion matrix, task {task} (trained model)")
    for model, embeddings in inputs.embeddings.items():
        save(viz.plot_embeddings(embeddings.image, embeddings.text, labels=inputs.color_labels, method=projection,
                                 title=f"{model} model: {inputs.split} split ({projection})"),
             f"embeddings_{model}.png", f"{projection.upper()} map of image and text embeddings ({model} model)")
    if "trained" in inputs.embeddings:
        embeddings = inputs.embeddings["trained"]
        labels = None if inputs.color_labels is None else list(inputs.color_labels)[:SIMILARITY_PAIRS]
        save(viz.plot_similarity(embeddings.image, embeddings.text, labels=labels, max_items=SIMILARITY_PAIRS),
             "similarity.png", "image-report similarity of the first pairs (trained model)")
    probe = tables.get("linear_probe")
    if probe is not None and not probe.empty:
        for task, frame in probe.groupby("task", sort=False):
            save(viz.plot_probe(frame, task=task), f"probe_{task}.png",
                 f"linear-probe AUC-ROC against label share, task {task}")
    return figures


def _summary_markdown(tables: dict[str, pd.DataFrame], inputs: ReportInputs, figures: list[tuple[str, str]]) -> str:
    models = list(inputs.models)
    lines = [
        f"# Evaluation of `{inputs.checkpoint}`",
        "",
        f"- manifest: `{inputs.manifest}`, split `{inputs.split}` ({inputs.test_pairs} pairs)",
        f"- linear probe trained on split `{inputs.probe_split}` ({inputs.probe_pairs} pairs)"
        if inputs.probe_split else "- linear probe: not run",
        f"- prompts: `{_prompt_label(inputs.prompts)}`" if inputs.prompts else "- prompts: none (zero-shot not run)",
    ]
    lines += [f"- model `{name}`: {description}" for name, description in inputs.models.items()]
    lines.append("")

    zero_shot = tables.get("zero_shot")
    if zero_shot is not None and not zero_shot.empty:
        lines += ["## Zero-shot classification", "",
                  "Chance: a uniform random guess among the prompt classes (accuracy, F1), 0.5 for AUC-ROC. "
                  "n/a marks a metric that is undefined on this split.", ""]
        lines += _markdown_table(_side_by_side(zero_shot, ["task", "metric", "class"], "value", models,
                                               extra=["chance", "support"]))
        lines.append("")

    probe = tables.get("linear_probe")
    if probe is not None and not probe.empty:
        probe = probe.assign(auc=[_mean_std(m, s) for m, s in zip(probe["auc_mean"], probe["auc_std"])],
                             accuracy=[_mean_std(m, s) for m, s in zip(probe["accuracy_mean"], probe["accuracy_std"])])
        lines += ["## Linear probe", "",
                  "Macro AUC-ROC and accuracy on the evaluated split, mean ± standard deviation over seeds. "
                  "Chance AUC-ROC is 0.5.", ""]
        lines += _markdown_table(_side_by_side(probe, ["task", "fraction", "train_size"], ["auc", "accuracy"],
                                               models))
        lines.append("")

    retrieval = tables.get("retrieval")
    if retrieval is not None and not retrieval.empty:
        lines += ["## Retrieval", "",
                  "Recall@K: share of queries with a relevant item in the top K. Precision@K: relevant items in "
                  "the top K divided by K. A report identical to the query's report counts as relevant. "
                  "Chance: the expected value under a random ranking.", ""]
        lines += _markdown_table(_side_by_side(retrieval, ["direction", "k"], ["recall", "precision"], models,
                                               extra=["recall_chance", "precision_chance"]))
        lines.append("")

    if figures:
        lines += ["## Figures", ""]
        for caption, name in figures:
            lines += [f"### {caption}", "", f"![{caption}]({name})", ""]
    if inputs.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in inputs.notes] + [""]
    return "\n".join(lines)


def _prompt_label(prompts: str) -> str:
    """Return the packaged name (``phantomcxr``) of a file in ``msd_core/prompts/``, else ``prompts`` as given."""
    path = Path(prompts)
    if path.suffix == ".yaml" and path.resolve().parent == PROMPT_DIR:
        return path.stem
    return prompts


def _side_by_side(frame: pd.DataFrame, keys: list[str], values, models: list[str],
                  extra: Sequence[str] = ()) -> pd.DataFrame:
    """Reshape to one row per key and one column per (value, model), then the first model's ``extra`` columns."""
    values = [values] if isinstance(values, str) else list(values)
    parts = []
    for model in models:
        rows = frame[frame["model"] == model].set_index(keys)
        if rows.empty:
            continue
        renamed = {value: (model if len(values) == 1 else f"{value} ({model})") for value in values}
        parts.append(rows[values].rename(columns=renamed))
        if len(parts) == 1:
            first = rows
    if not parts:
        return pd.DataFrame()
    wide = pd.concat(parts, axis=1)
    for column in extra:
        wide[column] = first[column]
    if len(values) > 1:
        ordered = [f"{value} ({model})" for value in values for model in models if f"{value} ({model})" in wide]
        wide = wide[ordered + list(extra)]
    return wide.reset_index()


def _mean_std(mean: float, std: float) -> str:
    if mean is None or math.isnan(mean):
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}"


def _markdown_table(frame: pd.DataFrame) -> list[str]:
    """GitHub-flavoured markdown table lines; floats to three decimals, NaN as n/a."""
    if frame.empty:
        return ["(no rows)"]
    header = [str(column) for column in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(value) for value in row) + " |")
    return lines


def _cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "n/a"
        if float(value).is_integer() and abs(value) >= 2:
            return str(int(value))  # counts such as rows or support
        return f"{value:.3f}"
    return str(value).replace("|", "\\|")
