"""One MSD optimizer step's worth of gradients, in the three ``negatives`` modes.

``accumulate_gradients`` receives the k micro-batches of one optimizer step and leaves
the gradients of their loss in the student's ``.grad`` fields. It does not step the
optimizer or update the teacher: the training loop does that once per optimizer step.

Modes (b pairs per micro-batch, B = k * b per step, Q queue entries):

- ``momentum``: the teacher embeds all B pairs first (no gradients, one micro-batch at a
  time). Each micro-batch's student queries are then scored against the teacher's B
  keys plus the queue, so every query sees B + Q - 1 negatives while only one
  micro-batch of activations is alive. Gradients reach the query side only.
- ``gradcache``: the exact gradient of a contrastive loss over all B pairs with student
  features on both sides. Pass 1 embeds every micro-batch without gradients; the loss
  over the B x B similarities is backpropagated to those embeddings; pass 2 re-embeds
  each micro-batch with gradients, with the random state of pass 1 restored so that
  dropout draws the same masks, and backpropagates the cached embedding gradients.
  The teacher provides only the soft targets.
- ``local``: naive accumulation. Each micro-batch is a CLIP batch of its own b pairs.
  Kept as the baseline that shows why accumulation alone does not enlarge the negatives.

Batches are dicts with ``pixel_values`` (b, C, H, W), ``input_ids`` and
``attention_mask`` (b, L), and ``study_index`` (b,): keys with the same study index as
a query (other than its own positive) are masked out, so two images of one study never
act as each other's negatives.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch

from .losses import LossParts, msd_loss, similarity_logits, upcast
from .model import DualEncoder
from .momentum import FeatureQueue, MomentumTeacher

Batch = dict[str, torch.Tensor]


@dataclass
class StepOutput:
    """Loss values of one optimizer step and the teacher features to enqueue."""

    loss: float
    image_to_text: float
    text_to_image: float
    teacher_image: torch.Tensor | None  # (B, D), None when the teacher was not run
    teacher_text: torch.Tensor | None  # (B, D)
    ids: torch.Tensor  # (B,) study indices of the B pairs


class RandomState:
    """The CPU and CUDA generator states, captured so a forward pass can be replayed."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        """Put the generators back to the captured state."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def accumulate_gradients(
    student: DualEncoder,
    teacher: MomentumTeacher | None,
    micro_batches: Sequence[Batch],
    *,
    negatives: str,
    alpha: float,
    image_queue: FeatureQueue | None = None,
    text_queue: FeatureQueue | None = None,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    scale_loss: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
) -> StepOutput:
    """Backpropagate the loss of one optimizer step's micro-batches into the student.

    Args:
        student: the model being trained (in train mode).
        teacher: the EMA teacher; needed when alpha > 0 or a queue is used.
        micro_batches: the k micro-batches, already on the student's device.
        negatives: ``"momentum"``, ``"gradcache"`` or ``"local"``.
        alpha: distillation weight for this step (after the ramp).
        image_queue, text_queue: optional queues of earlier teacher features.
        autocast: returns the autocast context for forward passes.
        scale_loss: the gradient scaler's ``scale`` under fp16, else identity.

    Returns:
        A ``StepOutput``. The caller enqueues its teacher features after the optimizer step.
    """
    if (alpha > 0 or image_queue is not None) and teacher is None:
        raise ValueError("alpha > 0 and the queue both need a teacher")
    ids = torch.cat([batch["study_index"] for batch in micro_batches])  # (B,)
    needs_teacher = teacher is not None and (alpha > 0 or image_queue is not None or negatives == "momentum")

    teacher_image = teacher_text = None
    if needs_teacher:
        teacher_image, teacher_text = _embed_all(teacher, micro_batches, autocast)  # (B, D) each

    if negatives == "momentum":
        parts = _momentum_pass(student, micro_batches, teacher_image, teacher_text, ids, alpha,
                               image_queue, text_queue, autocast, scale_loss)
    elif negatives == "gradcache":
        parts = _gradcache_pass(student, micro_batches, teacher_image, teacher_text, ids, alpha,
                                image_queue, text_queue, autocast, scale_loss)
    elif negatives == "local":
        parts = _local_pass(student, micro_batches, teacher_image, teacher_text, alpha, autocast, scale_loss)
    else:
        raise ValueError(f"invalid negatives={negatives!r}: must be 'momentum', 'gradcache' or 'local'")

    return StepOutput(parts.total.item(), parts.image_to_text.item(), parts.text_to_image.item(),
                      teacher_image, teacher_text, ids)


