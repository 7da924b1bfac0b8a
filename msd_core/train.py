"""The training loop: accumulation, AMP, checkpoints, exact resume, history, several processes.

One optimizer step, in order (the MSD recipe):

1. take the next k micro-batches;
2. ``step.accumulate_gradients``: teacher pass over all B = k * b pairs, then the
   student loss of every micro-batch, backpropagated one micro-batch at a time;
3. with several processes, average the gradients over the ranks; then unscale (fp16),
   clip gradients, ``optimizer.step()``, scheduler step, clamp the temperature;
4. ONE EMA update of the teacher, then enqueue the teacher features of this step.

``train(config)`` runs a whole job and returns its ``History``; ``resume(path)``
continues a run from its newest readable checkpoint and, on the same device with the
same settings, produces the same numbers as a run that was never interrupted.

Under ``torchrun`` (``WORLD_SIZE`` > 1) each of the W processes trains on its own
shard of every global batch of W * k * b pairs (see ``msd_core.distributed`` and
``msd_core.step``). Every rank keeps identical student, teacher, queue and optimizer
state. Rank 0 alone writes checkpoints, history, figures and the generated PhantomCXR
set, logs at INFO and draws the progress bar.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import runtime
from .checkpoint import checkpoint_name, find_checkpoint, list_checkpoints, save_checkpoint
from .config import TrainConfig
from .data import EpochBatchSampler, ImageTextDataset, PairCollator
from .distributed import init_distributed, rank_seed
from .manifest import read_manifest
from .model import DualEncoder, ModelSpec, build_model, freeze_text_layers
from .momentum import FeatureQueue, MomentumTeacher
from .phantom import MANIFEST_NAME, generate_phantom
from .step import StepOutput, accumulate_gradients

logger = logging.getLogger(__name__)

BATCH_TENSORS = ("pixel_values", "input_ids", "attention_mask", "index", "study_index")

# Config fields that ``load_trainer`` may change on resume: the batch geometry (to keep
# the global batch when the number of processes changes) and bookkeeping.
RESUME_CHANGES = ("micro_batch_size", "accumulation_steps", "num_workers", "output_dir", "checkpoint_every",
                  "keep_checkpoints")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingOutOfMemoryError(RuntimeError):
    """The device ran out of memory in a training step."""


class History:
    """Per-step records of a run: loss and its two directions, lr, alpha, tau, throughput, memory.

    ``to_frame()`` gives a pandas DataFrame with one row per optimizer step.
    ``interrupted`` is True when the run stopped early on Ctrl-C; ``checkpoint`` is the
    last checkpoint written.
    """

    def __init__(self, records: list[dict[str, Any]] | None = None):
        self.records: list[dict[str, Any]] = list(records or [])
        self.interrupted = False
        self.checkpoint: Path | None = None
        self.output_dir: Path | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.records[index]

    def append(self, record: dict[str, Any]) -> None:
        """Add one step's record."""
        self.records.append(record)

    def to_frame(self) -> pd.DataFrame:
        """Return the records as a DataFrame, one row per optimizer step."""
        return pd.DataFrame(self.records)

    def to_csv(self, path: str | Path) -> Path:
        """Write the history as CSV and return the path."""
        path = Path(path)
        self.to_frame().to_csv(path, index=False)
        return path


