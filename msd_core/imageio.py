"""Read one radiograph from disk as a float32 greyscale array in [0, 1].

Supported inputs:

- PNG with 8 or 16 bits per sample, JPEG, and any other format Pillow opens. Colour
  images are reduced to luminance with Pillow's ``convert("L")``, which drops alpha.
  8-bit data is divided by 255 and 16-bit data by 65535, so stored values keep their
  meaning across files.
- DICOM through pydicom, imported only when a DICOM file is read. The modality LUT
  (RescaleSlope, RescaleIntercept) is applied first, then a linear window from
  ``window=(center, width)``, else from the file's WindowCenter/WindowWidth, else
  the image's own min-max. MONOCHROME1 images are inverted afterwards, so that
  dense tissue (bone) is bright in every output.

``load_image`` is called once per sample by the data loader, so the PNG path does
no more than decode, convert and scale.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
# Files with these suffixes are decoded by Pillow without checking for a DICOM marker.
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")

# Warnings about odd pixel ranges come from every loader call, so each reason is
# logged at WARNING this many times per process and at DEBUG after that.
MAX_RANGE_WARNINGS = 5
_range_warning_counts: dict = {}

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageReadError(ValueError):
    """An image file that is missing, truncated, or not an image that can be decoded."""


def load_image(path: str | os.PathLike, *, window: Optional[Tuple[float, float]] = None) -> np.ndarray:
    """Load a PNG, JPEG or DICOM file as greyscale intensities.

    Args:
        path: the image file. Files ending in ``.dcm``/``.dicom``/``.dic``, or
            carrying the ``DICM`` marker at byte 128, are read as DICOM.
        window: ``(center, width)`` of a linear display window in modality units
            (after rescale slope/intercept). It applies to DICOM only and overrides
            the window stored in the file.

    Returns:
        float32 array of shape (H, W) with values in [0, 1].

    Raises:
        ImageReadError: the file is missing, truncated or not a decodable image. The
            message names the file and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image not found: {path}; check the path or rerun the data_prep step that wrote it")

    if _is_dicom(path):
        return _load_dicom(path, window)
    if window is not None:
        logger.debug("window=%s ignored for non-DICOM image %s", window, path)
    return _load_pillow(path)