def _embed_all(model, micro_batches: Sequence[Batch], autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every micro-batch without gradients; returns (B, D) image and text features, at least float32."""
    images, texts = [], []
    with torch.no_grad():
        for batch in micro_batches:
            with autocast():
                image, text = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
            images.append(upcast(image))
            texts.append(upcast(text))
    return torch.cat(images), torch.cat(texts)


def _keys_with_queue(batch_keys: torch.Tensor, batch_ids: torch.Tensor,
                     queue: FeatureQueue | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the queue's filled slots to the batch keys: (B + M, D) keys and (B + M,) ids."""
    if queue is None:
        return batch_keys, batch_ids
    queued, queued_ids = queue.valid()
    return torch.cat([batch_keys, queued.to(batch_keys.dtype)]), torch.cat([batch_ids, queued_ids])


def same_study_mask(query_ids: torch.Tensor, key_ids: torch.Tensor, positive_index: torch.Tensor) -> torch.Tensor:
    """(N, K) bool mask of keys sharing a query's study id, the query's own positive excepted."""
    mask = query_ids[:, None] == key_ids[None, :]  # (N, K)
    mask[torch.arange(len(query_ids), device=mask.device), positive_index] = False
    return mask


def _teacher_logits(alpha, teacher_image, teacher_text, image_keys, text_keys, logit_scale, mask):
    """Teacher logits of both directions, or (None, None) when alpha is 0."""
    if alpha == 0:
        return None, None
    scale = logit_scale.detach()
    return (similarity_logits(teacher_image, text_keys, scale, mask),
            similarity_logits(teacher_text, image_keys, scale, mask))


def _momentum_pass(student, micro_batches, teacher_image, teacher_text, ids, alpha,
                   image_queue, text_queue, autocast, scale_loss) -> LossParts:
    image_keys, key_ids = _keys_with_queue(teacher_image, ids, image_queue)  # (K, D), (K,)
    text_keys, _ = _keys_with_queue(teacher_text, ids, text_queue)  # (K, D)
    total = ids.shape[0]

    summed = None
    offset = 0
    for batch in micro_batches:
        size = batch["study_index"].shape[0]
        rows = torch.arange(offset, offset + size, device=ids.device)  # (b,) this micro-batch's columns
        offset += size

        with autocast():
            image, text = student(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        logit_scale = student.scale()
        mask = same_study_mask(ids[rows], key_ids, rows)
        teacher_i2t, teacher_t2i = _teacher_logits(alpha, teacher_image[rows], teacher_text[rows],
                                                   image_keys, text_keys, logit_scale, mask)
        parts = msd_loss(image, text, image_keys, text_keys, logit_scale, rows, alpha=alpha,
                         teacher_image_to_text=teacher_i2t, teacher_text_to_image=teacher_t2i, key_mask=mask)

        # Weight by this micro-batch's share of the step, so the sum is the mean over B pairs.
        share = size / total
        scale_loss(parts.total * share).backward()
        summed = _add_parts(summed, parts, share)
    return summed


def _gradcache_pass(student, micro_batches, teacher_image, teacher_text, ids, alpha,
                    image_queue, text_queue, autocast, scale_loss) -> LossParts:
    device = ids.device

    # Pass 1: embed everything without gradients, remembering each micro-batch's random
    # state. Buffers (batch-norm statistics) are restored afterwards so that only pass 2
    # updates them, once, as a plain forward would.
    saved_buffers = [buffer.clone() for buffer in student.buffers()]
    states = []
    images, texts = [], []
    with torch.no_grad():
        for batch in micro_batches:
            states.append(RandomState(device))
            with autocast():
                image, text = student(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
            images.append(upcast(image))
            texts.append(upcast(text))
    for buffer, saved in zip(student.buffers(), saved_buffers):
        buffer.copy_(saved)

    # The loss over all B pairs, differentiated with respect to the cached embeddings.
    all_images = torch.cat(images).requires_grad_()  # (B, D)
    all_texts = torch.cat(texts).requires_grad_()  # (B, D)
    image_keys, key_ids = _keys_with_queue(all_images, ids, image_queue)  # (K, D)
    text_keys, _ = _keys_with_queue(all_texts, ids, text_queue)
    rows = torch.arange(ids.shape[0], device=device)
    mask = same_study_mask(ids, key_ids, rows)
    logit_scale = student.scale()

    teacher_i2t = teacher_t2i = None
    if alpha > 0:
        teacher_image_keys, _ = _keys_with_queue(teacher_image, ids, image_queue)
        teacher_text_keys, _ = _keys_with_queue(teacher_text, ids, text_queue)
        teacher_i2t, teacher_t2i = _teacher_logits(alpha, teacher_image, teacher_text, teacher_image_keys,
                                                   teacher_text_keys, logit_scale, mask)
    parts = msd_loss(all_images, all_texts, image_keys, text_keys, logit_scale, rows, alpha=alpha,
                     teacher_image_to_text=teacher_i2t, teacher_text_to_image=teacher_t2i, key_mask=mask)
    scale_loss(parts.total).backward()  # fills all_images.grad, all_texts.grad and logit_scale.grad

    # Pass 2: replay each micro-batch with gradients and push the cached gradients through.
    offset = 0
    for batch, state in zip(micro_batches, states):
        size = batch["study_index"].shape[0]
        state.restore()
        with autocast():
            image, text = student(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        image_grad = all_images.grad[offset:offset + size].to(image.dtype)
        text_grad = all_texts.grad[offset:offset + size].to(text.dtype)
        torch.autograd.backward([image, text], [image_grad, text_grad])
        offset += size
    return LossParts(parts.total.detach(), parts.image_to_text.detach(), parts.text_to_image.detach())


def _local_pass(student, micro_batches, teacher_image, teacher_text, alpha, autocast, scale_loss) -> LossParts:
    total = sum(batch["study_index"].shape[0] for batch in micro_batches)
    summed = None
    offset = 0
    for batch in micro_batches:
        size = batch["study_index"].shape[0]
        batch_ids = batch["study_index"]
        rows = torch.arange(size, device=batch_ids.device)
        with autocast():
            image, text = student(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        logit_scale = student.scale()
        mask = same_study_mask(batch_ids, batch_ids, rows)
        teacher_i2t = teacher_t2i = None
        if alpha > 0:
            local_image = teacher_image[offset:offset + size]
            local_text = teacher_text[offset:offset + size]
            teacher_i2t, teacher_t2i = _teacher_logits(alpha, local_image, local_text, local_image, local_text,
                                                       logit_scale, mask)
        offset += size

        parts = msd_loss(image, text, image, text, logit_scale, rows, alpha=alpha,
                         teacher_image_to_text=teacher_i2t, teacher_text_to_image=teacher_t2i, key_mask=mask)
        share = size / total
        scale_loss(parts.total * share).backward()
        summed = _add_parts(summed, parts, share)
    return summed


def _add_parts(summed: LossParts | None, parts: LossParts, share: float) -> LossParts:
    weighted = LossParts(*(value.detach() * share for value in parts))
    if summed is None:
        return weighted
    return LossParts(*(a + b for a, b in zip(summed, weighted)))
