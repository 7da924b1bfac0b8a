"""The contrastive losses against hand computations."""

import math

import pytest
import torch
from torch.nn import functional as F

from msd_core.losses import MASKED_LOGIT, clip_loss, msd_loss, soft_targets


def hand_clip_loss(similarity, scale):
    """Symmetric CLIP loss written out with explicit sums over a small similarity matrix."""
    n = len(similarity)
    image_to_text = 0.0
    text_to_image = 0.0
    for i in range(n):
        row = [scale * similarity[i][j] for j in range(n)]
        column = [scale * similarity[j][i] for j in range(n)]
        image_to_text += -row[i] + math.log(sum(math.exp(v) for v in row))
        text_to_image += -column[i] + math.log(sum(math.exp(v) for v in column))
    return (image_to_text / n + text_to_image / n) / 2


def three_pairs():
    images = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8]]), dim=-1)
    texts = F.normalize(torch.tensor([[0.8, 0.6, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    return images, texts


def test_clip_loss_matches_hand_computation():
    images, texts = three_pairs()
    scale = torch.tensor(2.0)
    similarity = (images @ texts.T).tolist()

    expected = hand_clip_loss(similarity, 2.0)

    assert clip_loss(images, texts, scale).item() == pytest.approx(expected, abs=1e-6)


def test_msd_loss_alpha_zero_is_clip():
    images, texts = three_pairs()
    scale = torch.tensor(3.0)

    parts = msd_loss(images, texts, images, texts, scale, torch.arange(3))

    assert parts.total.item() == pytest.approx(clip_loss(images, texts, scale).item(), abs=1e-6)


def test_alpha_one_uses_teacher_distribution():
    images, texts = three_pairs()
    scale = torch.tensor(2.0)
    teacher_i2t = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 1.0, 3.0]])
    teacher_t2i = teacher_i2t.T.contiguous()

    parts = msd_loss(images, texts, images, texts, scale, torch.arange(3), alpha=1.0,
                     teacher_image_to_text=teacher_i2t, teacher_text_to_image=teacher_t2i)

    logits = scale * images @ texts.T
    expected_i2t = -(teacher_i2t.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
    expected_t2i = -(teacher_t2i.softmax(-1) * logits.T.log_softmax(-1)).sum(-1).mean()
    assert parts.image_to_text.item() == pytest.approx(expected_i2t.item(), abs=1e-6)
    assert parts.text_to_image.item() == pytest.approx(expected_t2i.item(), abs=1e-6)


def test_alpha_zero_uses_one_hot():
    images, texts = three_pairs()
    scale = torch.tensor(2.0)
    teacher = torch.randn(3, 3)

    with_teacher = msd_loss(images, texts, images, texts, scale, torch.arange(3), alpha=0.0,
                            teacher_image_to_text=teacher, teacher_text_to_image=teacher)

    logits = scale * images @ texts.T
    expected = F.cross_entropy(logits, torch.arange(3))
    assert with_teacher.image_to_text.item() == pytest.approx(expected.item(), abs=1e-6)


def test_soft_targets_mix_and_sum_to_one():
    teacher = torch.tensor([[0.0, 0.0], [1.0, 3.0]])

    targets = soft_targets(teacher, 0.5, torch.tensor([0, 1]))

    assert torch.allclose(targets.sum(-1), torch.ones(2))
    assert targets[0].tolist() == pytest.approx([0.75, 0.25])
    assert targets[1, 1].item() == pytest.approx(0.5 * teacher[1].softmax(-1)[1].item() + 0.5)


def test_masked_keys_do_not_count():
    images, texts = three_pairs()
    scale = torch.tensor(2.0)
    keys = torch.cat([texts, texts[:1]])  # a duplicate of pair 0's text as a fourth key
    image_keys = torch.cat([images, images[:1]])
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 3] = True  # the duplicate is pair 0's own sample
    mask[1:, 3] = True  # and is masked for the others too, to compare against the plain loss

    parts = msd_loss(images, texts, image_keys, keys, scale, torch.arange(3), key_mask=mask)

    assert parts.total.item() == pytest.approx(clip_loss(images, texts, scale).item(), abs=1e-6)
    assert MASKED_LOGIT < -1e6
