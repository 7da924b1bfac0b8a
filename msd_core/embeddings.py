"""Embedding a whole dataset with a trained model, with an on-disk cache.

``embed(model, dataset)`` runs the image and text towers over every pair of an
``ImageTextDataset`` in eval mode and returns an ``Embeddings``: image and text matrices
and the manifest rows they belong to.

With ``cache_dir`` the result is saved as an ``.npz`` file named by a hash of everything
the numbers depend on. The hash covers the model's weights and preprocessing settings,
the manifest's bytes, the rows of the split, and the size and modification time of
every image file. A changed checkpoint, manifest, split or image therefore misses the
cache, and an unchanged one is read back without running the model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import ImageTextDataset, PairCollator

logger = logging.getLogger(__name__)

# Bump when a change to ``embed`` alters the numbers it produces for the same inputs.
CACHE_VERSION = 1


@dataclass
class Embeddings:
    """Image and text embeddings of a dataset's pairs, row i of each belonging to ``frame`` row i.

    Attributes:
        image: (N, D) float32 L2-normalised image embeddings.
        text: (N, D) float32 L2-normalised text embeddings.
        frame: the dataset's manifest rows in dataset order (column ``row`` is the row
            number in the manifest file). Rows whose image could not be read under
            ``skip_bad_rows=True`` are left out of all three.
    """

    image: np.ndarray
    text: np.ndarray
    frame: pd.DataFrame

    def __len__(self) -> int:
        return len(self.image)

    @property
    def texts(self) -> list[str]:
        """The reports, in row order."""
        return self.frame["text"].astype(str).tolist()


def embed(model, dataset: ImageTextDataset, *, batch_size: int = 64, device: str | torch.device = "cpu",
          cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Embeddings:
    """Embed every image and report of ``dataset`` with ``model``.

    The model is moved to ``device`` and run in eval mode under ``torch.no_grad()``;
    its train/eval mode is restored afterwards, and it stays on ``device``.

    Args:
        model: a ``DualEncoder`` (anything with ``encode_image``, ``encode_text``,
            ``tokenizer`` and ``spec``).
        dataset: the pairs to embed, usually ``ImageTextDataset.for_model(manifest,
            model, split="test")``.
        batch_size: pairs per forward pass.
        device: where to run the model.
        cache_dir: folder for cached results; None disables the cache.
        progress: show a progress bar.

    Returns:
        An ``Embeddings`` with (N, D) float32 ``image`` and ``text`` matrices.
    """
    if batch_size < 1:
        raise ValueError(f"invalid batch_size={batch_size}: must be a positive number of pairs")
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"embeddings-{cache_key(model, dataset)[:32]}.npz"
        cached = _read_cache(cache_path, dataset)
        if cached is not None:
            logger.info("read %d cached embeddings from %s", len(cached), cache_path)
            return cached

    result = _run_model(model, dataset, batch_size, torch.device(device), progress)
    if cache_path is not None:
        _write_cache(cache_path, result)
        logger.info("cached %d embeddings in %s", len(result), cache_path)
    return result


def _run_model(model, dataset: ImageTextDataset, batch_size: int, device: torch.device,
               progress: bool) -> Embeddings:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                        collate_fn=PairCollator(model.tokenizer, model.spec.max_text_length))
    was_training = model.training
    model.to(device).eval()
    images, texts, rows = [], [], []
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="embedding", unit="batch", disable=not progress, dynamic_ncols=True):
                if len(batch["index"]) == 0:
                    continue
                image = model.encode_image(batch["pixel_values"].to(device))  # (b, D)
                text = model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (b, D)
                images.append(image.float().cpu().numpy())
                texts.append(text.float().cpu().numpy())
                rows.append(batch["index"].numpy())
    finally:
        model.train(was_training)

    if not rows:
        raise ValueError(f"no pairs to embed in {dataset.manifest_path}: the split is empty or every image "
                         "was unreadable")
    return Embeddings(np.concatenate(images), np.concatenate(texts), _frame_of_rows(dataset, np.concatenate(rows)))


def _frame_of_rows(dataset: ImageTextDataset, rows: np.ndarray) -> pd.DataFrame:
    """Select the dataset's frame rows whose manifest row is in ``rows``, in dataset order."""
    frame = dataset.frame
    return frame[frame["row"].isin(rows)].reset_index(drop=True)


def cache_key(model, dataset: ImageTextDataset) -> str:
    """SHA-256 hex digest of everything the embeddings of ``dataset`` under ``model`` depend on."""
    digest = hashlib.sha256(f"msd_core embeddings v{CACHE_VERSION}\n".encode())
    digest.update(state_dict_digest(model).encode())
    spec = model.spec
    settings = (spec.image_size, spec.image_channels, tuple(spec.image_mean), tuple(spec.image_std),
                spec.max_text_length, spec.text_pooling, dataset.image_size, dataset.image_channels,
                dataset.mean.flatten().tolist(), dataset.std.flatten().tolist())
    digest.update(repr(settings).encode())
    digest.update(file_digest(dataset.manifest_path).encode())
    digest.update(np.ascontiguousarray(dataset.frame["row"].to_numpy(dtype=np.int64)).tobytes())
    for position in range(len(dataset)):
        stat = dataset.image_file(position).stat()
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def state_dict_digest(model: torch.nn.Module) -> str:
    """SHA-256 hex digest of a model's parameter and buffer names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_cache(path: Path, dataset: ImageTextDataset) -> Embeddings | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as stored:
            image, text, rows = stored["image"], stored["text"], stored["rows"]
    except (OSError, KeyError, ValueError) as error:
        logger.warning("ignoring unreadable embedding cache %s (%s); recomputing", path, error)
        return None
    return Embeddings(image, text, _frame_of_rows(dataset, rows))


def _write_cache(path: Path, embeddings: Embeddings) -> None:
    """Write atomically, so an interrupted write never leaves a truncated cache file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, image=embeddings.image, text=embeddings.text,
                     rows=embeddings.frame["row"].to_numpy(dtype=np.int64))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
