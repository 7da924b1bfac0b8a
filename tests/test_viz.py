"""Tests of the figures and the retrieval explorer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from msd_core import viz
from msd_core.data import ImageTextDataset
from msd_core.embeddings import Embeddings

REPO = Path(__file__).resolve().parents[1]


def paired_embeddings(count: int, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(count, dim))
    texts = images + 0.5 * rng.normal(size=(count, dim))
    labels = rng.choice(["cardiomegaly", "effusion", "normal"], size=count)
    return images, texts, labels


def scatter_sizes(figure: Figure) -> list[int]:
    """Number of points in each scatter of the figure's first axes."""
    return [len(item.get_offsets()) for item in figure.axes[0].collections if isinstance(item, PathCollection)]


def test_import_writes_nothing_to_stderr():
    result = subprocess.run(
        [sys.executable, "-c", "import sys, msd_core.viz; print('umap' in sys.modules, 'numba' in sys.modules)"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0
    assert result.stderr == ""
    assert result.stdout.strip() == "False False"


def test_umap_ten_points():
    images, texts, labels = paired_embeddings(10)
    figure = viz.plot_embeddings(images, texts, labels=labels, method="umap")
    assert isinstance(figure, Figure)
    assert scatter_sizes(figure) == [10, 10]


def test_umap_three_hundred_points():
    images, texts, labels = paired_embeddings(300)
    figure = viz.plot_embeddings(images, texts, labels=labels)
    assert isinstance(figure, Figure)
    assert scatter_sizes(figure) == [300, 300]


def test_pca_ten_thousand_points():
    images, texts, labels = paired_embeddings(10_000)
    figure = viz.plot_embeddings(images, texts, labels=labels, method="pca")
    assert isinstance(figure, Figure)
    assert scatter_sizes(figure) == [10_000, 10_000]


def test_tsne_ten_points_images_only():
    images, _, _ = paired_embeddings(10)
    figure = viz.plot_embeddings(images, method="tsne")
    assert isinstance(figure, Figure)
    assert scatter_sizes(figure) == [10]


def test_pair_links_capped():
    images, texts, _ = paired_embeddings(50)
    figure = viz.plot_embeddings(images, texts, method="pca", max_links=20)
    links = [item for item in figure.axes[0].collections if not isinstance(item, PathCollection)]
    assert len(links) == 1
    assert len(links[0].get_segments()) == 20


def test_invalid_projection_rejected():
    images, _, _ = paired_embeddings(10)
    with pytest.raises(ValueError, match="method='mds'"):
        viz.plot_embeddings(images, method="mds")


def test_similarity_marks_diagonal():
    images, texts, labels = paired_embeddings(12)
    figure = viz.plot_similarity(images, texts, labels=labels)
    outlines = [patch for patch in figure.axes[0].patches if isinstance(patch, Rectangle)]
    assert len(outlines) == 12
    assert [outline.get_xy() for outline in outlines] == [(i - 0.5, i - 0.5) for i in range(12)]


def test_similarity_limits_items():
    images, texts, _ = paired_embeddings(100)
    figure = viz.plot_similarity(images, texts, max_items=16)
    assert figure.axes[0].images[0].get_array().shape == (16, 16)


def test_confusion_annotates_counts():
    counts = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    figure = viz.plot_confusion(counts, ["normal", "cardiomegaly", "effusion"])
    assert [text.get_text() for text in figure.axes[0].texts] == [str(value) for value in counts.flatten()]


def test_confusion_accepts_dataframe():
    frame = pd.DataFrame([[3, 1], [0, 4]], index=["a", "b"], columns=["a", "b"])
    figure = viz.plot_confusion(frame)
    assert [label.get_text() for label in figure.axes[0].get_yticklabels()] == ["a", "b"]


def test_confusion_title_names_task_and_model():
    figure = viz.plot_confusion(np.eye(2, dtype=int), ["a", "b"], task="finding", model="trained")
    assert figure.axes[0].get_title() == "confusion matrix, task finding (trained model)"


def test_probe_title_names_task():
    frame = pd.DataFrame({"fraction": [0.1, 1.0], "auc_mean": [0.6, 0.7], "auc_std": [0.05, 0.0]})
    figure = viz.plot_probe(frame, task="labels")
    assert figure.axes[0].get_title() == "linear probe, task labels"


def test_probe_one_line_per_model():
    frame = pd.DataFrame({"fraction": [0.01, 0.1, 1.0], "auc_mean": [0.6, 0.7, 0.8], "auc_std": [0.05, 0.02, 0.0]})
    results = pd.concat([frame.assign(model="trained"), frame.assign(model="random", auc_mean=[0.5, 0.52, 0.55])])
    figure = viz.plot_probe(results)
    labels = figure.axes[0].get_legend_handles_labels()[1]
    assert labels == ["chance", "trained", "random"]


def test_retrieval_explorer_switches_direction(tiny_manifest):
    ipywidgets = pytest.importorskip("ipywidgets")
    dataset = ImageTextDataset(tiny_manifest, split="test", image_size=32)
    images, texts, _ = paired_embeddings(len(dataset))
    embeddings = Embeddings(images.astype(np.float32), texts.astype(np.float32), dataset.frame.copy())

    explorer = viz.retrieval_explorer(embeddings, dataset, k=3)
    controls, results = explorer.children
    direction, query = controls.children
    assert isinstance(results.children[0], ipywidgets.Image)
    assert results.children[1].value.count("<li>") == 3

    direction.value = "text"
    assert isinstance(results.children[0], ipywidgets.HTML)
    assert len(results.children[1].children) == 3

    query.value = 5
    assert "report 5:" in results.children[0].value
