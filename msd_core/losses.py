"""Contrastive losses: plain symmetric CLIP, soft targets, and the MSD loss.

Notation: N queries (the rows of a micro-batch, or of the whole effective batch), K keys
(the candidates each query is compared with), D embedding dimensions. All features are
L2-normalised, so a dot product is a cosine similarity. ``logit_scale`` is always the
already exponentiated scale 1 / tau, a scalar tensor.

Losses are computed in at least float32 even under autocast, because the logits of a
large batch at a small temperature overflow float16 (float64 inputs stay float64).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn import functional as F

# Logit given to masked keys: small enough that softmax gives them exactly zero weight,
# finite so that 0 * log-probability stays 0 instead of NaN.
MASKED_LOGIT = -1e9


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """Return ``tensor`` in float32 if it is float16 or bfloat16, unchanged otherwise."""
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.float()
    return tensor


class LossParts(NamedTuple):
    """The loss and its two directions, each a scalar tensor."""

    total: torch.Tensor
    image_to_text: torch.Tensor
    text_to_image: torch.Tensor


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE loss of CLIP over N matching pairs.

    Args:
        image_features: (N, D) normalised image embeddings.
        text_features: (N, D) normalised text embeddings; row i matches image row i.
        logit_scale: scalar 1 / tau.

    Returns:
        Scalar: the mean of the image-to-text and text-to-image cross-entropies.
    """
    labels = torch.arange(image_features.shape[0], device=image_features.device)  # (N,)
    logits = logit_scale * upcast(image_features) @ upcast(text_features).T  # (N, N)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def similarity_logits(queries: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor,
                      key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled similarities of queries against keys (at least float32), masked keys set to ``MASKED_LOGIT``.

    Args:
        queries: (N, D).
        keys: (K, D).
        logit_scale: scalar 1 / tau.
        key_mask: optional (N, K) bool, True where a key must not count as a negative.

    Returns:
        (N, K) logits.
    """
    logits = logit_scale * upcast(queries) @ upcast(keys).T  # (N, K)
    if key_mask is not None:
        logits = logits.masked_fill(key_mask, MASKED_LOGIT)
    return logits


def soft_targets(teacher_logits: torch.Tensor, alpha: float, positive_index: torch.Tensor) -> torch.Tensor:
    """Mix the teacher's distribution with one-hot targets.

    Args:
        teacher_logits: (N, K) teacher logits for the same queries and keys as the student.
        alpha: weight of the teacher distribution, in [0, 1].
        positive_index: (N,) column of each query's own positive key.

    Returns:
        (N, K) targets = alpha * softmax(teacher_logits) + (1 - alpha) * one_hot; rows sum to 1.
    """
    teacher_logits = upcast(teacher_logits)
    one_hot = F.one_hot(positive_index, teacher_logits.shape[1]).to(teacher_logits.dtype)  # (N, K)
    if alpha == 0:
        return one_hot
    teacher = teacher_logits.softmax(dim=-1)  # (N, K)
    return alpha * teacher + (1.0 - alpha) * one_hot


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum(targets * log_softmax(logits)); (N, K) inputs, scalar output."""
    return -(targets * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def msd_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    image_keys: torch.Tensor,
    text_keys: torch.Tensor,
    logit_scale: torch.Tensor,
    positive_index: torch.Tensor,
    *,
    alpha: float = 0.0,
    teacher_image_to_text: torch.Tensor | None = None,
    teacher_text_to_image: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
) -> LossParts:
    """The MSD loss of N student queries against K keys, in both directions.

    Image-to-text: each student image embedding is scored against ``text_keys``;
    text-to-image: each student text embedding against ``image_keys``. Targets are the
    teacher's distribution over the same keys mixed with one-hot by ``alpha``.

    Args:
        image_features, text_features: (N, D) student embeddings of N pairs.
        image_keys, text_keys: (K, D) keys: the teacher's (``momentum``) or the student's
            (``gradcache``, ``local``) embeddings of the effective batch, then the queue.
        logit_scale: scalar 1 / tau.
        positive_index: (N,) column of each pair's own key.
        alpha: distillation weight in [0, 1]; 0 gives one-hot targets.
        teacher_image_to_text, teacher_text_to_image: (N, K) teacher logits, needed when
            alpha > 0. Masked entries must already be set to ``MASKED_LOGIT``.
        key_mask: (N, K) bool, True for keys that are not negatives of the query (the
            same sample or study met again); the positive column must be False.

    Returns:
        ``LossParts`` with the mean of the two directions as ``total``.
    """
    if alpha > 0 and (teacher_image_to_text is None or teacher_text_to_image is None):
        raise ValueError(f"alpha={alpha} needs the teacher logits of both directions")

    image_to_text = similarity_logits(image_features, text_keys, logit_scale, key_mask)  # (N, K)
    text_to_image = similarity_logits(text_features, image_keys, logit_scale, key_mask)  # (N, K)

    targets_i2t = soft_targets(teacher_image_to_text if alpha > 0 else image_to_text.detach(), alpha, positive_index)
    targets_t2i = soft_targets(teacher_text_to_image if alpha > 0 else text_to_image.detach(), alpha, positive_index)

    loss_i2t = soft_cross_entropy(image_to_text, targets_i2t)
    loss_t2i = soft_cross_entropy(text_to_image, targets_t2i)
    return LossParts((loss_i2t + loss_t2i) / 2, loss_i2t, loss_t2i)
