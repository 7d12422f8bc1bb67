"""Downloading an absent known data set, against a local HTTP server serving a zip made here."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from metarec.config import Config, DataConfig, RuntimeConfig
from tasks.data import datasets
from tasks.data.datasets import DataError, KnownDataset, resolve_source
from tasks.data.prepare import prepare_data
from tasks.data.prepared import load_prepared

U_DATA = "".join(f"{u}\t{i}\t{1 + (u * i) % 5}\t{880000000 + 1000 * u + i}\n" for u in range(1, 41) for i in range(1, 16))


class Server:
    """A quiet static file server on 127.0.0.1 that counts the requests it answers."""

    def __init__(self, root: Path) -> None:
        self.paths: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                outer.paths.append(self.path)
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A zip laid out like GroupLens' (ml-tiny/u.data, ml-tiny/u.item), its md5 and size, and a server."""
    www = tmp_path / "www"
    www.mkdir()
    archive = www / "ml-tiny.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-tiny/u.data", U_DATA)
        zf.writestr("ml-tiny/u.item", "1|One (1995)|01-Jan-1995||http://x|" + "|".join(["0"] * 18 + ["1"]) + "\n")  # a real u.item line: 24 fields
    (www / "not-a-zip.zip").write_text("hello")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    server = Server(www)
    monkeypatch.delenv("METAREC_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    yield server, md5, archive.stat().st_size
    server.close()


def register(monkeypatch: pytest.MonkeyPatch, url: str, md5: str | None = None, size: int | None = None) -> None:
    monkeypatch.setitem(datasets.KNOWN, "ml-tiny", KnownDataset("ml-tiny", ("ml-tiny",), "ml-100k", url, md5=md5, size=size))


def leftovers(root: Path) -> list[Path]:
    return list(root.iterdir()) if root.exists() else []


def test_absent_dataset_is_downloaded_verified_and_unpacked_once(served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    server, md5, size = served
    register(monkeypatch, server.url("ml-tiny.zip"), md5=md5, size=size)
    source = resolve_source("ml-tiny", data_dir=tmp_path / "data")
    assert source.layout == "ml-100k" and source.ratings == (tmp_path / "data" / "ml-tiny" / "u.data",)
    assert source.ratings[0].read_text() == U_DATA
    assert leftovers(tmp_path / "data") == [tmp_path / "data" / "ml-tiny"]  # no temporary files left
    resolve_source("ml-tiny", data_dir=tmp_path / "data")
    assert server.paths == ["/ml-tiny.zip"]  # the second call found it on disk


def test_downloaded_dataset_prepares_end_to_end(served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    server, md5, size = served
    register(monkeypatch, server.url("ml-tiny.zip"), md5=md5, size=size)
    config = Config(data=DataConfig(dataset="ml-tiny", data_dir=tmp_path / "data", n_negatives=5, stream_batches=2, new_user_ns=(1, 5)),
                    runtime=RuntimeConfig(artifacts_dir=tmp_path / "artifacts"))
    data = load_prepared(prepare_data(config))
    assert data.n_users == 40 and data.n_items == 15
    assert data.stats["source"]["titles"].endswith("u.item")


def test_published_md5_is_used_when_none_is_pinned(served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    server, md5, _ = served
    (tmp_path / "www" / "ml-tiny.zip.md5").write_text(f"MD5 (ml-tiny.zip) = {md5}\n")
    register(monkeypatch, server.url("ml-tiny.zip"))
    resolve_source("ml-tiny", data_dir=tmp_path / "data")
    assert server.paths == ["/ml-tiny.zip", "/ml-tiny.zip.md5"]


@pytest.mark.parametrize(
    "pin, message",
    [({"md5": "0" * 32}, "md5 [0-9a-f]{32}, expected 0{32}"), ({"size": 12}, "bytes, expected 12")],
)
def test_checksum_or_size_mismatch_leaves_nothing(served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pin: dict, message: str):
    server, _, _ = served
    register(monkeypatch, server.url("ml-tiny.zip"), **pin)
    with pytest.raises(DataError, match=message):
        resolve_source("ml-tiny", data_dir=tmp_path / "data")
    assert leftovers(tmp_path / "data") == []


def test_not_a_zip(served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    server, _, _ = served
    register(monkeypatch, server.url("not-a-zip.zip"), md5=hashlib.md5(b"hello").hexdigest())
    with pytest.raises(DataError, match="not a zip archive"):
        resolve_source("ml-tiny", data_dir=tmp_path / "data")
    assert leftovers(tmp_path / "data") == []


def test_offline_error_names_every_dir_and_the_url(served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/ml-tiny.zip"
    register(monkeypatch, url)
    with pytest.raises(DataError, match="downloading .* failed") as info:
        resolve_source("ml-tiny", data_dir=tmp_path / "data")
    for part in (url, tmp_path / "data" / "ml-tiny", tmp_path / "data", datasets.SHARED_DATASETS / "ml-tiny"):
        assert str(part) in str(info.value)
    assert leftovers(tmp_path / "data") == []
