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

With several processes (a ``DistributedContext`` of W ranks, each holding k
micro-batches), the global batch is the W * B pairs of all ranks, in rank order:

- ``momentum``: the teacher features and study ids of all ranks are gathered, so each
  local query sees W * B + Q - 1 negatives.
- ``gradcache``: the pass-1 student embeddings are gathered too. Every rank computes the
  loss over the whole global batch (the same value on every rank) and keeps the
  embedding gradients of its own rows only; multiplied by W, they give after the
  all-reduce mean of ``DistributedContext.average_gradients`` exactly the gradient of
  one process holding all W * B pairs.
- ``local``: nothing is gathered; each micro-batch of each rank stays its own CLIP batch.
  W ranks with k micro-batches of b pairs train like one process with W * k
  micro-batches of b pairs.

Each micro-batch's loss is weighted by its share of the global batch times W, so the
mean over ranks of the accumulated gradients is the gradient of the global-batch loss.
The returned loss values are averaged over the ranks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch

from .distributed import DistributedContext
from .losses import LossParts, msd_loss, similarity_logits, upcast
from .model import DualEncoder
from .momentum import FeatureQueue, MomentumTeacher

Batch = dict[str, torch.Tensor]


@dataclass
class StepOutput:
    """Loss values of one optimizer step and the teacher features to enqueue."""

    loss: float  # averaged over the ranks when there are several
    image_to_text: float
    text_to_image: float
    # The global batch's rows (all ranks, in rank order) in the momentum and gradcache
    # modes; this rank's rows in local mode, which gathers nothing.
    teacher_image: torch.Tensor | None  # (B, D), None when the teacher was not run
    teacher_text: torch.Tensor | None  # (B, D)
    ids: torch.Tensor  # (B,) study indices of the B pairs


@dataclass
class GlobalBatch:
    """The position of this rank's pairs in the global batch of one optimizer step.

    One process: the global batch is the local one, ``offset`` is 0 and ``normaliser``
    is the number of pairs B.
    """

    ids: torch.Tensor  # (B_global,) study indices of every rank's pairs, in rank order
    sizes: list[int]  # pairs per rank
    offset: int  # row of this rank's first pair in the global batch
    normaliser: float  # B_global / W: a micro-batch of n pairs has loss weight n / normaliser
    distributed: DistributedContext | None

    @classmethod
    def build(cls, local_ids: torch.Tensor, distributed: DistributedContext | None) -> "GlobalBatch":
        """Gather the study ids of every rank (a no-op with one process)."""
        if distributed is None or not distributed.enabled:
            return cls(local_ids, [local_ids.shape[0]], 0, local_ids.shape[0], None)
        sizes = distributed.gather_sizes(local_ids.shape[0], local_ids.device)
        ids = distributed.gather_rows(local_ids, sizes)  # (B_global,)
        return cls(ids, sizes, sum(sizes[:distributed.rank]), sum(sizes) / distributed.world_size, distributed)

    @property
    def world_size(self) -> int:
        """Number of ranks sharing the step."""
        return 1 if self.distributed is None else self.distributed.world_size

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(n_local, ...) rows of this rank -> (B_global, ...) rows of all ranks, without gradients."""
        if self.distributed is None:
            return tensor
        return self.distributed.gather_rows(tensor, self.sizes)


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
    distributed: DistributedContext | None = None,
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
        distributed: the process group when several processes train together; every
            rank must call this function for the same step. None for one process.

    Returns:
        A ``StepOutput``. The caller all-reduces the gradients (with several processes)
        and enqueues the teacher features after the optimizer step.
    """
    if negatives not in ("momentum", "gradcache", "local"):
        raise ValueError(f"invalid negatives={negatives!r}: must be 'momentum', 'gradcache' or 'local'")
    if (alpha > 0 or image_queue is not None) and teacher is None:
        raise ValueError("alpha > 0 and the queue both need a teacher")
    local_ids = torch.cat([batch["study_index"] for batch in micro_batches])  # (b_local,)
    global_batch = GlobalBatch.build(local_ids, distributed)
    needs_teacher = teacher is not None and (alpha > 0 or image_queue is not None or negatives == "momentum")

    teacher_image = teacher_text = None
    if needs_teacher:
        teacher_image, teacher_text = _embed_all(teacher, micro_batches, autocast)  # (b_local, D) each
        if negatives != "local":
            teacher_image = global_batch.gather(teacher_image)  # (B, D), all ranks
            teacher_text = global_batch.gather(teacher_text)  # (B, D)

    if negatives == "momentum":
        parts = _momentum_pass(student, micro_batches, teacher_image, teacher_text, global_batch, alpha,
                               image_queue, text_queue, autocast, scale_loss)
    elif negatives == "gradcache":
        parts = _gradcache_pass(student, micro_batches, teacher_image, teacher_text, global_batch, alpha,
                                image_queue, text_queue, autocast, scale_loss)
    else:
        parts = _local_pass(student, micro_batches, teacher_image, teacher_text, global_batch.normaliser, alpha,
                            autocast, scale_loss)

    values = torch.stack([parts.total, parts.image_to_text, parts.text_to_image]).detach()  # (3,)
    if distributed is not None:
        distributed.average_(values)
    ids = local_ids if negatives == "local" else global_batch.ids
    return StepOutput(values[0].item(), values[1].item(), values[2].item(), teacher_image, teacher_text, ids)


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


