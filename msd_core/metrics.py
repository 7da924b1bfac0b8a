"""Metrics on embeddings that need no model: zero-shot scores and their metrics, and retrieval.

Every function takes plain arrays (numpy arrays or CPU tensors) so it can be checked on
hand-built embeddings. ``msd_core.evaluate`` connects them to a model and a manifest.

A metric that is undefined on the given split, such as the AUC-ROC of a class whose
labels have one value only, is NaN and comes with a
``sklearn.exceptions.UndefinedMetricWarning``. It is never reported as 0, and macro
averages leave it out.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import roc_auc_score

__all__ = [
    "UndefinedMetricWarning",
    "as_matrix",
    "normalize_rows",
    "zero_shot_scores",
    "contrast_scores",
    "confusion_matrix",
    "multiclass_metrics",
    "binary_auc",
    "multilabel_auc",
    "retrieval",
    "normalize_text",
]

METRIC_COLUMNS = ["metric", "class", "value", "chance", "support"]
ALL_CLASSES = "all"


def as_matrix(values, name: str, dtype=np.float64) -> np.ndarray:
    """Return ``values`` (array, tensor or list) as a 2-D numpy array, or raise naming ``name``."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().float().numpy()
    matrix = np.asarray(values, dtype=dtype)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"{name} contains NaN or infinite values; check the model's embeddings")
    return matrix


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """Scale every row to unit L2 norm; an all-zero row stays zero."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)  # (N, 1)
    return matrix / np.maximum(norms, 1e-12)


def zero_shot_scores(image_emb, class_emb) -> np.ndarray:
    """Cosine similarity of every image to every class embedding.

    Args:
        image_emb: (N, D) image embeddings.
        class_emb: (C, D) class embeddings, one row per class.

    Returns:
        (N, C) float64 scores in [-1, 1]; the predicted class of image i is the argmax of row i.
    """
    images = normalize_rows(as_matrix(image_emb, "image_emb"))
    classes = normalize_rows(as_matrix(class_emb, "class_emb"))
    if images.shape[1] != classes.shape[1]:
        raise ValueError(f"image_emb has dimension {images.shape[1]} but class_emb has {classes.shape[1]}; "
                         "embed the images and the prompts with the same model")
    return images @ classes.T  # (N, C)


def contrast_scores(image_emb, positive_emb, negative_emb) -> np.ndarray:
    """Multilabel zero-shot scores: similarity to each class's positive prompts minus its negative prompts.

    Args:
        image_emb: (N, D) image embeddings.
        positive_emb: (C, D) embeddings of the prompts that state each finding.
        negative_emb: (C, D) embeddings of the prompts that deny it.

    Returns:
        (N, C) float64 scores in [-2, 2]; higher means the finding is more likely present.
        Each column is scored on its own (never an argmax across classes).
    """
    return zero_shot_scores(image_emb, positive_emb) - zero_shot_scores(image_emb, negative_emb)


def confusion_matrix(true: Sequence[int], predicted: Sequence[int], n_classes: int) -> np.ndarray:
    """Return the (C, C) count matrix: row = true class index, column = predicted class index."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(true, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return matrix


def multiclass_metrics(true: Sequence[int], predicted: Sequence[int], class_names: Sequence[str]) -> pd.DataFrame:
    """Accuracy, macro-F1 and per-class F1 of single-label predictions.

    Args:
        true: (N,) true class indices into ``class_names``.
        predicted: (N,) predicted class indices.
        class_names: the C class names.

    Returns:
        A DataFrame with columns ``metric, class, value, chance, support``: one
        ``accuracy`` row, one ``macro_f1`` row (class ``"all"``) and one ``f1`` row per
        class. Macro-F1 averages the classes that occur in ``true``, because recall is
        undefined for a class with no examples. ``chance`` is the expected value for a
        guesser that picks one of the C classes uniformly at random: 1/C for accuracy
        and 2 p/(C p + 1) for the F1 of a class with share p. A class without examples
        has NaN F1 and chance. The full confusion matrix
        (a DataFrame, rows true, columns predicted) is in ``frame.attrs["confusion"]``.
    """
    true = np.asarray(true, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    n_classes = len(class_names)
    if len(true) == 0:
        raise ValueError("no labelled rows to score: true is empty")
    matrix = confusion_matrix(true, predicted, n_classes)

    support = matrix.sum(axis=1)  # (C,) true examples per class
    predicted_count = matrix.sum(axis=0)  # (C,)
    hits = np.diag(matrix)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted_count > 0, hits / np.maximum(predicted_count, 1), 0.0)
        recall = hits / support
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    share = support / support.sum()
    f1_chance = 2 * share / (n_classes * share + 1)
    present = support > 0

    rows = [
        ("accuracy", ALL_CLASSES, hits.sum() / len(true), 1.0 / n_classes, len(true)),
        ("macro_f1", ALL_CLASSES, f1[present].mean(), f1_chance[present].mean(), len(true)),
    ]
    for index, name in enumerate(class_names):
        if present[index]:
            rows.append(("f1", name, f1[index], f1_chance[index], int(support[index])))
        else:
            rows.append(("f1", name, math.nan, math.nan, 0))  # undefined: the class has no examples
    frame = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    frame.attrs["confusion"] = pd.DataFrame(matrix, index=pd.Index(class_names, name="true"),
                                            columns=pd.Index(class_names, name="predicted"))
    return frame


