"""lora_tutorial.download: verified, atomic, cached downloads, tested against a loopback server."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lora_tutorial import config, download
from lora_tutorial.download import DownloadError, RemoteFile, fetch
from lora_tutorial.files import atomic_write

PAYLOAD = bytes(range(256)) * 64  # 16 KiB of known bytes


def _register(
    monkeypatch: pytest.MonkeyPatch, name: str, data: bytes, **overrides: object
) -> RemoteFile:
    """Add a RemoteFile describing ``data`` to KNOWN_FILES for this test only."""
    fields = dict(
        url=f"https://example.org/{name}",
        filename=name,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    fields.update(overrides)
    remote = RemoteFile(**fields)  # type: ignore[arg-type]
    monkeypatch.setitem(download.KNOWN_FILES, name, remote)
    return remote


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    folder = tmp_path / "cache"
    folder.mkdir()
    return folder


def _served(server, monkeypatch: pytest.MonkeyPatch, name: str, data: bytes) -> None:
    (server.root / name).write_bytes(data)
    monkeypatch.setenv(download.MIRROR_ENV, server.base_url)


def test_known_files_are_https_with_checks() -> None:
    assert {"gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "sms-spam-zip"} <= set(
        download.KNOWN_FILES
    )
    for name, remote in download.KNOWN_FILES.items():
        assert remote.url.startswith("https://"), name
        assert remote.sha256 is None or len(remote.sha256) == 64, name
    names = [remote.filename for remote in download.KNOWN_FILES.values()]
    assert len(set(names)) == len(names), "two known files would share one cache path"


def test_fetch_downloads_verifies_and_then_uses_cache(http_server, monkeypatch, cache) -> None:
    _register(monkeypatch, "blob.bin", PAYLOAD)
    _served(http_server, monkeypatch, "blob.bin", PAYLOAD)

    path = fetch("blob.bin", cache_dir=cache, progress=False)
    assert path == cache / "blob.bin"
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in cache.iterdir()) == ["blob.bin"]  # no temporary file left

    (http_server.root / "blob.bin").unlink()  # a second request would now get 404
    assert fetch(download.KNOWN_FILES["blob.bin"], cache_dir=cache, progress=False) == path


def test_default_cache_folder_comes_from_config(http_server, monkeypatch) -> None:
    _register(monkeypatch, "blob.bin", PAYLOAD)
    _served(http_server, monkeypatch, "blob.bin", PAYLOAD)
    path = fetch("blob.bin", progress=False)
    assert path.parent == config.cache_dir()


def test_cached_file_of_wrong_size_is_downloaded_again(http_server, monkeypatch, cache) -> None:
    _register(monkeypatch, "blob.bin", PAYLOAD)
    _served(http_server, monkeypatch, "blob.bin", PAYLOAD)
    (cache / "blob.bin").write_bytes(PAYLOAD[:100])
    assert fetch("blob.bin", cache_dir=cache, progress=False).read_bytes() == PAYLOAD


def _assert_clean_failure(excinfo: pytest.ExceptionInfo, cache: Path, *phrases: str) -> None:
    message = str(excinfo.value)
    for phrase in phrases:
        assert phrase in message, message
    assert "To supply it by hand" in message and str(cache / "blob.bin") in message, message
    assert list(cache.iterdir()) == []


def test_truncated_file_is_rejected(http_server, monkeypatch, cache) -> None:
    _register(monkeypatch, "blob.bin", PAYLOAD, size=len(PAYLOAD) + 10)
    _served(http_server, monkeypatch, "blob.bin", PAYLOAD)
    with pytest.raises(DownloadError) as excinfo:
        fetch("blob.bin", cache_dir=cache, progress=False)
    _assert_clean_failure(excinfo, cache, "differs from the known one")


@contextlib.contextmanager
def _mirror(
    monkeypatch: pytest.MonkeyPatch, handler: type[http.server.BaseHTTPRequestHandler]
) -> Iterator[None]:
    """A loopback server answering with ``handler``, set as the download mirror while the block runs."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv(download.MIRROR_ENV, f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _ShortBodyHandler(_QuietHandler):
    """Announces more bytes than it sends, then closes the connection."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD[:1000])
        self.wfile.flush()
        self.close_connection = True


def test_connection_closed_mid_body_is_rejected(monkeypatch, cache) -> None:
    _register(monkeypatch, "blob.bin", PAYLOAD)
    with _mirror(monkeypatch, _ShortBodyHandler), pytest.raises(DownloadError) as excinfo:
        fetch("blob.bin", cache_dir=cache, progress=False)
    _assert_clean_failure(excinfo, cache, "truncated", f"1,000 of {len(PAYLOAD):,} bytes")


def test_unknown_size_still_checks_announced_length(monkeypatch, cache) -> None:
    _register(monkeypatch, "blob.bin", PAYLOAD, size=None, sha256=None)
    with _mirror(monkeypatch, _ShortBodyHandler), pytest.raises(DownloadError, match="truncated"):
        fetch("blob.bin", cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []


def test_wrong_checksum_is_rejected(http_server, monkeypatch, cache) -> None:
    _register(monkeypatch, "blob.bin", PAYLOAD, sha256="0" * 64)
    _served(http_server, monkeypatch, "blob.bin", PAYLOAD)
    with pytest.raises(DownloadError) as excinfo:
        fetch("blob.bin", cache_dir=cache, progress=False)
    _assert_clean_failure(excinfo, cache, "sha256", hashlib.sha256(PAYLOAD).hexdigest(), "0" * 64)


def test_http_404_is_reported(http_server, monkeypatch, cache) -> None:
    _register(monkeypatch, "blob.bin", PAYLOAD)
    monkeypatch.setenv(download.MIRROR_ENV, http_server.base_url)  # nothing served
    with pytest.raises(DownloadError) as excinfo:
        fetch("blob.bin", cache_dir=cache, progress=False)
    _assert_clean_failure(excinfo, cache, "HTTP 404")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_offline_gives_one_clear_error(monkeypatch, cache) -> None:
    _register(monkeypatch, "blob.bin", PAYLOAD)
    monkeypatch.setenv(download.MIRROR_ENV, f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(DownloadError) as excinfo:
        fetch("blob.bin", cache_dir=cache, progress=False)
    _assert_clean_failure(excinfo, cache, "appears to be offline")
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__


class _DowngradeHandler(_QuietHandler):
    """Redirects every request to a plain-http address on another host."""

    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", "http://example.org/blob.bin")
        self.end_headers()


def test_redirect_to_plain_http_is_refused(monkeypatch, cache) -> None:
    _register(monkeypatch, "blob.bin", PAYLOAD)
    with _mirror(monkeypatch, _DowngradeHandler), pytest.raises(DownloadError) as excinfo:
        fetch("blob.bin", cache_dir=cache, progress=False)
    _assert_clean_failure(excinfo, cache, "not https")


def test_only_known_https_files_are_fetched(monkeypatch, cache) -> None:
    with pytest.raises(ValueError, match="unknown file 'nope'"):
        fetch("nope", cache_dir=cache)
    stranger = RemoteFile("https://example.org/x.bin", "x.bin", 1, None)
    with pytest.raises(ValueError, match="not in download.KNOWN_FILES"):
        fetch(stranger, cache_dir=cache)
    plain = _register(monkeypatch, "plain.bin", PAYLOAD, url="http://example.org/plain.bin")
    with pytest.raises(ValueError, match="only https"):
        fetch(plain, cache_dir=cache)
    _register(monkeypatch, "blob.bin", PAYLOAD)
    monkeypatch.setenv(download.MIRROR_ENV, "http://example.org/files")
    with pytest.raises(ValueError, match="loopback"):
        fetch("blob.bin", cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_atomic_write_replaces_the_file_only_when_the_block_succeeds(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "result.json"
    with atomic_write(target) as tmp:
        assert (
            tmp.parent == target.parent and tmp.suffix == ".json" and tmp != target
        )  # the suffix picks formats
        tmp.write_text("first")
    assert target.read_text() == "first"

    with pytest.raises(RuntimeError, match="writer failed"), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]  # no temporary file left
