"""Manifest-based image-text dataset, image transforms, batching and sampling.

``ImageTextDataset`` reads one manifest (see ``msd_core.manifest``), checks every row
once at construction, and returns normalised image tensors with their report text.
Tokenisation happens per batch in ``PairCollator``, where the tokenizer can pad to the
longest report of the batch.

Bad rows: a missing image, an empty or whitespace-only report, or an image path that
leaves the manifest's folder raise ``ManifestError`` naming the row, unless
``skip_bad_rows=True``, in which case they are dropped, counted by reason in
``dataset.dropped`` and logged once. An image that exists but cannot be decoded is found
only when it is loaded: it raises ``ImageReadError`` naming the row, or, with skipping,
is left out of its batch and counted in the batch's ``skipped`` entry.

Messages name a row as "row N of FILE (line L)": N is the 0-based data row (the item's
``index``), and L is the line of the CSV file on which that row starts, counting the
header as line 1.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset, Sampler

from .imageio import ImageReadError, load_image
from .manifest import ManifestError, read_manifest

logger = logging.getLogger(__name__)


class ImageTextDataset(Dataset):
    """Image-text pairs listed in a manifest CSV.

    Args:
        manifest: path of the manifest CSV.
        split: keep only rows of this split ("train", "val", "test"), or all rows if None.
        image_size: images are padded to a square and resized to image_size x image_size.
        image_channels: 1, or 3 to repeat greyscale for encoders that expect RGB.
        image_mean, image_std: per-channel normalisation applied after scaling to [0, 1].
        skip_bad_rows: drop bad rows and count them instead of raising.

    Items are dicts: ``pixel_values`` (C, H, W) float32, ``text`` str, ``index`` (row in
    the manifest), ``study_index`` (an integer per distinct ``study_id``).
    """

    def __init__(self, manifest: str | os.PathLike, *, split: str | None = None, image_size: int = 64,
                 image_channels: int = 1, image_mean: Sequence[float] = (0.5,), image_std: Sequence[float] = (0.25,),
                 skip_bad_rows: bool = False):
        if image_channels not in (1, 3):
            raise ValueError(f"invalid image_channels={image_channels}: must be 1 or 3")
        self.manifest_path = Path(manifest)
        self.root = self.manifest_path.parent
        self.image_size = image_size
        self.image_channels = image_channels
        self.mean = torch.tensor(_per_channel(image_mean, image_channels)).view(-1, 1, 1)
        self.std = torch.tensor(_per_channel(image_std, image_channels)).view(-1, 1, 1)
        self.skip_bad_rows = skip_bad_rows
        self.dropped: Counter[str] = Counter()
        self._row_lines: list[int] | None = None

        frame = read_manifest(self.manifest_path)
        frame["study_index"] = frame["study_id"].astype(str).factorize()[0]
        if split is not None:
            if split not in set(frame["split"]):
                raise ManifestError(f"{self.manifest_path}: no rows with split={split!r}; "
                                    f"splits present: {sorted(set(frame['split']))}")
            frame = frame[frame["split"] == split]
        self.frame = self._drop_bad_rows(frame).reset_index(drop=False).rename(columns={"index": "row"})

    @classmethod
    def for_model(cls, manifest: str | os.PathLike, model, **kwargs) -> "ImageTextDataset":
        """Build the dataset with the image size, channels and normalisation a model expects."""
        spec = model.spec
        return cls(manifest, image_size=spec.image_size, image_channels=spec.image_channels,
                   image_mean=spec.image_mean, image_std=spec.image_std, **kwargs)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def texts(self) -> list[str]:
        """The reports, in dataset order."""
        return self.frame["text"].tolist()

    def image_file(self, position: int) -> Path:
        """Absolute path of the image of item ``position``."""
        return self.root / self.frame["image_path"].iat[position]

    def __getitem__(self, position: int) -> dict | None:
        row = self.frame.iloc[position]
        try:
            pixels = load_image(self.root / row["image_path"])
        except ImageReadError as error:
            if self.skip_bad_rows:
                logger.warning("skipping %s: %s", self._row_location(row["row"]), error)
                return None
            raise ImageReadError(f"{self._row_location(row['row'])}: {error}") from None
        return {
            "pixel_values": self.transform(pixels),
            "text": row["text"],
            "index": int(row["row"]),
            "study_index": int(row["study_index"]),
        }

    def transform(self, pixels: np.ndarray) -> torch.Tensor:
        """Turn an (H, W) image in [0, 1] into a normalised (C, S, S) tensor.

        The image is padded with black to a square (keeping the aspect ratio, as chest
        X-rays are rarely square) and resized with antialiasing.
        """
        image = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))  # (H, W)
        height, width = image.shape
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        image = F.pad(image, (left, side - width - left, top, side - height - top))  # (S0, S0)
        if side != self.image_size:
            image = F.interpolate(image[None, None], size=(self.image_size, self.image_size), mode="bilinear",
                                  antialias=True, align_corners=False)[0, 0]  # (S, S)
        image = image.clamp(0.0, 1.0).expand(self.image_channels, -1, -1)  # (C, S, S)
        return (image - self.mean) / self.std

    def _drop_bad_rows(self, frame):
        root = os.path.normpath(os.path.abspath(self.root))
        keep = []
        for row, image_path, text in zip(frame.index, frame["image_path"], frame["text"]):
            reason = _row_problem(root, str(image_path), text)
            if reason is None:
                keep.append(True)
                continue
            if not self.skip_bad_rows:
                raise ManifestError(f"{self._row_location(row)}: {reason}; fix the row, or pass "
                                    "skip_bad_rows=True (--skip-bad-rows) to drop such rows")
            self.dropped[reason.split(":")[0]] += 1
            keep.append(False)
        if self.dropped:
            summary = ", ".join(f"{count} {reason}" for reason, count in self.dropped.items())
            logger.warning("dropped %d of %d rows of %s: %s", sum(self.dropped.values()), len(frame),
                           self.manifest_path, summary)
        return frame[np.array(keep, dtype=bool)] if len(keep) else frame

    def _row_location(self, row: int) -> str:
        """Return where data row ``row`` (0-based) is, as "row N of FILE (line L)", for messages."""
        if self._row_lines is None:
            self._row_lines = _row_start_lines(self.manifest_path)
        # A row past the end means the file changed or could not be read again. Without
        # multi-line cells, a row starts on line row + 2.
        line = self._row_lines[row] if row < len(self._row_lines) else row + 2
        return f"row {row} of {self.manifest_path} (line {line})"


def _row_start_lines(path: Path) -> list[int]:
    """Return the 1-based line on which each data row of the CSV file at ``path`` starts.

    A quoted cell may span several lines, so a row's line is not always its index + 2.
    Blank lines are skipped, as ``pandas.read_csv`` skips them. A file that cannot be
    read again gives an empty list, so that the error being reported is not replaced.
    """
    starts = []
    try:
        with open(path, encoding="utf-8", newline="") as stream:
            reader = csv.reader(stream)
            previous_end = 0
            for record in reader:
                if record:
                    starts.append(previous_end + 1)
                previous_end = reader.line_num
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        logger.debug("failed to count the lines of %s: %s", path, error)
        return []
    return starts[1:]  # the first record is the header


def _row_problem(root: str, image_path: str, text) -> str | None:
    """Return why a manifest row cannot be used, or None."""
    if not isinstance(text, str) or not text.strip():
        return "empty report: the text column is empty or whitespace only"
    if not image_path.strip():
        return "missing image path: the image_path column is empty"
    full = os.path.normpath(os.path.join(root, image_path))
    if os.path.commonpath([root, full]) != root:
        return f"image path outside the manifest folder: {image_path} (move the images under {root})"
    if not os.path.isfile(full):
        return f"image not found: {full}"
    return None


def _per_channel(values: Sequence[float], channels: int) -> list[float]:
    values = list(values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return [float(np.mean(values))]
    raise ValueError(f"normalisation has {len(values)} values but the encoder expects {channels} channels")


class PairCollator:
    """Stack images and tokenise reports into one batch.

    Returns a dict with ``pixel_values`` (N, C, H, W), ``input_ids`` and
    ``attention_mask`` (N, L), ``index`` and ``study_index`` (N,), ``texts`` (list of N
    reports) and ``skipped`` (items dropped because their image could not be read).
    """

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, items: list[dict | None]) -> dict:
        kept = [item for item in items if item is not None]
        texts = [item["text"] for item in kept]
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt", return_token_type_ids=False)
        return {
            "pixel_values": torch.stack([item["pixel_values"] for item in kept]),
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "index": torch.tensor([item["index"] for item in kept], dtype=torch.long),
            "study_index": torch.tensor([item["study_index"] for item in kept], dtype=torch.long),
            "texts": texts,
            "skipped": len(items) - len(kept),
        }


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled micro-batches whose order depends only on (seed, epoch): resumable exactly.

    Each epoch draws a permutation from a generator seeded with ``seed + epoch`` and
    cuts it into full global micro-batches of ``world_size * batch_size`` rows (the
    remainder is dropped, so every optimizer step has the same effective batch). Rank r
    takes rows ``r * batch_size`` to ``(r + 1) * batch_size`` of each global micro-batch,
    so the ranks never share a row, and the rows of global micro-batch j over all ranks
    are exactly micro-batch j of one process with a micro-batch of
    ``world_size * batch_size``. ``start_batch`` skips the first global micro-batches of
    the epoch, which is how a resumed run continues mid-epoch. ``stop_batch`` ends the
    epoch early, because the training loop uses whole optimizer steps of k micro-batches
    only.

    Args:
        size: number of rows in the dataset.
        batch_size: rows per micro-batch on one rank (b).
        seed: the run's seed; epoch e uses ``seed + e``.
        epoch: which epoch's permutation to cut.
        start_batch, stop_batch: range of global micro-batch indices to yield.
        rank, world_size: this process's rank and the number of processes.
    """

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int = 0, start_batch: int = 0,
                 stop_batch: int | None = None, *, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank={rank} with world_size={world_size}: need 0 <= rank < world_size")
        global_batch = batch_size * world_size
        if size < global_batch:
            if world_size == 1:
                raise ValueError(f"the dataset has {size} rows, fewer than one micro-batch of {batch_size}; "
                                 "use a smaller micro_batch_size or more data")
            raise ValueError(f"the dataset has {size} rows, fewer than one micro-batch of {batch_size} on each "
                             f"of {world_size} processes ({global_batch} rows); use a smaller micro_batch_size, "
                             "fewer processes or more data")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.start_batch = epoch, start_batch
        self.rank, self.world_size = rank, world_size
        full = size // global_batch
        self.stop_batch = full if stop_batch is None else min(stop_batch, full)

    def __len__(self) -> int:
        return max(0, self.stop_batch - self.start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        for batch in range(self.start_batch, self.stop_batch):
            first = (batch * self.world_size + self.rank) * self.batch_size
            yield order[first:first + self.batch_size]
