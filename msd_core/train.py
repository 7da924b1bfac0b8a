"""The single-device training loop: accumulation, AMP, checkpoints, exact resume, history.

One optimizer step, in order (the MSD recipe):

1. take the next k micro-batches;
2. ``step.accumulate_gradients``: teacher pass over all B = k * b pairs, then the
   student loss of every micro-batch, backpropagated one micro-batch at a time;
3. unscale (fp16), clip gradients, ``optimizer.step()``, scheduler step, clamp the
   temperature;
4. ONE EMA update of the teacher, then enqueue the teacher features of this step.

``train(config)`` runs a whole job and returns its ``History``; ``resume(path)``
continues a run from its newest readable checkpoint and, on the same device with the
same settings, produces the same numbers as a run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import runtime
from .checkpoint import find_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import EpochBatchSampler, ImageTextDataset, PairCollator
from .manifest import read_manifest
from .model import DualEncoder, ModelSpec, build_model, freeze_text_layers
from .momentum import FeatureQueue, MomentumTeacher
from .step import StepOutput, accumulate_gradients

logger = logging.getLogger(__name__)

BATCH_TENSORS = ("pixel_values", "input_ids", "attention_mask", "index", "study_index")


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
        """One row per optimizer step."""
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

    Args:
        config: the run's settings.
        device: "cpu", "cuda", "cuda:1", ... or None for CUDA when available.
        state: a checkpoint dict to resume from.
        progress: show a tqdm progress bar.
    """

    def __init__(self, config: TrainConfig, *, device: str | torch.device | None = None,
                 state: dict[str, Any] | None = None, progress: bool = True):
        self.config = config
        self.device = runtime.resolve_device(device)
        self.precision = runtime.resolve_precision(config.precision, self.device)
        self.autocast = runtime.autocast_factory(self.precision, self.device)
        self.progress = progress
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        runtime.seed_everything(config.seed)

        self.manifest = self._prepare_manifest()
        self.model = self._build_model(state)
        self.dataset = ImageTextDataset.for_model(self.manifest, self.model, split="train",
                                                  skip_bad_rows=config.skip_bad_rows)
        self.collator = PairCollator(self.model.tokenizer, self.model.spec.max_text_length)
        self.batches_per_epoch = len(self.dataset) // config.micro_batch_size
        self.steps_per_epoch = self.batches_per_epoch // config.accumulation_steps
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the train split of {self.manifest} has {len(self.dataset)} usable rows, fewer than one effective "
                f"batch of {config.effective_batch_size} (micro_batch_size={config.micro_batch_size} x "
                f"accumulation_steps={config.accumulation_steps}); lower them or use more data"
            )
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.alpha_ramp_steps = config.alpha_ramp_steps or self.steps_per_epoch

        self.model.to(self.device)
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
        from .phantom import generate_phantom

        # The folder belongs to the run, so changed phantom settings regenerate it.
        return generate_phantom(self.output_dir / "phantomcxr", n_pairs=self.config.phantom_pairs,
                                image_size=self.config.phantom_image_size, seed=self.config.seed,
                                overwrite=True, progress=self.progress)

    def _build_model(self, state: dict[str, Any] | None) -> DualEncoder:
        if state is not None:
            model = DualEncoder.from_spec(ModelSpec(**state["model_spec"]))
            model.load_state_dict(state["model"])
            freeze_text_layers(model, self.config.text_trainable_layers)
            return model
        frame = read_manifest(self.manifest)
        texts = frame.loc[frame["split"] == "train", "text"].astype(str).tolist()
        return build_model(self.config, tokenizer_texts=texts)

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
                                        epoch=epoch, start_batch=start_batch, stop_batch=used)
            loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collator, num_workers=workers,
                                pin_memory=self.device.type == "cuda", worker_init_fn=runtime.seed_worker,
                                persistent_workers=False)
            yield from loader
            epoch, start_batch = epoch + 1, 0

    def _micro_batches_of_epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        """The micro-batches one epoch trains on, in order (for inspection and tests)."""
        used = self.steps_per_epoch * self.config.accumulation_steps
        sampler = EpochBatchSampler(len(self.dataset), self.config.micro_batch_size, self.config.seed, epoch=epoch,
                                    stop_batch=used)
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
        A second Ctrl-C aborts at once.
        """
        config = self.config
        logger.info("training on %s (%s): %d steps, micro-batch %d x %d accumulation = effective batch %d, "
                    "negatives=%s, queue=%d", self.device, self.precision, self.total_steps, config.micro_batch_size,
                    config.accumulation_steps, config.effective_batch_size, config.negatives, config.queue_size)
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
                    if self.step % config.checkpoint_every == 0 and self.step < self.total_steps:
                        self.save()
        finally:
            bar.close()

        self.save()
        if self.stop_requested:
            self.history.interrupted = True
            logger.warning("stopped by interrupt after step %d; resume with msd_core.train.resume(%r)",
                           self.step, str(self.output_dir))
        else:
            self._write_loss_curve()
        return self.history

    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, Any]:
        """Run one optimizer step on k micro-batches and return its history record."""
        started = time.perf_counter()
        skipped_rows = sum(batch["skipped"] for batch in micro_batches)
        micro_batches = [self._to_device(batch) for batch in micro_batches if len(batch["index"]) > 0]
        if not micro_batches:
            raise RuntimeError(f"step {self.step}: every image of the step's micro-batches was unreadable")
        alpha = self.alpha_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)

        output = self._accumulate(micro_batches, alpha)
        finite = math.isfinite(output.loss)
        if not finite:
            self._handle_non_finite(output)

        stepped = finite and self._optimizer_step()
        self.scheduler.step()
        if stepped:
            self.teacher.update()
            if self.image_queue is not None:
                self.image_queue.enqueue(output.teacher_image, output.ids)
                self.text_queue.enqueue(output.teacher_text, output.ids)

        self.step += 1
        self.skipped_rows += skipped_rows
        pairs = sum(len(batch["index"]) for batch in micro_batches)
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
                scale_loss=self.scaler.scale,
            )
        except torch.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingOutOfMemoryError(self._out_of_memory_message(micro_batches[0])) from None

    def _optimizer_step(self) -> bool:
        """Unscale, clip, step; returns False when the fp16 scaler skipped the step (inf gradients)."""
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
        """Everything an exact resume needs (see ``msd_core.checkpoint``)."""
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": _python_random_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "step": self.step,
            "config": self.config.to_dict(),
            "model_spec": vars(self.model.spec).copy(),
            "model": self.model.state_dict(),
            "teacher": self.teacher.state_dict(),
            "image_queue": self.image_queue.state_dict() if self.image_queue is not None else None,
            "text_queue": self.text_queue.state_dict() if self.text_queue is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "history": self.history.records,
            "skipped_steps": self.skipped_steps,
            "skipped_rows": self.skipped_rows,
            "dropped_rows": dict(self.dataset.dropped),
            "manifest": str(self.manifest),
        }

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
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        _set_python_random_state(rng["python"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def save(self) -> Path:
        """Write a checkpoint, its provenance sidecar and the history CSV; returns the checkpoint path."""
        last = self.history.records[-1] if self.history.records else {}
        provenance = {
            "step": self.step,
            "loss": last.get("loss"),
            "config": self.config.to_dict(),
            "versions": runtime.package_versions(),
            "git_commit": runtime.git_commit(),
            "device": str(self.device),
            "precision": self.precision,
            "manifest": str(self.manifest),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        state = {**self.state_dict(), "provenance": provenance}
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
           progress: bool = True) -> History:
    """Continue a run from a checkpoint file, or from the newest readable one in a run folder.

    Args:
        checkpoint: a ``step-*.pt`` file, a run's output folder, or its ``checkpoints`` folder.
        device: where to continue; None picks CUDA when available.
        max_steps: train to this many steps in total instead of the saved config's.
        progress: show a progress bar.
    """
    return load_trainer(checkpoint, device=device, max_steps=max_steps, progress=progress).fit()


def load_trainer(checkpoint: str | Path, *, device: str | torch.device | None = None, max_steps: int | None = None,
                 progress: bool = True) -> Trainer:
    """Rebuild a ``Trainer`` in the exact state a checkpoint recorded."""
    path, state = find_checkpoint(checkpoint)
    logger.info("resuming from %s (step %d)", path, state["step"])
    config = TrainConfig.from_dict(state["config"])
    if max_steps is not None:
        config = config.replace(max_steps=max_steps)
    if config.manifest is None:
        config = config.replace(manifest=state["manifest"])
    trainer = Trainer(config, device=device, state=state, progress=progress)
    trainer.last_checkpoint = path
    return trainer


def load_model(checkpoint: str | Path, *, device: str | torch.device = "cpu", teacher: bool = False) -> DualEncoder:
    """Load a trained model (the student, or the EMA teacher) from a checkpoint, in eval mode."""
    path, state = find_checkpoint(checkpoint, map_location="cpu")
    model = DualEncoder.from_spec(ModelSpec(**state["model_spec"]))
    model.load_state_dict(state["teacher"]["model"] if teacher else state["model"])
    return model.to(runtime.resolve_device(device)).eval()