def _momentum_pass(student, micro_batches, teacher_image, teacher_text, global_batch: GlobalBatch, alpha,
                   image_queue, text_queue, autocast, scale_loss) -> LossParts:
    ids = global_batch.ids
    image_keys, key_ids = _keys_with_queue(teacher_image, ids, image_queue)  # (K, D), (K,)
    text_keys, _ = _keys_with_queue(teacher_text, ids, text_queue)  # (K, D)
    total = global_batch.normaliser

    summed = None
    offset = global_batch.offset
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

        # Weight by this micro-batch's share of the step, so the sum is the mean over B pairs
        # (times W with W ranks, which the all-reduce mean of the gradients divides out).
        share = size / total
        scale_loss(parts.total * share).backward()
        summed = _add_parts(summed, parts, share)
    return summed


def _gradcache_pass(student, micro_batches, teacher_image, teacher_text, global_batch: GlobalBatch, alpha,
                    image_queue, text_queue, autocast, scale_loss) -> LossParts:
    ids = global_batch.ids
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

    # The loss over all B pairs of all ranks, differentiated with respect to the cached embeddings.
    all_images = global_batch.gather(torch.cat(images)).requires_grad_()  # (B, D)
    all_texts = global_batch.gather(torch.cat(texts)).requires_grad_()  # (B, D)
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

    # Pass 2: replay each micro-batch with gradients and push this rank's rows of the cached
    # gradients through. Every rank computes the whole loss, so the rows are scaled by W
    # to survive the all-reduce mean. The logit scale's gradient is complete on every rank
    # already, and the mean leaves it unchanged.
    image_grads, text_grads = all_images.grad, all_texts.grad  # (B, D) each
    if global_batch.world_size > 1:
        image_grads, text_grads = image_grads * global_batch.world_size, text_grads * global_batch.world_size
    offset = global_batch.offset
    for batch, state in zip(micro_batches, states):
        size = batch["study_index"].shape[0]
        state.restore()
        with autocast():
            image, text = student(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        image_grad = image_grads[offset:offset + size].to(image.dtype)
        text_grad = text_grads[offset:offset + size].to(text.dtype)
        torch.autograd.backward([image, text], [image_grad, text_grad])
        offset += size
    return LossParts(parts.total.detach(), parts.image_to_text.detach(), parts.text_to_image.detach())


def _local_pass(student, micro_batches, teacher_image, teacher_text, total, alpha, autocast,
                scale_loss) -> LossParts:
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
