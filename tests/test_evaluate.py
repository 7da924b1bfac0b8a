"""Tests of the downstream evaluation: retrieval, zero-shot, linear probe, embedding cache, reports."""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score
from torch.nn import functional as F

from conftest import requires_shared_data, write_tiny_manifest
from msd_core.config import get_preset
from msd_core.data import ImageTextDataset
from msd_core.evaluate import (Embeddings, UndefinedMetricWarning, embed, evaluate_checkpoint, linear_probe,
                               load_prompts, retrieval, stack_results, zero_shot, zero_shot_predictions,
                               zero_shot_scores)
from msd_core.evaluate_cli import add_evaluate_arguments, run_evaluate
from msd_core.metrics import multiclass_metrics, multilabel_auc
from msd_core.model import build_model
from msd_core.probe import stratified_subset
from msd_core.report import ReportInputs, write_report
from msd_core.train import load_model, train
from msd_core.zeroshot import PROMPT_DIR

TINY_PROMPTS = {
    "name": "tiny",
    "tasks": {
        "finding": {
            "type": "multiclass",
            "column": "finding",
            "classes": {word: [f"{word}.", f"the {word} finding."] for word in
                        ["heart", "enlarged", "effusion", "left", "right", "pneumothorax", "clear", "lungs",
                         "nodule", "normal"]},
        },
    },
}


# ---------------------------------------------------------------- helpers


