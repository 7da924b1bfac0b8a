"""Tests of msd_core.imageio.load_image on PNG, JPEG and DICOM files made here."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from msd_core import imageio
from msd_core.imageio import ImageReadError, load_image

pydicom = pytest.importorskip("pydicom")


def gradient(height: int = 32, width: int = 48, maximum: int = 255) -> np.ndarray:
    """Return an (H, W) ramp from 0 to ``maximum`` along the width."""
    row = np.linspace(0, maximum, width)
    return np.tile(row, (height, 1))


def write_dicom(path, stored: np.ndarray, **attributes) -> None:
    """Write a 16-bit single-frame MONOCHROME2 DICOM file; ``attributes`` override header fields."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CR"
    dataset.Rows, dataset.Columns = stored.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = 16
    dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 0
    dataset.PixelData = stored.astype(np.uint16).tobytes()
    for name, value in attributes.items():
        setattr(dataset, name, value)
    dataset.save_as(path, enforce_file_format=True)


def two_halves(left: int, right: int) -> np.ndarray:
    stored = np.full((16, 16), right, dtype=np.uint16)
    stored[:, :8] = left
    return stored


@pytest.fixture(autouse=True)
def fresh_warning_counts(monkeypatch):
    monkeypatch.setattr(imageio, "_range_warning_counts", {})


def test_png_8bit_round_trip(tmp_path):
    pixels = gradient().astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "grey.png")

    loaded = load_image(tmp_path / "grey.png")

    assert loaded.dtype == np.float32
    assert loaded.shape == pixels.shape
    assert np.allclose(loaded, pixels / 255.0, atol=1e-6)


def test_png_16bit_round_trip(tmp_path):
    pixels = gradient(maximum=65535).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")

    loaded = load_image(tmp_path / "deep.png")

    assert loaded.dtype == np.float32
    assert loaded.shape == pixels.shape
    assert np.allclose(loaded, pixels / 65535.0, atol=1e-6)


def test_jpeg_round_trip_close(tmp_path):
    pixels = gradient().astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "grey.jpg", quality=95)

    loaded = load_image(tmp_path / "grey.jpg")

    assert loaded.shape == pixels.shape
    assert np.abs(loaded - pixels / 255.0).mean() < 2.0 / 255.0


def test_rgba_png_becomes_grey(tmp_path):
    grey = gradient().astype(np.uint8)
    rgba = np.stack([grey, grey, grey, np.full_like(grey, 255)], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "colour.png")

    loaded = load_image(tmp_path / "colour.png")

    assert loaded.shape == grey.shape
    assert np.allclose(loaded, grey / 255.0, atol=1.0 / 255.0)


def test_monochrome1_low_values_bright(tmp_path):
    write_dicom(tmp_path / "inverted.dcm", two_halves(left=100, right=3000), PhotometricInterpretation="MONOCHROME1")

    loaded = load_image(tmp_path / "inverted.dcm")

    assert loaded[:, :8].mean() > loaded[:, 8:].mean()
    assert np.allclose(loaded[:, :8], 1.0)
    assert np.allclose(loaded[:, 8:], 0.0)


def test_monochrome2_low_values_dark(tmp_path):
    write_dicom(tmp_path / "plain.dcm", two_halves(left=100, right=3000))

    loaded = load_image(tmp_path / "plain.dcm")

    assert np.allclose(loaded[:, :8], 0.0)
    assert np.allclose(loaded[:, 8:], 1.0)


def test_rescale_slope_intercept_applied(tmp_path):
    # Stored 500 and 750 are 0 and 500 after the modality LUT; a window over [0, 500]
    # maps them to 0 and 1. Without the rescale both would clip to 1.
    write_dicom(tmp_path / "rescaled.dcm", two_halves(left=500, right=750), RescaleSlope=2, RescaleIntercept=-1000)

    loaded = load_image(tmp_path / "rescaled.dcm", window=(250, 500))

    assert np.allclose(loaded[:, :8], 0.0)
    assert np.allclose(loaded[:, 8:], 1.0)


def test_stored_window_applied(tmp_path):
    write_dicom(tmp_path / "windowed.dcm", two_halves(left=1000, right=1500), WindowCenter=1000, WindowWidth=1000)

    loaded = load_image(tmp_path / "windowed.dcm")

    assert np.allclose(loaded[:, :8], 0.5)
    assert np.allclose(loaded[:, 8:], 1.0)


def test_window_argument_overrides_file(tmp_path):
    write_dicom(tmp_path / "windowed.dcm", two_halves(left=1000, right=1500), WindowCenter=1000, WindowWidth=1000)

    loaded = load_image(tmp_path / "windowed.dcm", window=(1500, 1000))

    assert np.allclose(loaded[:, :8], 0.0)
    assert np.allclose(loaded[:, 8:], 0.5)


def test_dicom_marker_without_suffix(tmp_path):
    write_dicom(tmp_path / "no_suffix", two_halves(left=0, right=10))

    loaded = load_image(tmp_path / "no_suffix")

    assert np.allclose(loaded[:, 8:], 1.0)


def test_truncated_png_names_file(tmp_path):
    Image.fromarray(gradient().astype(np.uint8)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])

    with pytest.raises(ImageReadError) as error:
        load_image(tmp_path / "cut.png")

    assert "cut.png" in str(error.value)


def test_text_renamed_png_names_file(tmp_path):
    (tmp_path / "notes.png").write_text("not an image\n")

    with pytest.raises(ImageReadError) as error:
        load_image(tmp_path / "notes.png")

    assert "notes.png" in str(error.value)


def test_missing_file_names_file(tmp_path):
    with pytest.raises(ImageReadError) as error:
        load_image(tmp_path / "absent.png")

    assert "absent.png" in str(error.value)
    assert "not found" in str(error.value)


def test_text_renamed_dcm_names_file(tmp_path):
    (tmp_path / "report.dcm").write_text("FINDINGS: none\n")

    with pytest.raises(ImageReadError) as error:
        load_image(tmp_path / "report.dcm")

    assert "report.dcm" in str(error.value)


def test_constant_image_logs_warning(tmp_path, caplog):
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(tmp_path / "flat.png")

    with caplog.at_level(logging.WARNING, logger="msd_core.imageio"):
        loaded = load_image(tmp_path / "flat.png")

    assert np.allclose(loaded, 128 / 255.0)
    assert "flat.png" in caplog.text
    assert "constant" in caplog.text


def test_range_warnings_rate_limited(tmp_path, caplog):
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "black.png")

    with caplog.at_level(logging.WARNING, logger="msd_core.imageio"):
        for _ in range(imageio.MAX_RANGE_WARNINGS + 3):
            load_image(tmp_path / "black.png")

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == imageio.MAX_RANGE_WARNINGS