def binary_auc(labels: np.ndarray, scores: np.ndarray, name: str, warn: bool = True) -> float:
    """AUC-ROC of one class; NaN with an ``UndefinedMetricWarning`` when ``labels`` has one value only.

    Args:
        labels: (N,) 0/1 labels (NaN marks a row without a label, which is left out).
        scores: (N,) scores, higher meaning more likely positive.
        name: the class name, used in the warning.
        warn: False skips the warning, for callers that have already warned about the class.
    """
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    known = ~np.isnan(labels)
    labels, scores = labels[known], scores[known]
    values = np.unique(labels)
    if len(values) < 2:
        if not warn:
            return math.nan
        described = "no labelled rows" if len(values) == 0 else f"only label {values[0]:g} in {len(labels)} rows"
        warnings.warn(f"AUC-ROC of class {name!r} is undefined ({described}); it is reported as NaN and left "
                      "out of the macro average. Evaluate on a split with both positive and negative examples.",
                      UndefinedMetricWarning, stacklevel=3)
        return math.nan
    return float(roc_auc_score(labels, scores))


def multilabel_auc(labels, scores, class_names: Sequence[str]) -> pd.DataFrame:
    """Per-class AUC-ROC of an (N, C) score matrix, and their macro average.

    Args:
        labels: (N, C) 0/1 labels; NaN marks an unknown label, left out of that class only.
        scores: (N, C) scores, one column per class, higher meaning more likely positive.
        class_names: the C class names.

    Returns:
        A DataFrame with columns ``metric, class, value, chance, support``: one ``auc``
        row per class (``support`` = positives) and a ``macro_auc`` row, the mean of the
        defined per-class values. A class whose labels have one value only is NaN, with
        an ``UndefinedMetricWarning``. Chance is 0.5.
    """
    labels = np.asarray(labels, dtype=np.float64)
    scores = as_matrix(scores, "scores")
    if labels.shape != scores.shape or labels.shape[1] != len(class_names):
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must both be (N, C) with "
                         f"C = {len(class_names)} classes")

    rows = []
    for index, name in enumerate(class_names):
        auc = binary_auc(labels[:, index], scores[:, index], name)
        positives = int(np.nansum(labels[:, index]))
        rows.append(("auc", name, auc, 0.5, positives))
    defined = [row[2] for row in rows if not math.isnan(row[2])]
    macro = float(np.mean(defined)) if defined else math.nan
    rows.insert(0, ("macro_auc", ALL_CLASSES, macro, 0.5, int(np.sum(~np.isnan(labels).all(axis=1)))))
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def normalize_text(text) -> str:
    """Collapse runs of whitespace to one space and strip the ends (case is kept)."""
    return " ".join(str(text).split())