def brute_force_retrieval(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[float, float]:
    """Recall@K and Precision@K with only the query's own pair relevant, by sorting every row."""
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    recalls, precisions = [], []
    for index, query in enumerate(queries):
        similarity = gallery @ query
        top = sorted(range(len(gallery)), key=lambda j: (-similarity[j], j))[:k]
        recalls.append(index in top)
        precisions.append((index in top) / k)
    return float(np.mean(recalls)), float(np.mean(precisions))


class LookupTextModel(torch.nn.Module):
    """A stand-in for ``DualEncoder`` in zero-shot tests: each known prompt has a fixed embedding."""

    def __init__(self, vectors: dict[str, np.ndarray]):
        super().__init__()
        self.prompts = list(vectors)
        table = np.stack([vectors[prompt] for prompt in self.prompts])
        self.table = torch.nn.Parameter(torch.tensor(table, dtype=torch.float32), requires_grad=False)

    def tokenize(self, texts):
        ids = torch.tensor([[self.prompts.index(text)] for text in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def encode_text(self, input_ids, attention_mask):
        return F.normalize(self.table[input_ids[:, 0]], dim=-1)


def write_prompt_file(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
    return path


def class_world(tmp_path: Path, seed: int = 0):
    """Four classes on the first four axes; 40 images lie near the axis of their class."""
    rng = np.random.default_rng(seed)
    classes = ["a", "b", "c", "d"]
    axes = np.eye(8)
    vectors, prompt_classes = {}, {}
    for index, name in enumerate(classes):
        prompts = [f"{name} one", f"{name} two"]
        prompt_classes[name] = prompts
        for prompt in prompts:
            vectors[prompt] = axes[index] + 0.05 * rng.normal(size=8)
    truth = np.repeat(classes, 10)
    images = np.stack([axes[classes.index(name)] + 0.1 * rng.normal(size=8) for name in truth])
    frame = pd.DataFrame({"row": np.arange(len(truth)), "text": [f"report {i}" for i in range(len(truth))],
                          "finding": truth})
    embeddings = Embeddings(images.astype(np.float32), images.astype(np.float32), frame)
    content = {"name": "world", "tasks": {"finding": {"type": "multiclass", "column": "finding",
                                                      "classes": prompt_classes}}}
    return embeddings, LookupTextModel(vectors), content


# -------------------------------------------------------------- retrieval


def test_recall_matches_brute_force():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(60, 16))
    texts = images + 1.5 * rng.normal(size=(60, 16))
    table = retrieval(images, texts, ks=(1, 5, 10))
    for k in (1, 5, 10):
        recall, precision = brute_force_retrieval(images, texts, k)
        row = table[(table["direction"] == "image_to_text") & (table["k"] == k)].iloc[0]
        assert row["recall"] == pytest.approx(recall)
        assert row["precision"] == pytest.approx(precision)
        recall, precision = brute_force_retrieval(texts, images, k)
        row = table[(table["direction"] == "text_to_image") & (table["k"] == k)].iloc[0]
        assert row["recall"] == pytest.approx(recall)
        assert row["precision"] == pytest.approx(precision)


def test_chunked_retrieval_is_identical():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(150, 32)).astype(np.float32)
    texts = (images + rng.normal(size=(150, 32))).astype(np.float32)
    reports = [f"report {i % 40}" for i in range(150)]
    whole = retrieval(images, texts, texts=reports, chunk_size=10_000)
    for chunk_size in (1, 7, 64):
        pd.testing.assert_frame_equal(retrieval(images, texts, texts=reports, chunk_size=chunk_size), whole)


def test_duplicate_texts_count_as_hits():
    axes = np.eye(4)
    images = axes
    texts = axes[[1, 0, 2, 3]]  # reports 0 and 1 swapped: each image ranks the other's report first
    reports = ["No  acute findings.", "No acute findings. ", "Cardiomegaly.", "Effusion."]

    with_texts = retrieval(images, texts, texts=reports, ks=(1,)).set_index("direction")
    without_texts = retrieval(images, texts, ks=(1,)).set_index("direction")

    assert with_texts.loc["image_to_text", "recall"] == 1.0
    assert with_texts.loc["text_to_image", "recall"] == 1.0
    assert without_texts.loc["image_to_text", "recall"] == 0.5


def test_aligned_pairs_recall_one():
    embeddings = np.random.default_rng(2).normal(size=(100, 32))
    table = retrieval(embeddings, embeddings, ks=(1,)).set_index("direction")
    assert table.loc["image_to_text", "recall"] == 1.0
    assert table.loc["text_to_image", "recall"] == 1.0


def test_shuffled_pairs_recall_near_chance():
    rng = np.random.default_rng(3)
    images = rng.normal(size=(200, 32))
    texts = images[rng.permutation(200)]
    table = retrieval(images, texts, ks=(1,)).set_index("direction")
    assert table.loc["image_to_text", "recall"] < 0.05
    assert table.loc["text_to_image", "recall"] < 0.05
    assert table.loc["image_to_text", "recall_chance"] == pytest.approx(1 / 200)


# --------------------------------------------------------------- zero-shot


def test_zero_shot_aligned_classes_accuracy_one(tmp_path):
    embeddings, model, content = class_world(tmp_path)
    metrics = zero_shot(embeddings, model, write_prompt_file(tmp_path / "world.yaml", content), task="finding")
    by_metric = metrics.set_index("metric")["value"]
    assert by_metric["accuracy"] == 1.0
    assert by_metric["macro_f1"] == 1.0
    assert np.trace(metrics.attrs["confusion"].to_numpy()) == 40


def test_swapped_prompts_move_exactly_those(tmp_path):
    embeddings, model, content = class_world(tmp_path)
    original = zero_shot_predictions(embeddings, model, write_prompt_file(tmp_path / "world.yaml", content))
    classes = content["tasks"]["finding"]["classes"]
    classes["b"], classes["c"] = classes["c"], classes["b"]
    swapped = zero_shot_predictions(embeddings, model, write_prompt_file(tmp_path / "swapped.yaml", content))

    moved = original["predicted"] != swapped["predicted"]
    assert set(original.loc[moved, "true"]) == {"b", "c"}
    assert moved.sum() == 20
    assert (swapped.loc[original["true"] == "b", "predicted"] == "c").all()
    assert (swapped.loc[original["true"] == "c", "predicted"] == "b").all()


def test_zero_shot_scores_are_cosines():
    rng = np.random.default_rng(4)
    images, classes = rng.normal(size=(5, 6)), rng.normal(size=(3, 6))
    expected = (images / np.linalg.norm(images, axis=1, keepdims=True)) @ \
        (classes / np.linalg.norm(classes, axis=1, keepdims=True)).T
    scores = zero_shot_scores(images, classes)
    assert scores.shape == (5, 3)
    np.testing.assert_allclose(scores, expected)


def test_multiclass_metrics_absent_class_nan():
    frame = multiclass_metrics([0, 0, 1, 1], [0, 1, 1, 1], ["a", "b", "c"]).set_index("metric")
    assert frame.loc["accuracy", "value"] == 0.75
    assert frame.loc["macro_f1", "value"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert math.isnan(frame.set_index("class").loc["c", "value"])


def test_multilabel_auc_per_class():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, size=(50, 3))
    scores = labels + rng.normal(size=(50, 3))
    table = multilabel_auc(labels, scores, ["x", "y", "z"]).set_index("class")
    for column, name in enumerate(["x", "y", "z"]):
        assert table.loc[name, "value"] == pytest.approx(roc_auc_score(labels[:, column], scores[:, column]))
    assert table.loc["all", "value"] == pytest.approx(table.loc[["x", "y", "z"], "value"].mean())


def test_multilabel_one_value_class_nan():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 2, size=(30, 2))
    labels[:, 1] = 0
    with pytest.warns(UndefinedMetricWarning, match="'never'"):
        table = multilabel_auc(labels, rng.normal(size=(30, 2)), ["sometimes", "never"]).set_index("class")
    assert math.isnan(table.loc["never", "value"])
    assert table.loc["all", "value"] == table.loc["sometimes", "value"]


def test_multilabel_scores_columns_independently(tmp_path):
    """Rows with both findings must rank high for both classes, which an argmax could not give."""
    axes = np.eye(4)
    vectors = {"A.": axes[0], "no A.": -axes[0], "B.": axes[1], "no B.": -axes[1]}
    labels = np.array([[1, 1], [1, 1], [1, 0], [0, 1], [0, 0], [0, 0]])
    images = labels @ axes[:2] + 0.01  # a pair of findings points between the two axes
    frame = pd.DataFrame({"row": range(6), "text": list("uvwxyz"), "a": labels[:, 0], "b": labels[:, 1]})
    content = {"name": "pair", "tasks": {"labels": {"type": "multilabel", "classes": {
        "a": {"positive": ["A."], "negative": ["no A."]},
        "b": {"positive": ["B."], "negative": ["no B."]}}}}}
    table = zero_shot(Embeddings(images, images, frame), LookupTextModel(vectors),
                      write_prompt_file(tmp_path / "pair.yaml", content)).set_index("class")
    assert table.loc["a", "value"] == 1.0
    assert table.loc["b", "value"] == 1.0
    assert table.loc["a", "metric"] == "auc"


def test_packaged_prompts_load_by_name():
    prompts = load_prompts("phantomcxr")
    assert prompts.task("finding").type == "multiclass"
    assert prompts.task("finding").column == "finding"
    assert prompts.task("labels").type == "multilabel"


def test_invalid_prompt_file_names_key(tmp_path):
    path = write_prompt_file(tmp_path / "bad.yaml", {"tasks": {"finding": {"type": "multiclass", "classes": {
        "a": ["A."], "b": []}}}})
    with pytest.raises(ValueError, match="class 'b'"):
        load_prompts(path)


# ------------------------------------------------------------ linear probe


def probe_data(seed: int = 0, counts=(100, 100, 100, 100, 3)):
    """Gaussian clusters around fixed class centres; ``seed`` draws the samples only."""
    centres = 3 * np.random.default_rng(100).normal(size=(len(counts), 12))
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(count, index) for index, count in enumerate(counts)])
    features = centres[labels] + rng.normal(size=(len(labels), 12))
    return features, labels


