"""Multi-process training under ``torchrun``: process-group set-up and the collectives MSD needs.

``torchrun --nproc_per_node N -m msd_core pretrain ...`` starts N copies of the
program with ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` in their environment.
``init_distributed`` reads them: with ``WORLD_SIZE`` > 1 it joins the process group
(NCCL on CUDA, one process per GPU, ``LOCAL_RANK`` k -> ``cuda:k``; gloo on the CPU)
and returns a ``DistributedContext``. Without them it returns a context of one process
whose collectives do nothing, so the single-process code path stays as it was.

The student is not wrapped in ``DistributedDataParallel``. One optimizer step runs a
custom pass (in ``gradcache`` mode two forward passes per micro-batch and a backward
into cached embeddings), and DDP would all-reduce gradients on every backward of every
micro-batch unless each were wrapped in ``no_sync()``. Instead every rank accumulates
its own gradients, and ``average_gradients`` all-reduces them once per optimizer step,
before clipping. The temperature is a parameter like the others, so the same call
averages it. ``msd_core.step`` weights each rank's loss so that this average is the
gradient of the loss over the global batch.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import runtime

logger = logging.getLogger(__name__)

# How long a collective may wait for the other ranks before the run fails.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass
class DistributedContext:
    """This process's place in the process group, and the collectives training uses.

    With ``world_size == 1`` every collective returns its input unchanged and talks to
    no other process.

    Attributes:
        rank: global rank, 0 .. world_size - 1; rank 0 writes every file.
        world_size: number of processes.
        local_rank: rank on this node; selects the GPU.
        owns_group: True when ``init_distributed`` created the process group, so
            ``close`` destroys it.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """True with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files, logs at INFO and draws progress bars."""
        return self.rank == 0

    # ------------------------------------------------------------ collectives

    def gather_sizes(self, count: int, device: torch.device) -> list[int]:
        """Return every rank's ``count`` in rank order (a list of ``world_size`` ints)."""
        if not self.enabled:
            return [count]
        local = torch.tensor([count], dtype=torch.long, device=device)
        gathered = [torch.zeros_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local)
        return [int(size.item()) for size in gathered]

    def gather_rows(self, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate every rank's rows in rank order, without gradients.

        Args:
            tensor: (n_r, ...) this rank's rows; n_r = ``sizes[rank]``, which may differ
                between ranks (a micro-batch loses the rows whose images were unreadable).
            sizes: every rank's row count, from ``gather_sizes``.

        Returns:
            (sum(sizes), ...) the rows of rank 0, then rank 1, and so on.
        """
        if not self.enabled:
            return tensor
        if tensor.shape[0] != sizes[self.rank]:
            raise ValueError(f"invalid tensor: rank {self.rank} passed {tensor.shape[0]} rows, but "
                             f"sizes[{self.rank}] is {sizes[self.rank]}; pass the sizes gather_sizes returned "
                             "for this tensor's row count")

        # all_gather needs equal shapes on every rank, so pad to the largest count and trim after.
        longest = max(sizes)
        padded = tensor.detach().new_zeros((longest, *tensor.shape[1:]))  # (max n_r, ...)
        padded[:tensor.shape[0]] = tensor.detach()
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded.contiguous())
        return torch.cat([rows[:size] for rows, size in zip(gathered, sizes)])  # (sum n_r, ...)

    def average_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Replace ``tensor`` in place by its mean over the ranks, and return it."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor.div_(self.world_size)
        return tensor

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Replace ``tensor`` in place by its sum over the ranks, and return it."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """Return True when ``flag`` is True on at least one rank."""
        if not self.enabled:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.long, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """All-reduce the ``.grad`` of ``parameters`` to their mean over the ranks.

        Gradients are flattened into one buffer per dtype and device, so each optimizer
        step costs one all-reduce per dtype rather than one per tensor. Parameters
        without a gradient are left out. Every rank must leave out the same ones,
        which is true when every rank runs the same model and loss.

        Raises:
            RuntimeError: the ranks hold gradients of different sizes.
        """
        if not self.enabled:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        self._check_same_numel(sum(g.numel() for g in grads), grads[0].device if grads else torch.device("cpu"))
        for group in _group_by_dtype_and_device(grads):
            flat = torch.cat([g.reshape(-1) for g in group])  # (total elements,)
            self.average_(flat)
            _copy_back(flat, group)

    def broadcast_tensors_(self, tensors: Iterable[torch.Tensor], source: int = 0) -> None:
        """Overwrite ``tensors`` in place with rank ``source``'s values, one broadcast per dtype and device."""
        if not self.enabled:
            return
        for group in _group_by_dtype_and_device([t.data for t in tensors]):
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.broadcast(flat, src=source)
            _copy_back(flat, group)

    def broadcast_module_(self, module: nn.Module, *, buffers_only: bool = False) -> None:
        """Give every rank rank 0's parameters (unless ``buffers_only``) and buffers."""
        tensors = list(module.buffers())
        if not buffers_only:
            tensors = list(module.parameters()) + tensors
        self.broadcast_tensors_(tensors)

    def broadcast_object(self, value: Any) -> Any:
        """Return rank 0's ``value`` on every rank (any picklable object)."""
        if not self.enabled:
            return value
        holder = [value if self.is_main else None]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather_objects(self, value: Any) -> list[Any]:
        """Return every rank's ``value`` (any picklable object), in rank order, on every rank."""
        if not self.enabled:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        """Wait until every rank reaches this call."""
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    def _check_same_numel(self, numel: int, device: torch.device) -> None:
        # A mismatch would make the flattened all-reduce fail obscurely or hang, so check first.
        bounds = torch.tensor([numel, -numel], dtype=torch.long, device=device)
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
        largest, smallest = int(bounds[0].item()), -int(bounds[1].item())
        if largest != smallest:
            raise RuntimeError(
                f"the ranks hold between {smallest} and {largest} gradient elements (rank {self.rank}: {numel}); "
                "every rank must train the same model with the same frozen layers"
            )


def _group_by_dtype_and_device(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    return list(groups.values())


def _copy_back(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for tensor in tensors:
        count = tensor.numel()
        tensor.copy_(flat[offset:offset + count].view_as(tensor))
        offset += count


def rank_seed(seed: int, rank: int, *more: int) -> int:
    """Derive a 32-bit seed for one rank's generators from the run's seed, the rank and optional integers.

    NumPy's ``SeedSequence`` mixes the entropy, so nearby seeds and ranks give unrelated
    streams (unlike ``seed + rank``, where run 0's rank 1 would replay run 1's rank 0).
    """
    entropy = [value % 2**64 for value in (seed, rank, *more)]  # SeedSequence takes non-negative integers
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def world_size_from_environment() -> int:
    """``WORLD_SIZE`` as torchrun sets it, or 1 when it is unset."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(value)
    except ValueError:
        raise ValueError(f"invalid WORLD_SIZE={value!r} in the environment: must be a positive integer") from None
    if size < 1:
        raise ValueError(f"invalid WORLD_SIZE={value!r} in the environment: must be a positive integer")
    return size


def init_distributed(device: str | torch.device | None = None,
                     timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> tuple[DistributedContext, torch.device]:
    """Join the process group that torchrun describes in the environment, if any.

    With ``WORLD_SIZE`` unset or 1 this returns a one-process context and
    ``runtime.resolve_device(device)``. Otherwise it reads ``RANK`` and ``LOCAL_RANK``,
    puts the process on ``cuda:LOCAL_RANK`` when the device is CUDA without an index,
    and initialises the process group from ``MASTER_ADDR`` and ``MASTER_PORT`` with
    the NCCL backend on CUDA and gloo on the CPU. A process group that already exists
    (created by the caller) is used as it is, and ``close`` leaves it alone. Ranks
    other than 0 log only warnings and errors from ``msd_core``.

    Args:
        device: "cpu", "cuda", "cuda:1", ... or None for CUDA when available.
        timeout: how long collectives wait for the slowest rank before failing.

    Returns:
        The context and the device this process trains on.
    """
    world_size = world_size_from_environment()
    device = runtime.resolve_device(device)
    if world_size == 1:
        return DistributedContext(), device

    rank = _environment_int("RANK")
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = _cuda_device_for(local_rank, device)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"

    owns_group = False
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        owns_group = True
    elif dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(f"the existing process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
                           f"but the environment says RANK={rank} and WORLD_SIZE={world_size}")

    if rank != 0:
        logging.getLogger("msd_core").setLevel(logging.WARNING)
    logger.info("joined the %s process group: rank %d of %d on %s", backend, rank, world_size, device)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, owns_group=owns_group), device


def _environment_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {name} is missing; start "
                           "multi-process runs with torchrun, which sets RANK, LOCAL_RANK and WORLD_SIZE")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"invalid {name}={value!r} in the environment: must be an integer") from None


def _cuda_device_for(local_rank: int, device: torch.device) -> torch.device:
    """``cuda:LOCAL_RANK`` for a device given without an index; an explicit index is kept."""
    if device.index is not None:
        if device.index != local_rank:
            logger.warning("device %s was requested on local rank %d; several processes may share one GPU",
                           device, local_rank)
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(f"LOCAL_RANK={local_rank} but this node has {count} CUDA device(s); start at most "
                           f"{count} processes per node (torchrun --nproc_per_node {count})")
    return torch.device("cuda", local_rank)
