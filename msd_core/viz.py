"""Figures: training curves, embedding maps, similarity heatmaps, and the retrieval explorer.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot's global
state, so the library works the same in scripts, tests and notebooks (where a returned
figure is displayed by Jupyter). umap-learn, scikit-learn's manifold module and
ipywidgets are imported inside the functions that use them, so importing this module
stays quick and prints nothing.
"""

from __future__ import annotations

import html
import io
import logging
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

logger = logging.getLogger(__name__)

PROJECTIONS = ("umap", "tsne", "pca")
# Above this many distinct labels the points get a continuous colour map and no legend.
MAX_LEGEND_LABELS = 20


def plot_history(history: Any, *, smooth: int = 10) -> Figure:
    """Plot the loss (raw and moving average), the temperature, alpha and the learning rate.

    Args:
        history: a ``msd_core.train.History``, a DataFrame of its records, or a path to
            its ``history.csv``.
        smooth: window of the moving average, in optimizer steps.
    """
    frame = _history_frame(history)
    figure = Figure(figsize=(11, 3.2), layout="constrained")
    loss_axis, tau_axis, schedule_axis = figure.subplots(1, 3)

    loss_axis.plot(frame["step"], frame["loss"], color="tab:blue", alpha=0.35, label="loss")
    window = max(1, min(smooth, len(frame) // 3 or 1))
    loss_axis.plot(frame["step"], frame["loss"].rolling(window, min_periods=1).mean(), color="tab:blue",
                   label=f"mean of {window} steps")
    loss_axis.set(title="training loss", xlabel="optimizer step", ylabel="loss")
    loss_axis.legend()

    tau_axis.plot(frame["step"], frame["tau"], color="tab:red")
    tau_axis.set(title="temperature tau", xlabel="optimizer step")

    schedule_axis.plot(frame["step"], frame["alpha"], color="tab:green", label="alpha")
    schedule_axis.set(title="alpha and learning rate", xlabel="optimizer step", ylabel="alpha")
    lr_axis = schedule_axis.twinx()
    lr_axis.plot(frame["step"], frame["lr"], color="tab:gray", linestyle="--", label="lr")
    lr_axis.set_ylabel("learning rate")
    lines = schedule_axis.get_lines() + lr_axis.get_lines()
    schedule_axis.legend(lines, [line.get_label() for line in lines], loc="center right")
    return figure


def _history_frame(history: Any) -> pd.DataFrame:
    if isinstance(history, pd.DataFrame):
        frame = history
    elif hasattr(history, "to_frame"):
        frame = history.to_frame()
    else:
        frame = pd.read_csv(history)
    if frame.empty:
        raise ValueError("the history is empty: train for at least one step before plotting")
    return frame


def project_2d(points, method: str = "umap", *, seed: int = 0) -> np.ndarray:
    """Project (M, D) points to (M, 2) with UMAP, t-SNE or PCA.

    Neighbourhood sizes shrink for small M, so any M >= 2 works: UMAP uses
    ``n_neighbors = min(15, M - 1)`` (at least 2) and t-SNE ``perplexity = min(30, (M - 1) / 3)``.
    UMAP needs umap-learn (``pip install 'msd-core[viz]'``); its first call in a process
    spends several seconds compiling.
    """
    points = _matrix(points, "points")
    count = len(points)
    if method not in PROJECTIONS:
        raise ValueError(f"invalid method={method!r}: must be one of {list(PROJECTIONS)}")
    if count < 2:
        raise ValueError(f"cannot project {count} point(s) to 2-D: give at least 2")
    if method == "pca" or points.shape[1] <= 2:
        return _pca_2d(points)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = max(1.0, min(30.0, (count - 1) / 3))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
    return _umap_2d(points, seed)


def _pca_2d(points: np.ndarray) -> np.ndarray:
    from sklearn.decomposition import PCA

    components = min(2, len(points), points.shape[1])
    coords = PCA(n_components=components).fit_transform(points)  # (M, components)
    if components < 2:
        coords = np.hstack([coords, np.zeros((len(points), 2 - components))])
    return coords


def _umap_2d(points: np.ndarray, seed: int) -> np.ndarray:
    try:
        import umap
    except ImportError:
        raise ImportError("method='umap' needs umap-learn: pip install 'msd-core[viz]' (or pip install umap-learn), "
                          "or use method='pca' or 'tsne'") from None

    neighbours = max(2, min(15, len(points) - 1))
    # Spectral initialisation needs a well-connected neighbour graph, which tiny inputs lack.
    init = "spectral" if len(points) > 4 * neighbours else "random"
    reducer = umap.UMAP(n_neighbors=neighbours, n_components=2, init=init, random_state=seed, n_jobs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coords = reducer.fit_transform(points)
    for item in caught:
        logger.debug("umap: %s", item.message)
    return np.asarray(coords, dtype=np.float64)


def plot_embeddings(image_emb, text_emb=None, labels: Sequence | None = None, method: str = "umap",
                    link_pairs: bool = True, *, seed: int = 0, max_links: int = 500,
                    title: str | None = None) -> Figure:
    """Map image (and text) embeddings to 2-D and scatter them.

    Image and text points are projected together, so distances between the two
    modalities are comparable. Images are circles and texts triangles.

    Args:
        image_emb: (N, D) image embeddings.
        text_emb: (N, D) text embeddings of the same pairs, or None.
        labels: N labels (any values) that colour both points of a pair; without
            them images are blue and texts orange.
        method: "umap" (default), "tsne" or "pca"; see ``project_2d``.
        link_pairs: draw a thin line from each image to its own report.
        seed: seed of UMAP, t-SNE and of the choice of linked pairs.
        max_links: at most this many pairs are linked (a random choice), so large
            sets stay readable.
        title: figure title; default names the method.
    """
    images = _matrix(image_emb, "image_emb")
    texts = None if text_emb is None else _matrix(text_emb, "text_emb")
    if texts is not None and texts.shape != images.shape:
        raise ValueError(f"image_emb {images.shape} and text_emb {texts.shape} must have the same (N, D) shape")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"labels has {len(labels)} values for {len(images)} embeddings")

    count = len(images)
    coords = project_2d(images if texts is None else np.vstack([images, texts]), method, seed=seed)
    image_xy, text_xy = coords[:count], (coords[count:] if texts is not None else None)

    figure = Figure(figsize=(7, 5.5), layout="constrained")
    axis = figure.add_subplot()
    size = float(np.clip(2000 / count, 4, 40))
    if link_pairs and text_xy is not None:
        linked = np.random.default_rng(seed).permutation(count)[:max_links]
        segments = np.stack([image_xy[linked], text_xy[linked]], axis=1)  # (L, 2, 2)
        axis.add_collection(LineCollection(segments, colors="0.6", linewidths=0.5, alpha=0.5, zorder=1))

    image_colours, text_colours, handles = _point_colours(labels)
    axis.scatter(image_xy[:, 0], image_xy[:, 1], s=size, c=image_colours, marker="o", linewidths=0, zorder=2)
    if text_xy is not None:
        axis.scatter(text_xy[:, 0], text_xy[:, 1], s=size, c=text_colours, marker="^", linewidths=0, zorder=2)
        handles += [Line2D([], [], marker="o", linestyle="", color="0.3", label="image"),
                    Line2D([], [], marker="^", linestyle="", color="0.3", label="text")]
    if handles:
        axis.legend(handles=handles, fontsize="small", loc="best", framealpha=0.8)
    axis.set(title=title or f"embeddings ({method.upper() if method != 'tsne' else 't-SNE'}, {count} pairs)",
             xticks=[], yticks=[])
    return figure


def _point_colours(labels) -> tuple[Any, Any, list]:
    """Colours of image and text points, and legend handles for the labels."""
    from matplotlib import colormaps

    if labels is None:
        return "tab:blue", "tab:orange", []
    codes, uniques = pd.factorize(pd.Series([str(label) for label in labels]), sort=True)
    if len(uniques) > MAX_LEGEND_LABELS:
        colours = colormaps["viridis"](codes / max(1, len(uniques) - 1))
        return colours, colours, []

    palette = colormaps["tab10" if len(uniques) <= 10 else "tab20"]
    colours = palette(codes % palette.N)
    handles = [Line2D([], [], marker="s", linestyle="", color=palette(i % palette.N), label=name)
               for i, name in enumerate(uniques)]
    return colours, colours, handles


def plot_similarity(image_emb, text_emb, labels: Sequence | None = None, *, max_items: int = 32) -> Figure:
    """Heatmap of the cosine similarities between a batch's images (rows) and reports (columns).

    Pair i is image i with report i, so a well-trained model has a bright diagonal,
    which is outlined.

    Args:
        image_emb: (N, D) image embeddings.
        text_emb: (N, D) text embeddings of the same pairs.
        labels: N tick labels (for example the finding); default the row numbers.
        max_items: only the first ``max_items`` pairs are drawn.
    """
    images = _unit_rows(_matrix(image_emb, "image_emb"))
    texts = _unit_rows(_matrix(text_emb, "text_emb"))
    if images.shape != texts.shape:
        raise ValueError(f"image_emb {images.shape} and text_emb {texts.shape} must have the same (N, D) shape")
    count = min(len(images), max_items)
    similarity = images[:count] @ texts[:count].T  # (n, n)

    side = min(12.0, 3.0 + 0.25 * count)
    figure = Figure(figsize=(side + 1.2, side), layout="constrained")
    axis = figure.add_subplot()
    picture = axis.imshow(similarity, cmap="viridis", vmin=min(0.0, similarity.min()), vmax=1.0)
    figure.colorbar(picture, ax=axis, label="cosine similarity")
    for i in range(count):
        axis.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
    ticks = [str(label) for label in labels[:count]] if labels is not None else [str(i) for i in range(count)]
    axis.set_xticks(range(count), ticks, rotation=90, fontsize="x-small")
    axis.set_yticks(range(count), ticks, fontsize="x-small")
    axis.set(xlabel="report", ylabel="image", title=f"image-report similarity, {count} pairs (each pair outlined)")
    return figure


def plot_confusion(matrix, class_names: Sequence[str] | None = None, *, task: str | None = None,
                   model: str | None = None) -> Figure:
    """Draw a confusion matrix: rows are true classes, columns predicted ones.

    Cells show counts and are shaded by the share of their row, so rare classes are
    as visible as common ones.

    Args:
        matrix: (C, C) counts, or the DataFrame in ``zero_shot(...).attrs["confusion"]``.
        class_names: the C class names; taken from the DataFrame's index when omitted.
        task: task name shown in the title, if given.
        model: model name shown in the title, if given.
    """
    if isinstance(matrix, pd.DataFrame):
        class_names = list(matrix.index) if class_names is None else class_names
        matrix = matrix.to_numpy()
    counts = np.asarray(matrix, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"a confusion matrix must be square (C, C), got shape {counts.shape}")
    names = [str(name) for name in (class_names if class_names is not None else range(len(counts)))]
    if len(names) != len(counts):
        raise ValueError(f"{len(names)} class names for a {len(counts)} x {len(counts)} confusion matrix")

    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)  # (C, C) row-normalised
    side = min(12.0, 3.0 + 0.6 * len(names))
    figure = Figure(figsize=(side + 1.2, side), layout="constrained")
    axis = figure.add_subplot()
    picture = axis.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(picture, ax=axis, label="share of the true class")
    for (row, column), count in np.ndenumerate(counts):
        colour = "white" if shares[row, column] > 0.5 else "black"
        axis.text(column, row, str(count), ha="center", va="center", color=colour, fontsize="small")
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axis.set_yticks(range(len(names)), names)
    title = "confusion matrix" if task is None else f"confusion matrix, task {task}"
    if model is not None:
        title += f" ({model} model)"
    axis.set(xlabel="predicted", ylabel="true", title=title)
    return figure


def plot_probe(results, *, metric: str = "auc", task: str | None = None) -> Figure:
    """Plot a linear-probe metric against the share of training labels, one line per model.

    Args:
        results: a ``linear_probe`` DataFrame, one with a ``model`` column holding
            several models, or a mapping of model name -> DataFrame.
        metric: "auc" (macro AUC-ROC) or "accuracy"; error bars are the standard
            deviation over seeds.
        task: task name shown in the title, if given.
    """
    frames = _probe_frames(results)
    figure = Figure(figsize=(6, 4), layout="constrained")
    axis = figure.add_subplot()
    fractions = set()
    for name, frame in frames.items():
        frame = frame.sort_values("fraction")
        fractions.update(frame["fraction"].tolist())
        axis.errorbar(frame["fraction"], frame[f"{metric}_mean"], yerr=frame[f"{metric}_std"].fillna(0.0),
                      marker="o", capsize=3, label=name)
    if metric == "auc":
        axis.axhline(0.5, color="0.5", linestyle="--", linewidth=1, label="chance")
    axis.set_xscale("log")
    ticks = sorted(fractions)
    axis.set_xticks(ticks, [f"{100 * fraction:g}%" for fraction in ticks])
    axis.minorticks_off()
    axis.set(xlabel="share of training labels", ylabel="macro AUC-ROC" if metric == "auc" else "accuracy",
             title="linear probe" if task is None else f"linear probe, task {task}")
    axis.legend()
    return figure


def _probe_frames(results) -> dict[str, pd.DataFrame]:
    if isinstance(results, Mapping):
        return {str(name): frame for name, frame in results.items()}
    if "model" in results.columns:
        return {str(name): group for name, group in results.groupby("model", sort=False)}
    return {"probe": results}


def retrieval_explorer(model_or_embeddings, dataset, k: int = 5, *, batch_size: int = 64, device: str = "cpu"):
    """Build an ipywidgets tool that shows an image with its top-k reports, or a report with its top-k images.

    Args:
        model_or_embeddings: a ``DualEncoder`` (the dataset is embedded first) or the
            ``Embeddings`` of ``dataset`` from ``msd_core.evaluate.embed``.
        dataset: the ``ImageTextDataset`` the embeddings came from; images are read
            from its files.
        k: results shown per query.
        batch_size, device: used only when a model is given.

    Returns:
        An ``ipywidgets.VBox``; display it in a notebook. A check mark flags results
        whose report equals the query's report.
    """
    try:
        import ipywidgets as widgets
    except ImportError:
        raise ImportError("retrieval_explorer needs ipywidgets: pip install 'msd-core[viz]'") from None
    from .embeddings import Embeddings, embed
    from .metrics import normalize_text

    embeddings = model_or_embeddings
    if not isinstance(embeddings, Embeddings):
        embeddings = embed(model_or_embeddings, dataset, batch_size=batch_size, device=device)
    positions = {row: position for position, row in enumerate(dataset.frame["row"])}
    images, texts = _unit_rows(embeddings.image), _unit_rows(embeddings.text)
    reports = embeddings.texts
    keys = [normalize_text(report) for report in reports]
    k = max(1, min(k, len(reports)))

    direction = widgets.ToggleButtons(options=[("image → reports", "image"), ("report → images", "text")],
                                      value="image", description="query")
    query = widgets.BoundedIntText(value=0, min=0, max=len(reports) - 1, description="pair")
    results = widgets.VBox()

    def thumbnail(index: int, width: int = 160):
        row = int(embeddings.frame["row"].iat[index])
        return widgets.Image(value=_thumbnail_png(dataset.image_file(positions[row]), width), format="png",
                             width=width)

    def refresh(*_):
        index = query.value
        if direction.value == "image":
            similarity = texts @ images[index]  # (N,)
            ranked = np.argsort(-similarity, kind="stable")[:k]
            items = "".join(f"<li>{'✓ ' if keys[j] == keys[index] else ''}<b>{similarity[j]:.3f}</b> "
                            f"{html.escape(reports[j])}</li>" for j in ranked)
            results.children = [thumbnail(index), widgets.HTML(f"<ol>{items}</ol>")]
        else:
            similarity = images @ texts[index]  # (N,)
            ranked = np.argsort(-similarity, kind="stable")[:k]
            cards = [widgets.VBox([thumbnail(j, 120), widgets.HTML(
                f"{'✓ ' if keys[j] == keys[index] else ''}{similarity[j]:.3f}")]) for j in ranked]
            results.children = [widgets.HTML(f"<p><b>report {index}:</b> {html.escape(reports[index])}</p>"),
                                widgets.HBox(cards)]

    direction.observe(refresh, names="value")
    query.observe(refresh, names="value")
    refresh()
    return widgets.VBox([widgets.HBox([direction, query]), results])


def _thumbnail_png(path, width: int) -> bytes:
    from PIL import Image

    from .imageio import load_image

    pixels = (np.clip(load_image(path), 0.0, 1.0) * 255).astype(np.uint8)  # (H, W)
    image = Image.fromarray(pixels)  # a 2-D uint8 array becomes a greyscale ("L") image
    image.thumbnail((width, width))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _matrix(values, name: str) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().float().numpy()
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {matrix.shape}")
    return matrix


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