def test_one_percent_keeps_every_class():
    _, labels = probe_data()
    subset = stratified_subset(labels, 0.01, seed=0)
    assert set(labels[subset]) == {0, 1, 2, 3, 4}
    assert len(subset) == 5


def test_probe_same_seed_same_numbers():
    features, labels = probe_data()
    test_features, test_labels = probe_data(seed=1)
    first = linear_probe(features, labels, test_features, test_labels, fractions=(0.01, 0.1), seeds=(0, 1))
    second = linear_probe(features, labels, test_features, test_labels, fractions=(0.01, 0.1), seeds=(0, 1))
    pd.testing.assert_frame_equal(first, second)
    pd.testing.assert_frame_equal(first.attrs["runs"], second.attrs["runs"])


def test_stack_results_of_two_probes():
    features, labels = probe_data()
    test_features, test_labels = probe_data(seed=1)
    pretrained = linear_probe(features, labels, test_features, test_labels, fractions=(0.1,), seeds=(0,))
    random = linear_probe(features[:, ::-1].copy(), labels, test_features, test_labels, fractions=(0.1,), seeds=(0,))

    stacked = stack_results({"pretrained": pretrained, "random": random})

    assert stacked.columns[0] == "model"
    assert stacked["model"].tolist() == ["pretrained", "random"]
    assert stacked["auc_mean"].tolist() == [pretrained["auc_mean"].iloc[0], random["auc_mean"].iloc[0]]
    assert "runs" in pretrained.attrs  # the inputs keep their per-run tables


