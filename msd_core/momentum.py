"""The momentum (EMA) teacher and the FIFO feature queue.

The teacher is a copy of the student whose parameters follow the student slowly:
teacher <- m * teacher + (1 - m) * student, once per optimizer step. It runs in eval
mode (no dropout) and never receives gradients.

Teacher buffers (batch-norm running statistics and counters) follow one of two
policies, the ``teacher_buffers`` config field:

- ``"copy"`` (default): after every update the teacher takes the student's buffers as
  they are. The student's running statistics are already a moving average over
  batches, and copying keeps them matched to the current student weights, which
  matters early on, when an averaged-again statistic would lag the fast-moving weights.
- ``"ema"``: floating-point buffers are averaged with the same momentum as the
  parameters; integer buffers (``num_batches_tracked``) are copied.

With several processes the teacher and the queue need no communication of their own.
Every rank updates its teacher after the same optimizer step on all-reduced gradients,
from student buffers that ``Trainer`` copies from rank 0 first, and enqueues the same
teacher features, gathered from all ranks in rank order. So teachers and queues stay
identical on every rank.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class MomentumTeacher:
    """An EMA copy of a student model.

    Build it after the student has been moved to its device: the copy is made once, at
    construction, on the student's device.

    Args:
        student: the model being trained. The teacher keeps a reference to it.
        momentum: m in [0, 1); 0 makes the teacher a copy of the student after every update.
        buffer_policy: ``"copy"`` or ``"ema"``, see the module docstring.
    """

    def __init__(self, student: nn.Module, momentum: float, buffer_policy: str = "copy"):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"invalid momentum={momentum!r}: must be in [0, 1)")
        if buffer_policy not in ("copy", "ema"):
            raise ValueError(f"invalid buffer_policy={buffer_policy!r}: must be 'copy' or 'ema'")
        self.student = student
        self.momentum = momentum
        self.buffer_policy = buffer_policy
        self.updates = 0
        self.model = copy.deepcopy(student)
        self.model.requires_grad_(False)
        self.model.eval()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the teacher model without gradients."""
        with torch.no_grad():
            return self.model(*args, **kwargs)

    @torch.no_grad()
    def update(self) -> None:
        """Move the teacher one EMA step towards the student (call once per optimizer step)."""
        teacher_params = list(self.model.parameters())
        student_params = [p.detach() for p in self.student.parameters()]
        # lerp(t, s, w) = t + w * (s - t) = m * t + (1 - m) * s with w = 1 - m.
        torch._foreach_lerp_(teacher_params, student_params, 1.0 - self.momentum)

        for teacher_buffer, student_buffer in zip(self.model.buffers(), self.student.buffers()):
            if self.buffer_policy == "ema" and teacher_buffer.is_floating_point():
                teacher_buffer.lerp_(student_buffer, 1.0 - self.momentum)
            else:
                teacher_buffer.copy_(student_buffer)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """Return the teacher weights and its update count."""
        return {"model": self.model.state_dict(), "momentum": self.momentum, "updates": self.updates,
                "buffer_policy": self.buffer_policy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


class FeatureQueue(nn.Module):
    """A first-in first-out store of the last ``size`` embeddings, with an id per slot.

    Slots never written hold id -1 and are left out by ``valid()``. The ids let the loss
    mask out queue entries of the query's own sample or study.

    Args:
        size: number of slots Q (> 0).
        dim: embedding dimension D.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size <= 0:
            raise ValueError(f"invalid queue size={size}: must be a positive integer")
        self.size = size
        self.register_buffer("features", torch.zeros(size, dim))  # (Q, D)
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))  # (Q,)
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))  # next slot to write

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, sample_ids: torch.Tensor) -> None:
        """Write (N, D) features and their (N,) ids, overwriting the oldest slots.

        N may be any size: writes wrap around the end, and when N > Q only the last Q
        rows are kept.
        """
        if features.shape[0] != sample_ids.shape[0]:
            raise ValueError(f"features has {features.shape[0]} rows but sample_ids has {sample_ids.shape[0]}")
        features, sample_ids = features[-self.size:], sample_ids[-self.size:]
        count = features.shape[0]
        slots = (self.pointer + torch.arange(count, device=self.ids.device)) % self.size  # (N,)
        self.features[slots] = features.detach().to(self.features.dtype)
        self.ids[slots] = sample_ids.to(self.ids.device)
        self.pointer.copy_((self.pointer + count) % self.size)

    def valid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the filled slots as (features (M, D), ids (M,)), M <= Q."""
        filled = self.ids >= 0
        return self.features[filled], self.ids[filled]