def _is_dicom(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix in PILLOW_SUFFIXES:
        return False
    with open(path, "rb") as stream:
        header = stream.read(132)
    return len(header) == 132 and header[128:132] == b"DICM"


def _load_pillow(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            pixels = _pillow_to_unit_range(image, path)
    except UnidentifiedImageError:
        raise ImageReadError(
            f"not an image file Pillow can read: {path}; check that the file is a PNG or JPEG"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        # Pillow raises OSError ("image file is truncated") or SyntaxError (broken
        # PNG chunks) for damaged files.
        raise ImageReadError(
            f"cannot decode image {path}: {error}; the file is probably truncated, download it again"
        ) from None

    _check_range(pixels, path)
    return pixels


def _pillow_to_unit_range(image: Image.Image, path: Path) -> np.ndarray:
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        return np.asarray(image, dtype=np.float32) * np.float32(1.0 / 65535.0)  # (H, W)

    if mode == "I":
        # Older Pillow versions open 16-bit greyscale PNG as 32-bit "I".
        values = np.asarray(image, dtype=np.float32)  # (H, W)
        if values.size and values.min() >= 0 and values.max() <= 65535:
            return values * np.float32(1.0 / 65535.0)
        return _min_max(values, path)

    if mode == "F":
        return _min_max(np.asarray(image, dtype=np.float32), path)

    if mode != "L":
        image = image.convert("L")
    return np.asarray(image, dtype=np.float32) * np.float32(1.0 / 255.0)  # (H, W)


def _load_dicom(path: Path, window: Optional[Tuple[float, float]]) -> np.ndarray:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:
        raise ImportError(
            f"reading {path} needs pydicom; install it with: pip install 'msd-core[dicom]' (or pip install pydicom)"
        ) from None

    try:
        dataset = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError) as error:
        raise ImageReadError(f"cannot read DICOM file {path}: {error}") from None
    if "PixelData" not in dataset:
        raise ImageReadError(f"DICOM file {path} has no pixel data (it may be a report or a structured document)")

    try:
        values = dataset.pixel_array.astype(np.float32)
    except Exception as error:  # pydicom raises many types for missing codecs and short data
        raise ImageReadError(
            f"cannot decode the pixel data of DICOM file {path}: {error}; compressed files may need "
            "pylibjpeg or python-gdcm installed"
        ) from None

    values = _first_grey_frame(values, dataset, path)
    values = _apply_rescale(values, dataset)
    pixels = _apply_window(values, dataset, window, path)

    if str(dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        pixels = 1.0 - pixels

    _check_range(pixels, path)
    return pixels.astype(np.float32, copy=False)


def _first_grey_frame(values: np.ndarray, dataset, path: Path) -> np.ndarray:
    samples = int(dataset.get("SamplesPerPixel", 1))
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        logger.warning("%s has %d frames; using the first", path, frames)
        values = values[0]
    if samples > 1 and values.ndim == 3:
        values = values[..., :3].mean(axis=-1)  # (H, W, C) -> (H, W)
    return values


def _apply_rescale(values: np.ndarray, dataset) -> np.ndarray:
    slope = float(dataset.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(dataset.get("RescaleIntercept", 0.0) or 0.0)
    if slope != 1.0 or intercept != 0.0:
        values = values * np.float32(slope) + np.float32(intercept)
    return values


def _apply_window(values: np.ndarray, dataset, window: Optional[Tuple[float, float]], path: Path) -> np.ndarray:
    if window is None:
        window = _stored_window(dataset)
    if window is None:
        return _min_max(values, path)

    center, width = float(window[0]), float(window[1])
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width} for {path}")
    # A linear ramp from center - width/2 to center + width/2: DICOM's LINEAR_EXACT
    # function. Its default LINEAR function ends one stored unit lower at the top.
    lower = center - width / 2.0
    return np.clip((values - np.float32(lower)) / np.float32(width), 0.0, 1.0)


def _stored_window(dataset) -> Optional[Tuple[float, float]]:
    center = dataset.get("WindowCenter")
    width = dataset.get("WindowWidth")
    if center is None or width is None:
        return None

    # Several windows may be stored; the first is the one viewers show by default.
    if not isinstance(center, (int, float)):
        center = center[0]
    if not isinstance(width, (int, float)):
        width = width[0]
    if float(width) <= 0:
        return None
    return float(center), float(width)


def _min_max(values: np.ndarray, path: Path) -> np.ndarray:
    low = float(np.nanmin(values)) if values.size else 0.0
    high = float(np.nanmax(values)) if values.size else 0.0
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - np.float32(low)) / np.float32(high - low)).astype(np.float32, copy=False)


def _check_range(pixels: np.ndarray, path: Path) -> None:
    if pixels.size == 0:
        raise ImageReadError(f"image {path} has no pixels")
    # min() and max() return NaN when any pixel is NaN, which saves a separate pass.
    low = float(pixels.min())
    high = float(pixels.max())
    if np.isnan(low) or np.isnan(high):
        _warn_range(path, "nan", "contains NaN values")
    elif high - low < 1e-6:
        _warn_range(path, "constant", f"is constant (every pixel is {low:.3f})")
    elif high < 1.0 / 16.0:
        reason = f"only reaches {high:.4f} of full scale (a very dark image, or 12-bit data in a 16-bit file)"
        _warn_range(path, "dark", reason)


def _warn_range(path: Path, kind: str, reason: str) -> None:
    count = _range_warning_counts.get(kind, 0) + 1
    _range_warning_counts[kind] = count
    if count <= MAX_RANGE_WARNINGS:
        suffix = " (further warnings of this kind are logged at DEBUG)" if count == MAX_RANGE_WARNINGS else ""
        logger.warning("image %s %s; check the file%s", path, reason, suffix)
    else:
        logger.debug("image %s %s", path, reason)