def test_probe_more_labels_not_worse():
    features, labels = probe_data()
    test_features, test_labels = probe_data(seed=1)
    table = linear_probe(features, labels, test_features, test_labels).set_index("fraction")
    assert table.loc[1.0, "auc_mean"] >= table.loc[0.01, "auc_mean"]
    assert table.loc[1.0, "accuracy_mean"] > 0.9
    assert table.loc[1.0, "runs"] == 1
    assert table.loc[0.01, "runs"] == 3


def test_probe_one_class_split_nan():
    rng = np.random.default_rng(7)
    features = rng.normal(size=(80, 6))
    labels = (features[:, 0] > 0).astype(int)
    test_features = rng.normal(size=(20, 6)) + np.array([3, 0, 0, 0, 0, 0])
    with pytest.warns(UndefinedMetricWarning):
        table = linear_probe(features, labels, test_features, np.ones(20, dtype=int), fractions=(1.0,))
    assert math.isnan(table.loc[0, "auc_mean"])
    assert table.loc[0, "accuracy_mean"] == 1.0


def test_probe_multilabel_skips_undefined_class():
    rng = np.random.default_rng(8)
    features = rng.normal(size=(120, 6))
    labels = (features[:, :3] > 0).astype(float)
    test_features = rng.normal(size=(40, 6))
    test_labels = (test_features[:, :3] > 0).astype(float)
    test_labels[:, 2] = 0.0
    with pytest.warns(UndefinedMetricWarning, match="'c'"):
        table = linear_probe(features, labels, test_features, test_labels, fractions=(1.0,),
                             class_names=["a", "b", "c"])
    runs = table.attrs["runs"]
    assert math.isnan(runs.loc[0, "auc_c"])
    assert table.loc[0, "auc_mean"] == pytest.approx((runs.loc[0, "auc_a"] + runs.loc[0, "auc_b"]) / 2)
    assert table.loc[0, "auc_mean"] > 0.8


def test_probe_accepts_float_labels():
    features, labels = probe_data(counts=(60, 60))
    test_features, test_labels = probe_data(seed=1, counts=(30, 30))
    table = linear_probe(features, labels.astype(float), test_features, test_labels.astype(float),
                         fractions=(0.1, 1.0))
    assert table["auc_mean"].between(0.0, 1.0).all()
    assert table.attrs["runs"].filter(like="auc_").columns.tolist() == ["auc_0", "auc_1"]


def test_probe_rejects_uncertain_multilabel():
    features = np.random.default_rng(9).normal(size=(10, 4))
    labels = np.zeros((10, 2))
    labels[0, 0] = -1
    with pytest.raises(ValueError, match="only 0/1"):
        linear_probe(features, labels, features, np.zeros((10, 2)))


# ------------------------------------------------------------ embed cache


@pytest.fixture
def tiny_model(tiny_manifest):
    texts = pd.read_csv(tiny_manifest)["text"].tolist()
    return build_model(get_preset("smoke"), tokenizer_texts=texts)


def count_image_calls(model, monkeypatch) -> list[int]:
    calls: list[int] = []
    original = model.encode_image

    def counting(pixel_values):
        calls.append(len(pixel_values))
        return original(pixel_values)

    monkeypatch.setattr(model, "encode_image", counting)
    return calls


def test_embed_returns_rows_in_order(tiny_model, tiny_manifest):
    dataset = ImageTextDataset.for_model(tiny_manifest, tiny_model, split="test")
    embeddings = embed(tiny_model, dataset, batch_size=3, progress=False)
    assert embeddings.image.shape == (8, 32)
    assert embeddings.text.shape == (8, 32)
    assert embeddings.frame["row"].tolist() == dataset.frame["row"].tolist()
    np.testing.assert_allclose(np.linalg.norm(embeddings.image, axis=1), 1.0, rtol=1e-5)


