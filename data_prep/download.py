"""Download files into one cache folder, resume partial downloads, verify SHA-256.

The cache folder is ``$MSD_DATA_DIR`` (default ``~/.cache/msd``), with one subfolder
per dataset. A download first goes to ``<name>.part``. When that file exists from an
interrupted run, ``fetch`` asks the server for the remaining bytes with an HTTP
``Range`` header and appends them. It starts over when the server ignores the
range. The finished file is renamed into place only after its SHA-256 matches, where
a hash is known.

Credentialed or licensed datasets cannot be downloaded by a script.
``ManualDownloadRequired`` and ``manual_download_message`` say what to download by
hand, from where, and where to put it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

DEFAULT_DATA_DIR = "~/.cache/msd"
CHUNK_BYTES = 1 << 20

# Manual download instructions per dataset: the files, their source and their place.
# "{folder}" is replaced with the target folder.
MANUAL_DOWNLOADS = {
    "iu_xray": (
        "IU X-ray (Open-i) is public (CC BY-NC-ND 4.0). `python -m data_prep iu_xray --download` fetches it. "
        "By hand: download https://openi.nlm.nih.gov/imgs/collections/NLMCXR_reports.tgz and "
        "https://openi.nlm.nih.gov/imgs/collections/NLMCXR_png.tgz , put NLMCXR_reports.tgz in {folder} "
        "and extract NLMCXR_png.tgz into {folder}/NLMCXR_png/. "
        "The optional view-position table nlmcxr_dicom_metadata.csv.gz is in the torchxrayvision wheel "
        "(torchxrayvision/data/); a wheel is a zip file, so extract the table with unzip and copy it into "
        "{folder}, without pip-installing that package, which would replace your torch build."
    ),
    "mimic_cxr": (
        "MIMIC-CXR-JPG is credentialed: create a PhysioNet account, complete the required training, and sign "
        "the data use agreement at https://physionet.org/content/mimic-cxr-jpg/2.0.0/ . Download into {folder}: "
        "mimic-cxr-2.0.0-split.csv.gz, mimic-cxr-2.0.0-metadata.csv.gz, mimic-cxr-2.0.0-chexpert.csv.gz and "
        "the files/ tree of JPG images (for example with `wget -r -N -c -np --user USER --ask-password "
        "https://physionet.org/files/mimic-cxr-jpg/2.0.0/`). The reports come from MIMIC-CXR (not -JPG) at "
        "https://physionet.org/content/mimic-cxr/2.0.0/ : extract mimic-cxr-reports.zip into {folder}, so "
        "that {folder}/files/p10/p10000032/s50414267.txt exists."
    ),
    "chexpert_5x200": (
        "CheXpert is released under the Stanford University research use agreement. Register and download "
        "CheXpert-v1.0-small (or CheXpert-v1.0) from https://stanfordaimi.azurewebsites.net/datasets "
        "(search for CheXpert), and extract it into {folder}, so that {folder}/CheXpert-v1.0-small/train.csv "
        "and {folder}/CheXpert-v1.0-small/train/patient00001/ exist."
    ),
    "rsna": (
        "RSNA Pneumonia Detection Challenge data is on Kaggle under the competition rules: accept them at "
        "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/rules , then run "
        "`kaggle competitions download -c rsna-pneumonia-detection-challenge` and unzip into {folder}, so that "
        "{folder}/stage_2_train_labels.csv and {folder}/stage_2_train_images/<patientId>.dcm exist."
    ),
    "siim": (
        "SIIM-ACR Pneumothorax Segmentation data is on Kaggle under the competition rules "
        "(https://www.kaggle.com/c/siim-acr-pneumothorax-segmentation). The competition's DICOM files were "
        "published through Google Cloud Healthcare; a commonly used full copy is the Kaggle dataset "
        "'seesee/siim-train-test' (`kaggle datasets download -d seesee/siim-train-test`). Unzip into {folder}, "
        "so that {folder}/train-rle.csv exists and the DICOM files lie anywhere under "
        "{folder}/dicom-images-train/ (they are found by name, <ImageId>.dcm)."
    ),
    "covidx": (
        "COVIDx CXR is assembled from several public sources; the ready-made release is on Kaggle at "
        "https://www.kaggle.com/datasets/andyczhao/covidx-cxr2 (`kaggle datasets download -d "
        "andyczhao/covidx-cxr2`), and the scripts that build it from the sources are at "
        "https://github.com/lindawangg/COVID-Net (docs/COVIDx.md). Unzip into {folder}, so that "
        "{folder}/train.txt, {folder}/test.txt and the image folders {folder}/train/ and {folder}/test/ exist."
    ),
    "folder_csv": (
        "folder_csv reads your own data: a folder of images and a CSV with one row per image, an image-path "
        "column and one or more text columns. Put them anywhere and pass the folder as --root."
    ),
}


class ManualDownloadRequired(FileNotFoundError):
    """Missing files of a dataset that must be downloaded by hand; the message explains how.

    It subclasses ``FileNotFoundError``, so code that handles missing files catches it.
    """

    def __init__(self, dataset: str, detail: str = "", folder: Optional[str | os.PathLike] = None):
        self.dataset = dataset
        message = manual_download_message(dataset, folder)
        super().__init__(f"{detail}\n{message}" if detail else message)


class ChecksumMismatch(RuntimeError):
    """A downloaded file whose SHA-256 differs from the expected one."""


def data_dir() -> Path:
    """Return the cache folder: ``$MSD_DATA_DIR`` or ``~/.cache/msd``."""
    return Path(os.environ.get("MSD_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()


def dataset_dir(dataset: str) -> Path:
    """Return the cache folder of one dataset, ``data_dir() / dataset``."""
    return data_dir() / dataset


def manual_download_message(dataset: str, folder: Optional[str | os.PathLike] = None) -> str:
    """Return the instructions for downloading ``dataset`` by hand into ``folder``.

    ``folder`` defaults to the dataset's cache folder ``data_dir() / dataset``.

    Raises:
        KeyError: ``dataset`` is unknown. The message lists the known names.
    """
    if dataset not in MANUAL_DOWNLOADS:
        raise KeyError(f"unknown dataset {dataset!r}; known: {sorted(MANUAL_DOWNLOADS)}")
    return MANUAL_DOWNLOADS[dataset].format(folder=Path(folder) if folder else dataset_dir(dataset))


def sha256_of(path: str | os.PathLike) -> str:
    """Return the SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(
    url: str,
    filename: str,
    sha256: Optional[str] = None,
    *,
    dataset: str,
    timeout_s: float = 60.0,
) -> Path:
    """Download ``url`` to ``data_dir()/dataset/filename`` unless it is already there.

    Args:
        url: http(s) URL of the file.
        filename: name of the file in the dataset's cache folder.
        sha256: expected SHA-256 hex digest, or None where no hash is published.
        dataset: name of the cache subfolder, for example ``"iu_xray"``.
        timeout_s: socket timeout in seconds for each network read.

    Returns:
        Path of the complete file.

    Raises:
        ChecksumMismatch: the downloaded file has another SHA-256. The file is
            deleted first, and the message gives both hashes.
        urllib.error.URLError: the server cannot be reached or returns an HTTP error.
    """
    target = dataset_dir(dataset) / filename
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)

    if target.is_file():
        if sha256 is None or sha256_of(target) == sha256.lower():
            logger.info("using cached %s", target)
            return target
        logger.warning("cached %s has the wrong SHA-256; downloading it again", target)
        target.unlink()

    _download(url, part, timeout_s)

    if sha256 is not None:
        actual = sha256_of(part)
        if actual != sha256.lower():
            part.unlink()
            raise ChecksumMismatch(
                f"SHA-256 mismatch for {url}: expected {sha256.lower()}, got {actual}; the partial file was "
                "deleted. Run again to download it afresh, and if the mismatch repeats the file on the server "
                "has changed."
            )

    os.replace(part, target)
    logger.info("downloaded %s", target)
    return target


def _download(url: str, part: Path, timeout_s: float) -> None:
    """Write ``url`` into ``part``, resuming from its current size where the server allows."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url)
    if offset:
        request.add_header("Range", f"bytes={offset}-")

    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as error:
        # 416: the partial file already contains every byte the server has.
        if error.code == 416 and offset:
            logger.info("%s is already complete (%d bytes)", part, offset)
            return
        raise

    with response:
        if offset and response.status != 206:
            logger.info("server ignored the range request for %s; starting over", url)
            offset = 0
        elif offset:
            logger.info("resuming %s at byte %d", url, offset)

        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        mode = "ab" if offset else "wb"
        with open(part, mode) as stream, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=part.name[: -len(".part")]
        ) as progress:
            for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                stream.write(chunk)
                progress.update(len(chunk))
