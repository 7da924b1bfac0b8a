"""The three negatives modes of one optimizer step, on a tiny float64 dual encoder."""

import pytest
import torch

from msd_core.config import get_preset
from msd_core.losses import clip_loss
from msd_core.model import build_model
from msd_core.momentum import FeatureQueue, MomentumTeacher
from msd_core.step import accumulate_gradients

REPORTS = ["heart is enlarged", "no pleural effusion", "small left pneumothorax", "lungs are clear",
           "right lower lobe consolidation", "support device in place", "nodule in the left upper lobe"]


def tiny_model(dropout=0.0, seed=0):
    """A smoke-sized ViT + BERT in float64, with the given dropout probability."""
    torch.manual_seed(seed)
    vit = dict(patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    bert = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    config = get_preset("smoke", image_model_kwargs=vit, text_model_kwargs=bert, vocab_size=120, embed_dim=8,
                        image_size=16)
    model = build_model(config, tokenizer_texts=REPORTS * 4).double()
    model.train()
    return model


def make_batch(model, size, seed):
    generator = torch.Generator().manual_seed(seed)
    texts = [REPORTS[int(i)] + f" case {int(i * 7 + seed)}" for i in torch.randint(0, len(REPORTS), (size,),
                                                                                  generator=generator)]
    tokens = model.tokenize(texts)
    return {
        "pixel_values": torch.randn(size, 1, 16, 16, generator=generator, dtype=torch.float64),
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "study_index": torch.arange(seed * 1000, seed * 1000 + size),
    }


def split_batch(batch, parts):
    size = batch["study_index"].shape[0] // parts
    return [{key: value[i * size:(i + 1) * size] for key, value in batch.items()} for i in range(parts)]


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_every_mode_is_clip_when_plain():
    model = tiny_model()
    batch = make_batch(model, 3, seed=1)
    with torch.no_grad():
        images, texts = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        expected = clip_loss(images, texts, model.scale()).item()

    for mode in ("momentum", "gradcache", "local"):
        teacher = MomentumTeacher(model, momentum=0.99)
        output = accumulate_gradients(model, teacher, [batch], negatives=mode, alpha=0.0)
        model.zero_grad()
        assert output.loss == pytest.approx(expected, abs=1e-10), mode


def test_gradcache_equals_full_batch_without_dropout():
    model = tiny_model(dropout=0.0)
    batch = make_batch(model, 32, seed=2)

    images, texts = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    clip_loss(images, texts, model.scale()).backward()
    expected = gradients(model)
    model.zero_grad()

    accumulate_gradients(model, None, split_batch(batch, 4), negatives="gradcache", alpha=0.0)
    actual = gradients(model)

    assert set(actual) == set(expected)
    for name in expected:
        assert torch.allclose(actual[name], expected[name], atol=1e-6, rtol=0), name
    assert "logit_scale" in actual


def test_gradcache_replays_dropout_masks():
    model = tiny_model(dropout=0.3)
    micro_batches = split_batch(make_batch(model, 32, seed=3), 4)

    # The reference keeps all four graphs alive and takes the loss over all 32 pairs at
    # once, drawing dropout masks in the same order as gradcache's first pass.
    torch.manual_seed(123)
    outputs = [model(b["pixel_values"], b["input_ids"], b["attention_mask"]) for b in micro_batches]
    images = torch.cat([image for image, _ in outputs])
    texts = torch.cat([text for _, text in outputs])
    clip_loss(images, texts, model.scale()).backward()
    expected = gradients(model)
    model.zero_grad()

    torch.manual_seed(123)
    accumulate_gradients(model, None, micro_batches, negatives="gradcache", alpha=0.0)
    actual = gradients(model)

    for name in expected:
        assert torch.allclose(actual[name], expected[name], atol=1e-6, rtol=0), name
    assert torch.allclose(actual["logit_scale"], expected["logit_scale"], atol=1e-6, rtol=0)


def test_local_differs_from_full_batch():
    model = tiny_model()
    batch = make_batch(model, 32, seed=4)
    images, texts = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    clip_loss(images, texts, model.scale()).backward()
    expected = gradients(model)
    model.zero_grad()

    accumulate_gradients(model, None, split_batch(batch, 4), negatives="local", alpha=0.0)
    actual = gradients(model)

    difference = max((actual[n] - expected[n]).abs().max().item() for n in expected)
    scale = max(expected[n].abs().max().item() for n in expected)
    assert difference > 0.05 * scale


def test_local_rejects_micro_batch_of_one():
    with pytest.raises(ValueError, match="micro_batch_size=1 with negatives='local'.*contrasted against itself"):
        get_preset("smoke", negatives="local", micro_batch_size=1)


def test_momentum_uses_whole_effective_batch():
    model = tiny_model()
    batch = make_batch(model, 8, seed=5)
    teacher = MomentumTeacher(model, momentum=0.99)

    # With the teacher equal to the student, momentum mode over 2 micro-batches scores each
    # query against all 8 keys, so its loss equals plain CLIP over the 8 pairs.
    output = accumulate_gradients(model, teacher, split_batch(batch, 2), negatives="momentum", alpha=0.0)
    with torch.no_grad():
        images, texts = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    assert output.loss == pytest.approx(clip_loss(images, texts, model.scale()).item(), abs=1e-10)


def test_queue_masks_own_samples():
    model = tiny_model()
    batch = make_batch(model, 4, seed=6)
    teacher = MomentumTeacher(model, momentum=0.99)
    with torch.no_grad():
        images, texts = teacher(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    image_queue, text_queue = FeatureQueue(64, 8).double(), FeatureQueue(64, 8).double()
    for _ in range(16):  # a tiny dataset met again and again: the queue holds only copies of it
        image_queue.enqueue(images, batch["study_index"])
        text_queue.enqueue(texts, batch["study_index"])

    with_queue = accumulate_gradients(model, teacher, [batch], negatives="momentum", alpha=0.0,
                                      image_queue=image_queue, text_queue=text_queue)
    model.zero_grad()
    without_queue = accumulate_gradients(model, teacher, [batch], negatives="momentum", alpha=0.0)

    # Queue copies of the other three pairs stay negatives; copies of the query's own pair are masked.
    logits = model.scale().item() * images @ texts.T
    repeats = torch.full((4, 4), 17.0, dtype=torch.float64)
    repeats.fill_diagonal_(1.0)
    denominators = (logits.exp() * repeats).sum(-1)
    expected_i2t = (-logits.diag() + denominators.log()).mean()
    denominators_t2i = (logits.T.exp() * repeats).sum(-1)
    expected_t2i = (-logits.diag() + denominators_t2i.log()).mean()
    assert with_queue.loss == pytest.approx(((expected_i2t + expected_t2i) / 2).item(), abs=1e-9)
    assert with_queue.loss > without_queue.loss
