"""Tests of data_prep.download against a loopback HTTP server started by the test."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data_prep import download
from data_prep.download import ChecksumMismatch, ManualDownloadRequired, fetch, manual_download_message

PAYLOAD = bytes(range(256)) * 40  # 10,240 bytes
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class PayloadHandler(BaseHTTPRequestHandler):
    """Serve PAYLOAD, honouring ``Range: bytes=N-`` unless ``server.ignore_range`` is set."""

    def do_GET(self):  # noqa: N802 - the name http.server calls
        self.server.requests.append(self.headers.get("Range"))
        requested = self.headers.get("Range")
        if requested and not self.server.ignore_range:
            start = int(requested.removeprefix("bytes=").split("-")[0])
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                self.end_headers()
                return
            body = PAYLOAD[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            body = PAYLOAD
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    # urllib reads proxy settings from the environment; the test server is on loopback.
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), PayloadHandler)
    httpd.requests = []
    httpd.ignore_range = False
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MSD_DATA_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def url_of(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/payload.bin"


def test_fetch_writes_file_in_cache(server, cache):
    path = fetch(url_of(server), "payload.bin", PAYLOAD_SHA256, dataset="demo")

    assert path == cache / "demo" / "payload.bin"
    assert path.read_bytes() == PAYLOAD
    assert not (cache / "demo" / "payload.bin.part").exists()


def test_fetch_reuses_cached_file(server, cache):
    fetch(url_of(server), "payload.bin", PAYLOAD_SHA256, dataset="demo")
    fetch(url_of(server), "payload.bin", PAYLOAD_SHA256, dataset="demo")

    assert len(server.requests) == 1


def test_fetch_resumes_partial_file(server, cache):
    part = cache / "demo" / "payload.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:1000])

    path = fetch(url_of(server), "payload.bin", PAYLOAD_SHA256, dataset="demo")

    assert server.requests == ["bytes=1000-"]
    assert path.read_bytes() == PAYLOAD


def test_fetch_restarts_when_range_ignored(server, cache):
    server.ignore_range = True
    part = cache / "demo" / "payload.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:1000])

    path = fetch(url_of(server), "payload.bin", PAYLOAD_SHA256, dataset="demo")

    assert path.read_bytes() == PAYLOAD


def test_fetch_complete_part_finishes(server, cache):
    part = cache / "demo" / "payload.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD)

    path = fetch(url_of(server), "payload.bin", PAYLOAD_SHA256, dataset="demo")

    assert path.read_bytes() == PAYLOAD


def test_sha_mismatch_deletes_and_raises(server, cache):
    wrong = "0" * 64

    with pytest.raises(ChecksumMismatch) as error:
        fetch(url_of(server), "payload.bin", wrong, dataset="demo")

    assert wrong in str(error.value)
    assert PAYLOAD_SHA256 in str(error.value)
    assert not (cache / "demo" / "payload.bin").exists()
    assert not (cache / "demo" / "payload.bin.part").exists()


def test_cached_file_with_wrong_hash_refetched(server, cache):
    target = cache / "demo" / "payload.bin"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"stale")

    path = fetch(url_of(server), "payload.bin", PAYLOAD_SHA256, dataset="demo")

    assert path.read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_data_dir_defaults_to_home_cache(monkeypatch):
    monkeypatch.delenv("MSD_DATA_DIR", raising=False)

    assert download.data_dir() == Path("~/.cache/msd").expanduser()


@pytest.mark.parametrize(
    "dataset, source",
    [
        ("mimic_cxr", "physionet.org/content/mimic-cxr-jpg"),
        ("chexpert_5x200", "stanfordaimi"),
        ("rsna", "kaggle"),
        ("siim", "kaggle"),
        ("covidx", "kaggle"),
    ],
)
def test_manual_message_names_source_and_folder(dataset, source, tmp_path):
    message = manual_download_message(dataset, tmp_path)

    assert source in message.lower()
    assert str(tmp_path) in message


def test_manual_download_is_file_not_found():
    error = ManualDownloadRequired("rsna", "label table not found")

    assert isinstance(error, FileNotFoundError)
    assert "label table not found" in str(error)
    assert "rsna-pneumonia-detection-challenge" in str(error)


def test_unknown_dataset_lists_known_names():
    with pytest.raises(KeyError) as error:
        manual_download_message("nih14")

    assert "mimic_cxr" in str(error.value)