def test_embed_cache_skips_model(tiny_model, tiny_manifest, tmp_path, monkeypatch):
    calls = count_image_calls(tiny_model, monkeypatch)
    dataset = ImageTextDataset.for_model(tiny_manifest, tiny_model, split="test")
    first = embed(tiny_model, dataset, cache_dir=tmp_path / "cache", progress=False)
    calls_after_first = len(calls)
    second = embed(tiny_model, dataset, cache_dir=tmp_path / "cache", progress=False)
    assert calls_after_first > 0
    assert len(calls) == calls_after_first
    np.testing.assert_array_equal(first.image, second.image)
    pd.testing.assert_frame_equal(first.frame, second.frame)


def test_changed_manifest_misses_cache(tiny_model, tiny_manifest, tmp_path, monkeypatch):
    calls = count_image_calls(tiny_model, monkeypatch)
    dataset = ImageTextDataset.for_model(tiny_manifest, tiny_model, split="test")
    embed(tiny_model, dataset, cache_dir=tmp_path / "cache", progress=False)
    calls_after_first = len(calls)

    frame = pd.read_csv(tiny_manifest)
    frame.loc[0, "text"] = "FINDINGS: a changed report. IMPRESSION: changed."
    frame.to_csv(tiny_manifest, index=False)
    changed = ImageTextDataset.for_model(tiny_manifest, tiny_model, split="test")
    embed(tiny_model, changed, cache_dir=tmp_path / "cache", progress=False)
    assert len(calls) > calls_after_first


def test_changed_weights_miss_cache(tiny_model, tiny_manifest, tmp_path, monkeypatch):
    calls = count_image_calls(tiny_model, monkeypatch)
    dataset = ImageTextDataset.for_model(tiny_manifest, tiny_model, split="test")
    before = embed(tiny_model, dataset, cache_dir=tmp_path / "cache", progress=False)
    calls_after_first = len(calls)
    with torch.no_grad():
        tiny_model.image_projection.weight.mul_(-1.0)
    after = embed(tiny_model, dataset, cache_dir=tmp_path / "cache", progress=False)
    assert len(calls) > calls_after_first
    assert not np.allclose(before.image, after.image)


# -------------------------------------------------------------- end to end
# The tiny test split (8 pairs) lacks some classes and is smaller than K=10, so the
# warnings about undefined AUCs and skipped cut-offs are expected there.
EXPECTED_WARNINGS = (UndefinedMetricWarning, UserWarning)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """A tiny manifest, a two-step smoke checkpoint trained on it, and a prompt file for its words."""
    folder = tmp_path_factory.mktemp("smoke_run")
    manifest = write_tiny_manifest(folder / "tiny")
    history = train(get_preset("smoke", manifest=str(manifest), output_dir=str(folder / "run"), max_steps=2),
                    progress=False)
    prompts = write_prompt_file(folder / "tiny.yaml", TINY_PROMPTS)
    return manifest, history.checkpoint, prompts


@pytest.fixture(scope="module")
def smoke_report(smoke_run, tmp_path_factory):
    """The evaluation of the smoke checkpoint beside a random baseline: (output folder, tables)."""
    manifest, checkpoint, prompts = smoke_run
    out = tmp_path_factory.mktemp("smoke_report") / "evaluation"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EXPECTED_WARNINGS)
        tables = evaluate_checkpoint(checkpoint, manifest, out_dir=out, prompts=prompts, projection="pca",
                                     fractions=(0.1, 1.0), seeds=(0,), progress=False)
    return out, tables


EXPECTED_REPORT_FILES = ("zero_shot.csv", "linear_probe.csv", "retrieval.csv", "summary.md", "confusion_finding.png",
                         "embeddings_trained.png", "embeddings_random.png", "similarity.png", "probe_finding.png")


@pytest.mark.parametrize("name", EXPECTED_REPORT_FILES)
def test_evaluate_checkpoint_writes_file(smoke_report, name):
    out, _ = smoke_report
    assert (out / name).is_file()


def test_evaluate_checkpoint_adds_random_baseline(smoke_report):
    _, tables = smoke_report
    for name, table in tables.items():
        assert set(table["model"]) == {"trained", "random"}, name