def retrieval(image_emb, text_emb, texts: Sequence[str] | None = None, ks: Sequence[int] = (1, 5, 10),
              chunk_size: int = 1024) -> pd.DataFrame:
    """Image-to-text and text-to-image retrieval over N pairs (image i belongs with text i).

    Definitions, for a query and the K gallery items most similar to it by cosine
    similarity (ties broken by the lower index):

    * a gallery item is relevant when its report equals the query's report after
      whitespace normalisation, so a duplicated report counts as a hit for every image
      it belongs to, and every image of that report is relevant to it. Without
      ``texts``, only the query's own pair is relevant;
    * Recall@K = 1 if at least one relevant item is in the top K, else 0 (the usual
      "R@K" of image-text retrieval), averaged over queries;
    * Precision@K = (relevant items among the top K) / K, averaged over queries.

    ``recall_chance`` and ``precision_chance`` are the expected values under a random
    ranking. A K larger than N is skipped with a warning.

    Similarities are computed for ``chunk_size`` queries at a time, in float64, so
    memory is O(chunk_size x N) rather than O(N^2), and any chunk size gives the same
    result.

    Args:
        image_emb: (N, D) image embeddings.
        text_emb: (N, D) text embeddings of the same pairs, in the same order.
        texts: the N reports, used to find duplicates; None treats every report as distinct.
        ks: the cut-offs K.
        chunk_size: queries per similarity block.

    Returns:
        A DataFrame with columns ``direction`` ("image_to_text" or "text_to_image"),
        ``k``, ``recall``, ``precision``, ``recall_chance``, ``precision_chance``, ``queries``.
    """
    images = normalize_rows(as_matrix(image_emb, "image_emb"))
    reports = normalize_rows(as_matrix(text_emb, "text_emb"))
    if images.shape != reports.shape:
        raise ValueError(f"image_emb {images.shape} and text_emb {reports.shape} must have the same (N, D) shape: "
                         "row i of each is one image-text pair")
    if chunk_size < 1:
        raise ValueError(f"invalid chunk_size={chunk_size}: must be a positive number of queries")
    n_pairs = len(images)
    groups = _report_groups(texts, n_pairs)
    cutoffs = _valid_cutoffs(ks, n_pairs)

    relevant_count = np.bincount(groups)[groups]  # (N,) relevant gallery items per query
    rows = []
    for direction, queries, gallery in (("image_to_text", images, reports), ("text_to_image", reports, images)):
        hits = _top_hits(queries, gallery, groups, max(cutoffs, default=0), chunk_size)  # (N, K_max) bool
        found = np.cumsum(hits, axis=1)  # (N, K_max) relevant items within the top k
        for k in cutoffs:
            rows.append({
                "direction": direction,
                "k": k,
                "recall": float(np.mean(found[:, k - 1] > 0)),
                "precision": float(np.mean(found[:, k - 1] / k)),
                "recall_chance": float(np.mean(_chance_of_any(relevant_count, n_pairs, k))),
                "precision_chance": float(np.mean(relevant_count / n_pairs)),
                "queries": n_pairs,
            })
    return pd.DataFrame(rows, columns=["direction", "k", "recall", "precision", "recall_chance",
                                       "precision_chance", "queries"])


def _report_groups(texts: Sequence[str] | None, n_pairs: int) -> np.ndarray:
    """(N,) group ids: pairs with the same normalised report share a group."""
    if texts is None:
        return np.arange(n_pairs)
    texts = list(texts)
    if len(texts) != n_pairs:
        raise ValueError(f"texts has {len(texts)} reports but the embeddings have {n_pairs} rows")
    codes, _ = pd.factorize(pd.Series([normalize_text(text) for text in texts], dtype=object))
    return codes.astype(np.int64)


def _valid_cutoffs(ks: Sequence[int], n_pairs: int) -> list[int]:
    cutoffs = sorted({int(k) for k in ks})
    if not cutoffs or cutoffs[0] < 1:
        raise ValueError(f"invalid ks={list(ks)}: give one or more positive cut-offs K")
    too_large = [k for k in cutoffs if k > n_pairs]
    if too_large:
        warnings.warn(f"retrieval over {n_pairs} pairs: skipping K={too_large}, larger than the gallery",
                      UserWarning, stacklevel=3)
    return [k for k in cutoffs if k <= n_pairs]


def _top_hits(queries: np.ndarray, gallery: np.ndarray, groups: np.ndarray, max_k: int,
              chunk_size: int) -> np.ndarray:
    """(N, max_k) bool: whether the r-th ranked gallery item of each query is relevant."""
    hits = np.zeros((len(queries), max_k), dtype=bool)
    if max_k == 0:
        return hits
    for start in range(0, len(queries), chunk_size):
        stop = min(start + chunk_size, len(queries))
        similarity = queries[start:stop] @ gallery.T  # (c, N) float64
        ranked = _rank_top(similarity, max_k)  # (c, K_max) gallery indices, best first
        hits[start:stop] = groups[ranked] == groups[start:stop, None]
    return hits


def _rank_top(similarity: np.ndarray, max_k: int) -> np.ndarray:
    """Indices of the max_k highest similarities per row, best first, ties broken by the lower index.

    BLAS may sum a one-row block in another order than a large block, which moves a
    float64 result by about 1e-16. Rounding ``2 - similarity`` (in [1, 3] for unit
    vectors) to float32, a grid of about 2e-7, removes that difference, so rankings do
    not depend on the chunk size. The bits of a positive float32 sort like the float,
    so each is packed with its column index into one unique int64 key, and a partial
    sort (``argpartition``) selects the same top K as a full stable sort would.
    """
    distance = (2.0 - similarity).astype(np.float32).view(np.int32)  # (c, N), smaller = more similar
    keys = distance.astype(np.int64) << 32  # (c, N)
    keys |= np.arange(similarity.shape[1], dtype=np.int64)
    top = np.argpartition(keys, max_k - 1, axis=1)[:, :max_k]  # (c, K_max), unordered
    order = np.argsort(np.take_along_axis(keys, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def _chance_of_any(relevant: np.ndarray, n_items: int, k: int) -> np.ndarray:
    """Probability that k items drawn at random without replacement include a relevant one."""
    none_found = np.ones(len(relevant), dtype=np.float64)
    for draw in range(k):
        none_found *= np.clip((n_items - relevant - draw) / (n_items - draw), 0.0, 1.0)
    return 1.0 - none_found
