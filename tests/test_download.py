"""runtime.download: verified, atomic, cached downloads, tested against a loopback server."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lora_tutorial.runtime import config, download
from lora_tutorial.runtime.download import DownloadError, RemoteFile, fetch
from lora_tutorial.runtime.files import atomic_write

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
    # no temporary file left; the record beside the file says it was checked
    assert sorted(p.name for p in cache.iterdir()) == ["blob.bin", "blob.bin.verified.json"]

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
    """A loopback server answering with ``handler``, the download mirror while the block runs."""
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
    """Announces more bytes than it sends (and PAYLOAD's sha256), then closes the connection."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.send_header("ETag", f'"{hashlib.sha256(PAYLOAD).hexdigest()}"')
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
    with pytest.raises(ValueError, match=r"not in download\.KNOWN_FILES"):
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


# ----------------------------------------------------------------------------- verified by content


class _ETagHandler(_QuietHandler):
    """Serves BODY with the given ETag header (or none)."""

    body = PAYLOAD
    etag: str | None = None

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        if self.etag is not None:
            self.send_header("ETag", self.etag)
        self.end_headers()
        self.wfile.write(self.body)


def _etag_handler(etag: str | None, body: bytes = PAYLOAD) -> type[_ETagHandler]:
    return type("Handler", (_ETagHandler,), {"etag": etag, "body": body})


@pytest.mark.parametrize("quoting", ['"{}"', 'W/"{}"', "{}"])
def test_unpinned_file_is_checked_against_the_published_sha256(monkeypatch, cache, quoting) -> None:
    _register(monkeypatch, "blob.bin", PAYLOAD, size=None, sha256=None)
    etag = quoting.format(hashlib.sha256(PAYLOAD).hexdigest().upper())
    with _mirror(monkeypatch, _etag_handler(etag)):
        assert fetch("blob.bin", cache_dir=cache, progress=False).read_bytes() == PAYLOAD
    # The record made at download time lets the file be used offline afterwards.
    monkeypatch.setenv(download.MIRROR_ENV, f"http://127.0.0.1:{_closed_port()}")
    assert fetch("blob.bin", cache_dir=cache, progress=False).read_bytes() == PAYLOAD


def test_unpinned_file_whose_body_differs_from_the_published_sha256_is_refused(
    monkeypatch, cache
) -> None:
    _register(monkeypatch, "blob.bin", PAYLOAD, size=None, sha256=None)
    tampered = PAYLOAD[:-1] + b"x"
    etag = f'"{hashlib.sha256(PAYLOAD).hexdigest()}"'
    with _mirror(monkeypatch, _etag_handler(etag, tampered)), pytest.raises(DownloadError) as info:
        fetch("blob.bin", cache_dir=cache, progress=False)
    assert "sha256" in str(info.value) and hashlib.sha256(tampered).hexdigest() in str(info.value)
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize("etag", [None, '"5d41402abc4b2a76b9719d911017c592"', '"not-a-hash"'])
def test_unpinned_file_without_a_published_sha256_is_refused(monkeypatch, cache, etag) -> None:
    _register(monkeypatch, "blob.bin", PAYLOAD, size=None, sha256=None)
    with _mirror(monkeypatch, _etag_handler(etag)), pytest.raises(DownloadError) as info:
        fetch("blob.bin", cache_dir=cache, progress=False)
    assert "no sha256 is pinned" in str(info.value) and "published none" in str(info.value)
    assert "KNOWN_FILES" in str(info.value)
    assert list(cache.iterdir()) == []


def test_published_sha256_of_a_redirect_is_used(monkeypatch, cache) -> None:
    """The hub sends X-Linked-Etag with its redirect to the CDN, whose answer has no sha256."""
    _register(monkeypatch, "blob.bin", PAYLOAD, size=None, sha256=None)

    class Redirecting(_ETagHandler):
        def do_GET(self) -> None:
            if self.path.endswith("/cdn"):
                return super().do_GET()
            self.send_response(302)
            self.send_header("Location", self.path + "/cdn")
            self.send_header("X-Linked-Etag", f'"{hashlib.sha256(PAYLOAD).hexdigest()}"')
            self.end_headers()

    with _mirror(monkeypatch, Redirecting):
        assert fetch("blob.bin", cache_dir=cache, progress=False).read_bytes() == PAYLOAD


class _EndlessHandler(_QuietHandler):
    """Sends up to 64 MiB without a Content-Length; counts the bytes it managed to send."""

    sent = 0

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        block = b"\0" * 65536
        try:
            for _ in range(1024):
                self.wfile.write(block)
                type(self).sent += len(block)
        except OSError:
            pass  # the client hung up: what we want


def test_oversized_body_is_cut_off_early(monkeypatch, cache) -> None:
    _register(monkeypatch, "blob.bin", PAYLOAD)
    handler = type("Endless", (_EndlessHandler,), {"sent": 0})
    with _mirror(monkeypatch, handler), pytest.raises(DownloadError) as info:
        fetch("blob.bin", cache_dir=cache, progress=False)
    assert f"more than the {len(PAYLOAD):,} bytes expected" in str(info.value)
    assert list(cache.iterdir()) == []
    # Only what loopback buffers hold went out before the client hung up, not the whole 64 MiB.
    assert handler.sent < 16 * 2**20


class _TricklingHandler(_QuietHandler):
    """Sends PAYLOAD one byte every 20 ms (it would take over five minutes)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        try:
            for i in range(len(PAYLOAD)):
                self.wfile.write(PAYLOAD[i : i + 1])
                self.wfile.flush()
                time.sleep(0.02)
        except OSError:
            pass


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_trickling_server_meets_the_deadline(monkeypatch, cache, how) -> None:
    _register(monkeypatch, "blob.bin", PAYLOAD)
    kwargs = {"deadline_s": 0.5} if how == "argument" else {}
    if how == "environment":
        monkeypatch.setenv(download.DEADLINE_ENV, "0.5")
    start = time.monotonic()
    with _mirror(monkeypatch, _TricklingHandler), pytest.raises(DownloadError) as info:
        fetch("blob.bin", cache_dir=cache, progress=False, **kwargs)
    assert time.monotonic() - start < 5
    assert "deadline" in str(info.value) and download.DEADLINE_ENV in str(info.value)
    assert list(cache.iterdir()) == []


def test_bad_deadline_is_refused(monkeypatch, cache) -> None:
    _register(monkeypatch, "blob.bin", PAYLOAD)
    with pytest.raises(ValueError, match="deadline_s must be a positive, finite number, got 0"):
        fetch("blob.bin", cache_dir=cache, deadline_s=0)
    monkeypatch.setenv(download.DEADLINE_ENV, "soon")
    with pytest.raises(ValueError, match=download.DEADLINE_ENV):
        fetch("blob.bin", cache_dir=cache)


def _tamper(path: Path) -> None:
    """Change one byte of ``path``, keeping its size."""
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampered_cached_file_is_detected_and_fetched_again(http_server, monkeypatch, cache):
    _register(monkeypatch, "blob.bin", PAYLOAD)
    _served(http_server, monkeypatch, "blob.bin", PAYLOAD)
    path = fetch("blob.bin", cache_dir=cache, progress=False)
    _tamper(path)  # same size, other content, newer mtime
    assert fetch("blob.bin", cache_dir=cache, progress=False).read_bytes() == PAYLOAD


def test_cached_file_of_the_right_size_but_wrong_content_names_the_file_when_offline(
    monkeypatch, cache
) -> None:
    _register(monkeypatch, "blob.bin", PAYLOAD)
    crafted = cache / "blob.bin"
    crafted.write_bytes(b"x" * len(PAYLOAD))  # placed by hand, the right size
    monkeypatch.setenv(download.MIRROR_ENV, f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(DownloadError) as info:
        fetch("blob.bin", cache_dir=cache, progress=False)
    assert f"cached file {crafted} failed its sha256 check" in str(info.value)
    assert f"Delete or replace {crafted}" in str(info.value)
    assert crafted.read_bytes() == b"x" * len(PAYLOAD)  # nothing was replaced by a failed fetch


def test_file_placed_by_hand_is_used_once_its_sha256_matches(monkeypatch, cache) -> None:
    _register(monkeypatch, "blob.bin", PAYLOAD)
    (cache / "blob.bin").write_bytes(PAYLOAD)
    monkeypatch.setenv(download.MIRROR_ENV, f"http://127.0.0.1:{_closed_port()}")  # offline
    assert fetch("blob.bin", cache_dir=cache, progress=False).read_bytes() == PAYLOAD
    assert (cache / "blob.bin.verified.json").is_file()


def test_record_spares_hashing_until_size_or_mtime_change(http_server, monkeypatch, cache):
    """Evidence without clocks: a change that keeps size and mtime goes unseen (so no hashing
    happened), while the same change with a new mtime is caught."""
    _register(monkeypatch, "blob.bin", PAYLOAD)
    _served(http_server, monkeypatch, "blob.bin", PAYLOAD)
    path = fetch("blob.bin", cache_dir=cache, progress=False)
    stat = path.stat()
    _tamper(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as if untouched
    assert fetch("blob.bin", cache_dir=cache, progress=False).read_bytes() != PAYLOAD
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert fetch("blob.bin", cache_dir=cache, progress=False).read_bytes() == PAYLOAD


def test_damaged_record_means_hashing_again(http_server, monkeypatch, cache) -> None:
    _register(monkeypatch, "blob.bin", PAYLOAD)
    _served(http_server, monkeypatch, "blob.bin", PAYLOAD)
    path = fetch("blob.bin", cache_dir=cache, progress=False)
    stat = path.stat()
    _tamper(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (cache / "blob.bin.verified.json").write_text("{not json")
    assert fetch("blob.bin", cache_dir=cache, progress=False).read_bytes() == PAYLOAD


def test_unpinned_file_placed_by_hand_is_kept_when_the_server_publishes_its_sha256(
    monkeypatch, cache
) -> None:
    _register(monkeypatch, "blob.bin", PAYLOAD, size=None, sha256=None)
    placed = cache / "blob.bin"
    placed.write_bytes(PAYLOAD)
    os.utime(placed, ns=(0, 1_000_000_000))  # an old file: a download would give a new mtime
    with _mirror(monkeypatch, _etag_handler(f'"{hashlib.sha256(PAYLOAD).hexdigest()}"')):
        assert fetch("blob.bin", cache_dir=cache, progress=False) == placed
    assert placed.stat().st_mtime_ns == 1_000_000_000  # checked against the server, not replaced
    assert (cache / "blob.bin.verified.json").is_file()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("ftp://example.org/files", "is not an http(s) base address"),
        ("http://example.org/files", "uses plain http for a non-loopback host"),
    ],
)
def test_a_mirror_that_cannot_be_used_is_an_error_before_any_download(
    monkeypatch: pytest.MonkeyPatch, value: str, problem: str
) -> None:
    monkeypatch.setenv(download.MIRROR_ENV, value)
    with pytest.raises(ValueError, match=f"{download.MIRROR_ENV}=.*{re.escape(problem)}"):
        download.mirror()
    monkeypatch.setenv(download.MIRROR_ENV, "https://example.org/files/")
    assert download.mirror() == "https://example.org/files"


@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf", "nan"])
def test_a_deadline_that_is_no_positive_number_is_an_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(download.DEADLINE_ENV, value)
    with pytest.raises(ValueError, match=f"^{download.DEADLINE_ENV}='{value}' is not a positive"):
        download.default_deadline_s()
    monkeypatch.setenv(download.DEADLINE_ENV, " 90 ")
    assert download.default_deadline_s() == 90.0
    monkeypatch.delenv(download.DEADLINE_ENV)
    assert download.default_deadline_s() == download.DEFAULT_DEADLINE_S