def test_evaluate_checkpoint_metrics_in_range(smoke_report):
    _, tables = smoke_report
    assert tables["zero_shot"]["value"].dropna().between(0.0, 1.0).all()
    assert tables["linear_probe"]["auc_mean"].between(0.0, 1.0).all()
    assert tables["retrieval"][["recall", "precision"]].stack().between(0.0, 1.0).all()


def test_summary_links_tables_and_figures(smoke_report):
    out, _ = smoke_report
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "## Zero-shot classification" in summary
    assert "## Linear probe" in summary
    assert "## Retrieval" in summary
    assert "(similarity.png)" in summary


def summary_with_prompts(folder: Path, prompts: str) -> str:
    """The summary of a report with no tables and no figures, only the run's settings."""
    inputs = ReportInputs(checkpoint="run/checkpoint.pt", manifest="data/manifest.csv", split="test", test_pairs=8,
                          probe_split=None, probe_pairs=0, prompts=prompts, models={"trained": "a checkpoint"})
    return write_report(folder, {}, inputs).read_text(encoding="utf-8")


def test_summary_names_packaged_prompts(tmp_path):
    summary = summary_with_prompts(tmp_path, str(PROMPT_DIR / "phantomcxr.yaml"))

    assert "- prompts: `phantomcxr`" in summary
    assert str(PROMPT_DIR) not in summary


def test_summary_keeps_prompt_path(tmp_path):
    summary = summary_with_prompts(tmp_path, "prompts/tiny.yaml")

    assert "- prompts: `prompts/tiny.yaml`" in summary


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_evaluate_command_prints_tables(smoke_run, tmp_path, capsys):
    manifest, checkpoint, prompts = smoke_run
    parser = add_evaluate_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--checkpoint", str(checkpoint), "--manifest", str(manifest), "--out",
                              str(tmp_path / "out"), "--prompts", str(prompts), "--baseline", "none",
                              "--projection", "pca", "--fractions", "1.0", "--seeds", "0", "--no-progress"])
    assert run_evaluate(args) == 0
    printed = capsys.readouterr().out
    assert "retrieval:" in printed
    assert "summary.md" in printed
    assert (tmp_path / "out" / "cache").is_dir()
    assert set(pd.read_csv(tmp_path / "out" / "retrieval.csv")["model"]) == {"trained"}


# --------------------------------------------------------------- real data


def test_real_notes_metrics_in_range(tmp_path):
    """Zero-shot on the ``finding`` column and note retrieval on the 44 real radiographs.

    All rows are evaluated (not one split), so every finding has examples.
    """
    source = requires_shared_data("cxr-notes-44")
    from data_prep.folder_csv import build_manifest

    manifest = tmp_path / "notes" / "manifest.csv"
    built = build_manifest(source, manifest, text_columns=["clinical_notes"], patient_column="patient_id",
                           multilabel_column="finding")
    history = train(get_preset("smoke", manifest=str(manifest), output_dir=str(tmp_path / "run"), max_steps=2),
                    progress=False)
    model = load_model(history.checkpoint)
    embeddings = embed(model, ImageTextDataset.for_model(manifest, model), progress=False)

    findings = sorted(set(built["finding"]))
    one_hot = [column for column in built.columns if column not in
               ("image_path", "text", "split", "study_id", "patient_id", "finding", "source_path")]
    prompts = write_prompt_file(tmp_path / "notes.yaml", {"name": "notes", "tasks": {
        "finding": {"type": "multiclass", "column": "finding",
                    "classes": {name: [f"Chest radiograph showing {name}."] for name in findings}},
        "labels": {"type": "multilabel", "classes": {
            name: {"positive": [f"Findings of {name}."], "negative": [f"No sign of {name}."]} for name in one_hot}},
    }})

    multiclass = zero_shot(embeddings, model, prompts, task="finding")
    multilabel = zero_shot(embeddings, model, prompts, task="labels")
    ranked = retrieval(embeddings.image, embeddings.text, texts=embeddings.texts)

    assert len(embeddings) == len(built)
    assert multiclass["value"].between(0.0, 1.0).all()
    assert multilabel["value"].between(0.0, 1.0).all()
    assert ranked[["recall", "precision"]].stack().between(0.0, 1.0).all()
    assert ranked.groupby("direction")["recall"].is_monotonic_increasing.all()