class Trainer:
    """A training run: data, student, teacher, queues, optimizer, and their exact state.

    Build it with a config (new run) or with a checkpoint's state (resume); call
    ``fit()`` to train. Notebooks can reach ``trainer.model`` and ``trainer.teacher``.

    When the environment describes a torchrun job (``WORLD_SIZE`` > 1), the Trainer
    joins the process group here and ``fit()`` destroys it at the end, so build a new
    Trainer to train again. ``trainer.distributed`` is the ``DistributedContext``: rank,
    world size and collectives.

    Args:
        config: the run's settings.
        device: "cpu", "cuda", "cuda:1", ... or None for CUDA when available. Under
            torchrun, "cuda" or None means ``cuda:LOCAL_RANK``.
        state: a checkpoint dict to resume from.
        progress: show a tqdm progress bar (on rank 0 only).
    """

    def __init__(self, config: TrainConfig, *, device: str | torch.device | None = None,
                 state: dict[str, Any] | None = None, progress: bool = True):
        self.config = config
        self.distributed, self.device = init_distributed(device)
        self.precision = runtime.resolve_precision(config.precision, self.device)
        self.autocast = runtime.autocast_factory(self.precision, self.device)
        self.progress = progress and self.distributed.is_main
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        if state is None:
            _reject_earlier_run(self.checkpoint_dir)
        runtime.seed_everything(config.seed)

        self.manifest = self._prepare_manifest()
        self.model = self._build_model(state)
        self.dataset = ImageTextDataset.for_model(self.manifest, self.model, split="train",
                                                  skip_bad_rows=config.skip_bad_rows)
        self.collator = PairCollator(self.model.tokenizer, self.model.spec.max_text_length)
        world_size = self.distributed.world_size
        self.global_batch_size = config.effective_batch_size * world_size
        # Global micro-batches: world_size * b rows each, one slice of b rows per rank.
        self.batches_per_epoch = len(self.dataset) // (config.micro_batch_size * world_size)
        self.steps_per_epoch = self.batches_per_epoch // config.accumulation_steps
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the train split of {self.manifest} has {len(self.dataset)} usable rows, fewer than one effective "
                f"batch of {self.global_batch_size} (micro_batch_size={config.micro_batch_size} x "
                f"accumulation_steps={config.accumulation_steps} x {world_size} process(es)); lower them or use "
                "more data"
            )
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.alpha_ramp_steps = config.alpha_ramp_steps or self.steps_per_epoch

        self.model.to(self.device)
        if self.distributed.enabled:
            # Every rank starts from rank 0's weights, then draws its own dropout masks.
            self.distributed.broadcast_module_(self.model)
            runtime.seed_everything(rank_seed(config.seed, self.distributed.rank))
        self.teacher = MomentumTeacher(self.model, config.momentum, config.teacher_buffers)
        self.image_queue = self.text_queue = None
        if config.queue_size > 0:
            self.image_queue = FeatureQueue(config.queue_size, config.embed_dim).to(self.device)
            self.text_queue = FeatureQueue(config.queue_size, config.embed_dim).to(self.device)
        self.optimizer = _build_optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

        self.step = 0
        self.skipped_steps = 0
        self.skipped_rows = 0
        self.history = History()
        self.history.output_dir = self.output_dir
        self.last_checkpoint: Path | None = None
        self.stop_requested = False
        if state is not None:
            self._load_state(state)

    # ----------------------------------------------------------------- set-up

    def _prepare_manifest(self) -> Path:
        if self.config.manifest is not None:
            return Path(self.config.manifest)
        # Only rank 0 writes PhantomCXR, and the other ranks wait for its path.
        manifest = prepare_manifest(self.config, progress=self.progress) if self.distributed.is_main else None
        return self.distributed.broadcast_object(manifest)

    def _build_model(self, state: dict[str, Any] | None) -> DualEncoder:
        if state is not None:
            model = DualEncoder.from_spec(ModelSpec(**state["model_spec"]))
            model.load_state_dict(state["model"])
            freeze_text_layers(model, self.config.text_trainable_layers)
            return model

        # Rank 0 builds the model, so a download or tokenizer training happens once. The
        # other ranks rebuild its architecture and tokenizer from the spec, and __init__
        # then copies rank 0's weights to them.
        spec = None
        if self.distributed.is_main:
            frame = read_manifest(self.manifest)
            texts = frame.loc[frame["split"] == "train", "text"].astype(str).tolist()
            model = build_model(self.config, tokenizer_texts=texts)
            spec = model.spec
        spec = self.distributed.broadcast_object(spec)
        if not self.distributed.is_main:
            model = DualEncoder.from_spec(spec)
            freeze_text_layers(model, self.config.text_trainable_layers)
        return model

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up to the base lr, then cosine decay to zero at the last step."""
        warmup = self.config.warmup_steps
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def alpha_at(self, step: int) -> float:
        """Distillation weight at ``step``: a linear ramp from 0 to ``config.alpha``."""
        return self.config.alpha * min(1.0, step / self.alpha_ramp_steps)

    # ------------------------------------------------------------------ data

    def _micro_batches(self) -> Iterator[dict[str, Any]]:
        """Micro-batches from the current step on, epoch after epoch, in a resumable order."""
        epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
        start_batch = step_in_epoch * self.config.accumulation_steps
        used = self.steps_per_epoch * self.config.accumulation_steps
        workers = self.config.num_workers
        if workers is None:
            workers = runtime.default_num_workers(self.device)
        while True:
            sampler = EpochBatchSampler(len(self.dataset), self.config.micro_batch_size, self.config.seed,
                                        epoch=epoch, start_batch=start_batch, stop_batch=used,
                                        rank=self.distributed.rank, world_size=self.distributed.world_size)
            loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collator, num_workers=workers,
                                pin_memory=self.device.type == "cuda", worker_init_fn=runtime.seed_worker,
                                persistent_workers=False)
            yield from loader
            epoch, start_batch = epoch + 1, 0

    def _micro_batches_of_epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        """Yield the micro-batches this rank trains on in one epoch, in order (for inspection and tests)."""
        used = self.steps_per_epoch * self.config.accumulation_steps
        sampler = EpochBatchSampler(len(self.dataset), self.config.micro_batch_size, self.config.seed, epoch=epoch,
                                    stop_batch=used, rank=self.distributed.rank,
                                    world_size=self.distributed.world_size)
        yield from DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collator)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        moved = dict(batch)
        for key in BATCH_TENSORS:
            moved[key] = batch[key].to(self.device, non_blocking=True)
        return moved

    # -------------------------------------------------------------- training

    def fit(self) -> History:
        """Train until ``total_steps``, or until Ctrl-C; returns the history.

        Ctrl-C (or a notebook's stop button) finishes the current optimizer step,
        writes a checkpoint and returns the history so far with ``interrupted=True``.
        A second Ctrl-C aborts at once. With several processes, an interrupt on any
        rank stops every rank after the same step, and the process group is destroyed
        on return.
        """
        try:
            return self._fit()
        finally:
            self.distributed.close()

    def _fit(self) -> History:
        config = self.config
        world_size = self.distributed.world_size
        processes = f" x {world_size} processes" if world_size > 1 else ""
        logger.info("training on %s (%s): %d steps, micro-batch %d x %d accumulation%s = effective batch %d, "
                    "negatives=%s, queue=%d", self.device, self.precision, self.total_steps, config.micro_batch_size,
                    config.accumulation_steps, processes, self.global_batch_size, config.negatives,
                    config.queue_size)
        self.model.train()
        batches = self._micro_batches()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="pretraining", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        try:
            with self._graceful_interrupt():
                while self.step < self.total_steps and not self.stop_requested:
                    group = [next(batches) for _ in range(config.accumulation_steps)]
                    record = self.train_step(group)
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tau=f"{record['tau']:.3f}",
                                    alpha=f"{record['alpha']:.2f}", samples_s=f"{record['samples_per_s']:.0f}")
                    if self.distributed.enabled:
                        # Ranks must leave the loop after the same step, or their collectives would not match.
                        self.stop_requested = self.distributed.any(self.stop_requested, self.device)
                    if self.step % config.checkpoint_every == 0 and self.step < self.total_steps:
                        self.save()
        finally:
            bar.close()

        self.save()
        if self.stop_requested:
            self.history.interrupted = True
            logger.warning("stopped by interrupt after step %d; resume with msd_core.train.resume(%r)",
                           self.step, str(self.output_dir))
        elif self.distributed.is_main:
            self._write_loss_curve()
        return self.history

    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, Any]:
        """Run one optimizer step on k micro-batches and return its history record."""
        started = time.perf_counter()
        skipped_rows = sum(batch["skipped"] for batch in micro_batches)
        micro_batches = [self._to_device(batch) for batch in micro_batches if len(batch["index"]) > 0]
        if not micro_batches:
            # NOTE: with several processes only this rank raises; torchrun then stops the others.
            raise RuntimeError(f"step {self.step}: every image of the step's micro-batches was unreadable")
        alpha = self.alpha_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)

        output = self._accumulate(micro_batches, alpha)
        finite = math.isfinite(output.loss)
        if not finite:
            self._handle_non_finite(output)

        stepped = finite and self._optimizer_step()
        with warnings.catch_warnings():
            # The schedule follows the step count, so it advances when the fp16 scaler skips a step.
            # Torch warns about that order when the first step is skipped, which is common under fp16.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
        if self.distributed.enabled:
            # Batch-norm statistics come from each rank's own rows. As DistributedDataParallel
            # does by default, every rank takes rank 0's buffers, so the teachers stay identical.
            self.distributed.broadcast_module_(self.model, buffers_only=True)
        if stepped:
            self.teacher.update()
            if self.image_queue is not None:
                self.image_queue.enqueue(output.teacher_image, output.ids)
                self.text_queue.enqueue(output.teacher_text, output.ids)

        pairs = sum(len(batch["index"]) for batch in micro_batches)
        if self.distributed.enabled:
            counts = torch.tensor([pairs, skipped_rows], dtype=torch.long, device=self.device)
            pairs, skipped_rows = (int(count) for count in self.distributed.sum_(counts).tolist())
        self.step += 1
        self.skipped_rows += skipped_rows
        elapsed = time.perf_counter() - started
        record = {
            "step": self.step,
            "epoch": (self.step - 1) // self.steps_per_epoch,
            "loss": output.loss,
            "image_to_text": output.image_to_text,
            "text_to_image": output.text_to_image,
            "lr": self.optimizer.param_groups[0]["lr"],
            "alpha": alpha,
            "tau": 1.0 / self.model.scale().item(),
            "samples_per_s": pairs / elapsed,
            "step_time_s": elapsed,
            "peak_memory_mb": runtime.peak_memory_mb(self.device),
            "optimizer_stepped": stepped,
            "skipped_rows": skipped_rows,
        }
        self.history.append(record)
        return record

    def _accumulate(self, micro_batches: list[dict[str, Any]], alpha: float) -> StepOutput:
        try:
            return accumulate_gradients(
                self.model, self.teacher, micro_batches, negatives=self.config.negatives, alpha=alpha,
                image_queue=self.image_queue, text_queue=self.text_queue, autocast=self.autocast,
                scale_loss=self.scaler.scale, distributed=self.distributed if self.distributed.enabled else None,
            )
        except torch.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingOutOfMemoryError(self._out_of_memory_message(micro_batches[0])) from None

    def _optimizer_step(self) -> bool:
        """Average over ranks, unscale, clip, step; returns False when the fp16 scaler skipped the step.

        The average comes first, so every rank clips and steps with the same gradients,
        and an inf on one rank makes every rank skip the step.
        """
        self.distributed.average_gradients(self.model.parameters())
        self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        scale_before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.model.clamp_logit_scale_()
        if self.scaler.is_enabled() and self.scaler.get_scale() < scale_before:
            self._count_skipped_step("the gradient scaler found inf or NaN gradients")
            return False
        return True

    def _handle_non_finite(self, output: StepOutput) -> None:
        """Under fp16 a non-finite loss is a skipped step (up to a limit); otherwise stop the run."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
            self._count_skipped_step(f"non-finite fp16 loss {output.loss}")
            return
        last = self.last_checkpoint or "none written yet"
        raise NonFiniteLossError(
            f"non-finite loss at step {self.step + 1}: loss={output.loss} (image-to-text {output.image_to_text}, "
            f"text-to-image {output.text_to_image}), tau={1.0 / self.model.scale().item():.4g}, "
            f"lr={self.optimizer.param_groups[0]['lr']:.3g}. Last good checkpoint: {last}. Resume from it with a "
            "lower lr, more warmup_steps or a smaller grad_clip."
        )

    def _count_skipped_step(self, reason: str) -> None:
        self.skipped_steps += 1
        logger.warning("step %d skipped (%s); %d of at most %d skipped so far", self.step + 1, reason,
                       self.skipped_steps, self.config.max_skipped_steps)
        if self.skipped_steps > self.config.max_skipped_steps:
            raise NonFiniteLossError(
                f"{self.skipped_steps} steps skipped for non-finite values, more than max_skipped_steps="
                f"{self.config.max_skipped_steps} (last at step {self.step + 1}: {reason}). Last good checkpoint: "
                f"{self.last_checkpoint or 'none written yet'}. Lower the lr or use precision='bf16' or 'fp32'."
            )

    def _out_of_memory_message(self, batch: dict[str, Any]) -> str:
        config = self.config
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        fitting = self.largest_fitting_micro_batch(batch)
        suggestion = ""
        if fitting:
            steps = math.ceil(config.effective_batch_size / fitting)
            suggestion = (f" A micro-batch of {fitting} fits: try micro_batch_size={fitting} with "
                          f"accumulation_steps={steps} to keep an effective batch of about {fitting * steps}.")
        return (f"out of memory on {self.device} with micro_batch_size={config.micro_batch_size} "
                f"(effective batch {config.effective_batch_size}, negatives={config.negatives}).{suggestion} "
                "The 'momentum' and 'gradcache' modes keep the negatives of the whole effective batch while "
                "holding the activations of one micro-batch only.")

    def largest_fitting_micro_batch(self, batch: dict[str, Any]) -> int:
        """Halve the micro-batch until a student forward and backward fits; 0 if none does."""
        size = len(batch["index"]) // 2
        while size >= 1:
            try:
                with self.autocast():
                    image, text = self.model(batch["pixel_values"][:size], batch["input_ids"][:size],
                                             batch["attention_mask"][:size])
                (image.float().sum() + text.float().sum()).backward()
                return size
            except torch.OutOfMemoryError:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                size //= 2
            finally:
                self.optimizer.zero_grad(set_to_none=True)
        return 0

    @contextlib.contextmanager
    def _graceful_interrupt(self):
        """Turn the first SIGINT into a stop request at the next step boundary."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def request_stop(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            logger.warning("interrupt received: stopping after the current step and saving a checkpoint "
                           "(press Ctrl-C again to abort at once)")

        signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs (see ``msd_core.checkpoint``).

        ``rng`` contains this process's random generators. With several processes,
        ``save`` adds ``rng_per_rank``, the generators of every rank.
        """
        return {
            "step": self.step,
            "world_size": self.distributed.world_size,
            "global_batch_size": self.global_batch_size,
            "config": self.config.to_dict(),
            "model_spec": vars(self.model.spec).copy(),
            "model": self.model.state_dict(),
            "teacher": self.teacher.state_dict(),
            "image_queue": self.image_queue.state_dict() if self.image_queue is not None else None,
            "text_queue": self.text_queue.state_dict() if self.text_queue is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": self._random_state(),
            "history": self.history.records,
            "skipped_steps": self.skipped_steps,
            "skipped_rows": self.skipped_rows,
            "dropped_rows": dict(self.dataset.dropped),
            "manifest": str(Path(self.manifest).resolve()),
        }

    def _random_state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": _python_random_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _load_state(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        if self.image_queue is not None:
            self.image_queue.load_state_dict(state["image_queue"])
            self.text_queue.load_state_dict(state["text_queue"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.skipped_rows = int(state["skipped_rows"])
        self.history = History(state["history"])
        self.history.output_dir = self.output_dir
        self._check_global_batch(state)
        self._restore_random_state(state)

    def _restore_random_state(self, state: dict[str, Any]) -> None:
        """Restore this rank's random generators from a checkpoint.

        Rank r restores the generators that rank r saved; rank 0 restores the single
        saved state of a one-process run. A rank that did not exist in the saved run
        is seeded afresh from (seed, rank, step).
        """
        rank = self.distributed.rank
        per_rank = state.get("rng_per_rank")
        if per_rank is not None and rank < len(per_rank):
            rng = per_rank[rank]
        elif rank == 0:
            rng = state["rng"]
        else:
            runtime.seed_everything(rank_seed(self.config.seed, rank, self.step))
            return
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        _set_python_random_state(rng["python"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def _check_global_batch(self, state: dict[str, Any]) -> None:
        if not self.distributed.is_main:
            return
        saved_world = int(state.get("world_size", 1))
        saved_config = state["config"]
        saved_batch = int(state.get("global_batch_size", saved_world * saved_config["micro_batch_size"]
                                    * saved_config["accumulation_steps"]))
        if saved_world != self.distributed.world_size:
            logger.info("the checkpoint was written by %d process(es); continuing with %d", saved_world,
                        self.distributed.world_size)
        if saved_batch != self.global_batch_size:
            logger.warning(
                "the global batch changes from %d (saved run) to %d pairs per optimizer step. The epoch and "
                "the position in it are recomputed from step %d with the new batch, so some rows of this epoch "
                "may be seen twice or not at all, and an epoch-based schedule is recomputed; pass "
                "micro_batch_size or accumulation_steps to load_trainer to keep %d",
                saved_batch, self.global_batch_size, self.step, saved_batch)

    def save(self) -> Path:
        """Write a checkpoint, its provenance sidecar and the history CSV; returns the checkpoint path.

        With several processes every rank must call it (the ranks' random generators are
        gathered), rank 0 alone writes, and every rank returns once the files exist.
        """
        if self.distributed.enabled:
            return self._save_distributed()
        return self._write_checkpoint()

    def _save_distributed(self) -> Path:
        per_rank = self.distributed.gather_objects(self._random_state())
        path = self.checkpoint_dir / checkpoint_name(self.step)
        if self.distributed.is_main:
            path = self._write_checkpoint({"rng_per_rank": per_rank})
        self.distributed.barrier()
        self.last_checkpoint = self.history.checkpoint = path
        return path

    def _write_checkpoint(self, extra: dict[str, Any] | None = None) -> Path:
        last = self.history.records[-1] if self.history.records else {}
        provenance = {
            "step": self.step,
            "loss": last.get("loss"),
            "config": self.config.to_dict(),
            "versions": runtime.package_versions(),
            "git_commit": runtime.git_commit(),
            "device": str(self.device),
            "world_size": self.distributed.world_size,
            "precision": self.precision,
            "manifest": str(Path(self.manifest).resolve()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        state = {**self.state_dict(), **(extra or {}), "provenance": provenance}
        self.last_checkpoint = save_checkpoint(state, self.checkpoint_dir, self.step, self.config.keep_checkpoints,
                                               provenance)
        self.history.checkpoint = self.last_checkpoint
        self.config.to_yaml(self.output_dir / "config.yaml")
        self.history.to_csv(self.output_dir / "history.csv")
        return self.last_checkpoint

    def _write_loss_curve(self) -> None:
        from .viz import plot_history

        figure = plot_history(self.history)
        figure.savefig(self.output_dir / "loss_curve.png", dpi=120, bbox_inches="tight")


def run_manifest(config: TrainConfig) -> Path:
    """Return the manifest a run trains on: ``config.manifest``, or the PhantomCXR it generates in its folder."""
    if config.manifest is not None:
        return Path(config.manifest)
    return Path(config.output_dir) / "phantomcxr" / MANIFEST_NAME


def prepare_manifest(config: TrainConfig, *, progress: bool = False) -> Path:
    """Return ``run_manifest(config)``, generating PhantomCXR first when the run uses it.

    The PhantomCXR folder belongs to the run, so changed phantom settings regenerate it,
    and unchanged ones reuse it.
    """
    path = run_manifest(config)
    if config.manifest is not None:
        return path
    return generate_phantom(path.parent, n_pairs=config.phantom_pairs, image_size=config.phantom_image_size,
                            seed=config.seed, overwrite=True, progress=progress)


def _reject_earlier_run(checkpoint_dir: Path) -> None:
    """Raise ``FileExistsError`` when a new run would start in a folder that contains another run's checkpoints.

    The two runs would mix: the rotation keeps the highest step numbers, so it would
    delete the new run's early checkpoints and keep the old run's later ones.
    """
    earlier = list_checkpoints(checkpoint_dir)
    if earlier:
        raise FileExistsError(
            f"{checkpoint_dir} already contains checkpoints of an earlier run (newest: {earlier[0].name}); "
            "continue that run with resume() (--resume on the command line), train into another output_dir "
            "(--output-dir), or delete the folder first")


def _build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases, norms and the temperature (tensors of rank < 2)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)


def _python_random_state():
    import random

    return random.getstate()


def _set_python_random_state(state) -> None:
    import random

    random.setstate(state)


def train(config: TrainConfig, *, device: str | torch.device | None = None, progress: bool = True) -> History:
    """Pretrain a dual encoder with MSD as ``config`` describes; returns the history.

    Writes ``config.output_dir``: ``checkpoints/step-*.pt`` (with JSON sidecars),
    ``history.csv``, ``config.yaml`` and ``loss_curve.png``.
    """
    return Trainer(config, device=device, progress=progress).fit()


def resume(checkpoint: str | Path, *, device: str | torch.device | None = None, max_steps: int | None = None,
           progress: bool = True, **changes: Any) -> History:
    """Continue a run from a checkpoint file, or from the newest readable one in a run folder.

    Args:
        checkpoint: a ``step-*.pt`` file, a run's output folder, or its ``checkpoints`` folder.
        device: where to continue; None picks CUDA when available.
        max_steps: train to this many steps in total instead of the saved config's.
        progress: show a progress bar.
        changes: config fields to change, as in ``load_trainer``.
    """
    return load_trainer(checkpoint, device=device, max_steps=max_steps, progress=progress, **changes).fit()


def load_trainer(checkpoint: str | Path, *, device: str | torch.device | None = None, max_steps: int | None = None,
                 progress: bool = True, **changes: Any) -> Trainer:
    """Rebuild a ``Trainer`` in the exact state a checkpoint recorded.

    The run may continue with another number of processes than the one that saved it:
    the checkpoint stores the global optimizer step, and the data position follows from
    it. To keep the global batch W * k * b when W changes, pass ``micro_batch_size`` or
    ``accumulation_steps``.

    Args:
        checkpoint: a ``step-*.pt`` file, a run's output folder, or its ``checkpoints`` folder.
        device: where to continue; None picks CUDA when available.
        max_steps: train to this many steps in total instead of the saved config's.
        progress: show a progress bar.
        changes: config fields to change, only those in ``RESUME_CHANGES`` (batch
            geometry and bookkeeping), e.g. ``micro_batch_size=8``.

    Raises:
        ValueError: a field in ``changes`` is not in ``RESUME_CHANGES``.
    """
    rejected = sorted(set(changes) - set(RESUME_CHANGES))
    if rejected:
        raise ValueError(f"invalid change of {rejected} on resume: only these fields may change, because "
                         f"the others change the model or the loss: {list(RESUME_CHANGES)}")
    path, state = find_checkpoint(checkpoint)
    config = TrainConfig.from_dict(state["config"])
    if max_steps is not None:
        changes = {**changes, "max_steps": max_steps}
    if config.manifest is None:
        changes = {**changes, "manifest": state["manifest"]}
    if changes:
        config = config.replace(**changes)
    trainer = Trainer(config, device=device, state=state, progress=progress)
    trainer.last_checkpoint = path
    # Logged after the Trainer exists, because it quiets INFO messages on ranks other than 0.
    logger.info("loaded the training state of %s: step %d of %d", path, state["step"], trainer.total_steps)
    return trainer


def load_model(checkpoint: str | Path, *, device: str | torch.device = "cpu", teacher: bool = False) -> DualEncoder:
    """Load a trained model (the student, or the EMA teacher) from a checkpoint, in eval mode."""
    path, state = find_checkpoint(checkpoint, map_location="cpu")
    model = DualEncoder.from_spec(ModelSpec(**state["model_spec"]))
    model.load_state_dict(state["teacher"]["model"] if teacher else state["model"])
    return model.to(runtime.resolve_device(device)).eval()
