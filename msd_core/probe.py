"""Few-shot linear probe: logistic regression on frozen embeddings at several label fractions.

``linear_probe`` draws a stratified subset of the training rows for each label
fraction and seed, fits scikit-learn's ``LogisticRegression`` on it, and scores the
whole test split. Multiclass labels (1-D) get one multinomial model; multilabel labels
(2-D, 0/1) get one binary model per class (one-vs-rest).
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .metrics import as_matrix, binary_auc

logger = logging.getLogger(__name__)

PROBE_COLUMNS = ["fraction", "train_size", "runs", "auc_mean", "auc_std", "accuracy_mean", "accuracy_std"]


def linear_probe(train_embeddings, train_labels, test_embeddings, test_labels,
                 fractions: Sequence[float] = (0.01, 0.1, 1.0), seeds: Sequence[int] = (0, 1, 2), *,
                 class_names: Sequence[str] | None = None, standardize: bool = True, max_iter: int = 2000,
                 regularization: float = 1.0) -> pd.DataFrame:
    """Fit a logistic-regression probe on a fraction of the training labels and score the test split.

    Args:
        train_embeddings: (N_train, D) frozen embeddings (an ``Embeddings`` uses its images).
        train_labels: (N_train,) class labels of any hashable type (multiclass), or
            (N_train, C) labels of 0/1, True/False or 0.0/1.0 (multilabel).
        test_embeddings: (N_test, D).
        test_labels: (N_test,) or (N_test, C), the same kind as ``train_labels``.
        fractions: shares of the training rows, in (0, 1]. Each class contributes
            round(fraction x its count) rows and at least one, so a small fraction may
            use a few more rows than fraction x N_train. In the multilabel case the
            subset is random, and for each class that lacks a positive or a negative
            one row with that value is added when the training set has one.
        seeds: one subset and fit per seed. At fraction 1.0 every seed would draw the
            whole training set, so it is fitted once.
        class_names: names of the C multilabel columns (default "0", "1", ...).
        standardize: scale features to zero mean and unit variance before the fit.
            Embeddings are L2-normalised, so their entries are small and an unscaled
            probe is strongly regularised.
        max_iter: L-BFGS iterations.
        regularization: ``C`` of ``LogisticRegression`` (inverse L2 strength).

    Returns:
        A DataFrame with one row per fraction and the columns ``fraction``, ``train_size``
        (mean rows used), ``runs``, ``auc_mean``, ``auc_std``, ``accuracy_mean`` and
        ``accuracy_std``. Means and population standard deviations (ddof=0) are over
        runs. AUC is the macro AUC-ROC, one-vs-rest: a class whose test labels have one
        value only is NaN with an ``UndefinedMetricWarning`` and left out of the macro
        mean. Accuracy is the share of correct classes (multiclass) or the mean per-label
        accuracy at probability 0.5 (multilabel). ``frame.attrs["runs"]`` contains one row
        per run with the per-class AUCs. The same inputs and seeds give the same numbers.
    """
    train_x = as_matrix(getattr(train_embeddings, "image", train_embeddings), "train_embeddings")
    test_x = as_matrix(getattr(test_embeddings, "image", test_embeddings), "test_embeddings")
    problem = _Problem.build(train_labels, test_labels, class_names)
    _check_rows(train_x, problem.train, "train")
    _check_rows(test_x, problem.test, "test")
    _check_fractions(fractions, seeds)
    problem.warn_undefined_classes()

    runs = []
    for fraction in fractions:
        fraction_seeds = seeds[:1] if fraction >= 1.0 else seeds
        for seed in fraction_seeds:
            subset = problem.subsample(fraction, seed)
            scores = _fit_and_score(problem, train_x[subset], subset, test_x, seed, standardize, max_iter,
                                    regularization)
            runs.append({"fraction": float(fraction), "seed": int(seed), "train_size": len(subset),
                         **problem.evaluate(scores)})

    runs_frame = pd.DataFrame(runs)
    summary = _summarize(runs_frame)
    summary.attrs["runs"] = runs_frame
    return summary


def stratified_subset(labels, fraction: float, seed: int) -> np.ndarray:
    """Draw the training rows of one probe run.

    Args:
        labels: (N,) class labels, or (N, C) 0/1 labels.
        fraction: share of the rows, in (0, 1]; 1.0 returns every row.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        Sorted row indices. Multiclass: each class contributes round(fraction x its
        count) rows, at least one. Multilabel: a random round(fraction x N) rows (at
        least one), plus, for each column that lacks a 0 or a 1 among them, one random
        row that has it, when any row has it.
    """
    labels = np.asarray(labels)
    size = len(labels)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"invalid fraction={fraction}: must be in (0, 1]")
    if fraction >= 1.0:
        return np.arange(size)
    rng = np.random.default_rng(seed)
    if labels.ndim == 1:
        chosen = []
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            take = min(len(members), max(1, round(fraction * len(members))))
            chosen.append(rng.choice(members, size=take, replace=False))
        return np.sort(np.concatenate(chosen))

    chosen = np.zeros(size, dtype=bool)
    chosen[rng.choice(size, size=max(1, round(fraction * size)), replace=False)] = True
    for column in range(labels.shape[1]):
        for value in (0, 1):
            have = labels[:, column] == value
            if have.any() and not have[chosen].any():
                chosen[rng.choice(np.flatnonzero(have))] = True
    return np.flatnonzero(chosen)


class _Problem:
    """Encoded labels of both splits: multiclass indices (N,) or multilabel 0/1 matrices (N, C)."""

    def __init__(self, multilabel: bool, classes: list[str], train: np.ndarray, test: np.ndarray):
        self.multilabel = multilabel
        self.classes = classes
        self.train = train
        self.test = test

    @classmethod
    def build(cls, train_labels, test_labels, class_names: Sequence[str] | None) -> "_Problem":
        train = _as_label_array(train_labels, "train_labels")
        test = _as_label_array(test_labels, "test_labels")
        if train.ndim != test.ndim:
            raise ValueError(f"train_labels is {train.ndim}-D but test_labels is {test.ndim}-D; pass 1-D class "
                             "labels (multiclass) or 2-D 0/1 matrices (multilabel) for both")
        if train.ndim == 2:
            return cls._multilabel(train, test, class_names)

        classes = sorted(set(train.tolist()) | set(test.tolist()), key=str)
        if len(set(train.tolist())) < 2:
            raise ValueError(f"train_labels has one class only ({classes[0]!r}); a probe needs two or more")
        index = {label: position for position, label in enumerate(classes)}
        encode = np.vectorize(index.__getitem__, otypes=[np.int64])
        return cls(False, [str(label) for label in classes], encode(train), encode(test))

    @classmethod
    def _multilabel(cls, train: np.ndarray, test: np.ndarray, class_names: Sequence[str] | None) -> "_Problem":
        if train.shape[1] != test.shape[1]:
            raise ValueError(f"train_labels has {train.shape[1]} columns but test_labels has {test.shape[1]}")
        names = [str(name) for name in class_names] if class_names is not None else \
            [str(column) for column in range(train.shape[1])]
        if len(names) != train.shape[1]:
            raise ValueError(f"class_names has {len(names)} names for {train.shape[1]} label columns")
        return cls(True, names, _binary_matrix(train, "train_labels"), _binary_matrix(test, "test_labels"))

    def subsample(self, fraction: float, seed: int) -> np.ndarray:
        """Sorted training row indices for one run."""
        return stratified_subset(self.train, fraction, seed)

    def test_truth(self) -> np.ndarray:
        """(N_test, C) 0/1 matrix of the test labels (one-hot in the multiclass case)."""
        if self.multilabel:
            return self.test
        return np.eye(len(self.classes), dtype=np.int64)[self.test]

    def warn_undefined_classes(self) -> None:
        """Warn once per class whose test labels have one value, before the runs repeat the check."""
        truth = self.test_truth()
        for column, name in enumerate(self.classes):
            binary_auc(truth[:, column], np.zeros(len(truth)), name)

    def evaluate(self, scores: np.ndarray) -> dict[str, float]:
        """Macro AUC, accuracy and per-class AUCs of (N_test, C) probabilities."""
        truth = self.test_truth()
        if self.multilabel:
            accuracy = float(np.mean((scores >= 0.5) == (truth == 1)))
        else:
            accuracy = float(np.mean(scores.argmax(axis=1) == self.test))
        aucs = {f"auc_{name}": binary_auc(truth[:, c], scores[:, c], name, warn=False)
                for c, name in enumerate(self.classes)}
        defined = [value for value in aucs.values() if not math.isnan(value)]
        return {"auc": float(np.mean(defined)) if defined else math.nan, "accuracy": accuracy, **aucs}


def _as_label_array(labels, name: str) -> np.ndarray:
    if hasattr(labels, "to_numpy"):
        labels = labels.to_numpy()
    elif hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim not in (1, 2):
        raise ValueError(f"{name} must be 1-D (multiclass) or 2-D (multilabel), got shape {array.shape}")
    if array.ndim == 1 and array.dtype.kind == "f":
        if np.isnan(array).any():
            raise ValueError(f"{name} contains NaN; drop the rows without a label first")
        if np.all(array == np.round(array)):
            array = array.astype(np.int64)  # 0.0/1.0 read from CSV become the classes 0 and 1
    return array


def _binary_matrix(labels: np.ndarray, name: str) -> np.ndarray:
    values = labels.astype(np.float64) if labels.dtype.kind in "biuf" else None
    if values is None or not np.isin(values, (0.0, 1.0)).all():
        found = sorted({str(value) for value in np.unique(labels.astype(str))})[:10]
        raise ValueError(f"{name} must contain only 0/1 (or 0.0/1.0, True/False) in the multilabel case; found "
                         f"{found}. Drop rows with missing or uncertain labels first.")
    return values.astype(np.int64)


def _check_rows(embeddings: np.ndarray, labels: np.ndarray, split: str) -> None:
    if len(embeddings) != len(labels):
        raise ValueError(f"{split} split: {len(embeddings)} embeddings but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError(f"{split} split is empty; a probe needs rows in both splits")


def _check_fractions(fractions: Sequence[float], seeds: Sequence[int]) -> None:
    bad = [fraction for fraction in fractions if not 0.0 < float(fraction) <= 1.0]
    if bad or not fractions:
        raise ValueError(f"invalid fractions={list(fractions)}: each must be in (0, 1]")
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed")


def _fit_and_score(problem: _Problem, features: np.ndarray, subset: np.ndarray, test_x: np.ndarray, seed: int,
                   standardize: bool, max_iter: int, regularization: float) -> np.ndarray:
    """(N_test, C) probabilities of each class."""
    labels = problem.train[subset]
    if problem.multilabel:
        columns = [_fit_binary(features, labels[:, c], test_x, seed, standardize, max_iter, regularization)
                   for c in range(labels.shape[1])]
        return np.stack(columns, axis=1)

    classifier = _classifier(seed, standardize, max_iter, regularization)
    _fit_quietly(classifier, features, labels)
    probabilities = np.zeros((len(test_x), len(problem.classes)))
    probabilities[:, classifier.classes_] = classifier.predict_proba(test_x)
    return probabilities


def _fit_binary(features: np.ndarray, labels: np.ndarray, test_x: np.ndarray, seed: int, standardize: bool,
                max_iter: int, regularization: float) -> np.ndarray:
    """(N_test,) probability of the positive label; constant when the subset has one label value only."""
    if len(np.unique(labels)) < 2:
        return np.full(len(test_x), float(labels[0]))
    classifier = _classifier(seed, standardize, max_iter, regularization)
    _fit_quietly(classifier, features, labels)
    return classifier.predict_proba(test_x)[:, 1]


def _classifier(seed: int, standardize: bool, max_iter: int, regularization: float):
    model = LogisticRegression(C=regularization, max_iter=max_iter, random_state=seed)
    return make_pipeline(StandardScaler(), model) if standardize else model


def _fit_quietly(classifier, features: np.ndarray, labels: np.ndarray) -> None:
    """Fit, turning scikit-learn's convergence warning into one log line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        classifier.fit(features, labels)
    converged = True
    for item in caught:
        if issubclass(item.category, ConvergenceWarning):
            converged = False
        else:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    if not converged:
        logger.warning("the linear probe did not converge on %d rows; raise max_iter for exact numbers",
                       len(labels))


def _summarize(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for fraction, group in runs.groupby("fraction", sort=True):
        rows.append({
            "fraction": fraction,
            "train_size": float(group["train_size"].mean()),
            "runs": len(group),
            "auc_mean": _nan_mean(group["auc"]),
            "auc_std": _nan_std(group["auc"]),
            "accuracy_mean": float(group["accuracy"].mean()),
            "accuracy_std": float(group["accuracy"].std(ddof=0)),
        })
    return pd.DataFrame(rows, columns=PROBE_COLUMNS)


def _nan_mean(values: pd.Series) -> float:
    defined = values.dropna()
    return float(defined.mean()) if len(defined) else math.nan


def _nan_std(values: pd.Series) -> float:
    defined = values.dropna()
    return float(defined.std(ddof=0)) if len(defined) else math.nan
