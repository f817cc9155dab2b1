"""Fixtures shared by the test modules: offline tokenizer, reference data, a loopback HTTP server."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lora_tutorial import config, download


@pytest.fixture(autouse=True)
def _isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each test downloads into its own cache folder, never the user's."""
    monkeypatch.setenv(config.CACHE_ENV, str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The offline reference data (``../shared/data``); skips where a checkout has none."""
    path = config.data_dir()
    if path is None:
        pytest.skip(
            "no offline data folder: set LORA_TUTORIAL_DATA or place shared/data beside the repository"
        )
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """tiktoken's GPT-2 encoding, made to work offline from the local BPE files."""
    import tiktoken

    if download.use_offline_tiktoken(tmp_path_factory.mktemp("tiktoken")) is None:
        pytest.skip("GPT-2 BPE files not found in the offline data folder")
    return tiktoken.get_encoding("gpt2")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class LocalServer:
    """A static file server on 127.0.0.1 serving ``root``; ``url(name)`` gives a file's address."""

    def __init__(self, root: Path) -> None:
        self.root = root
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def __enter__(self) -> LocalServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[LocalServer]:
    """A loopback HTTP server over a fresh folder; put files in ``server.root`` to serve them."""
    root = tmp_path / "served"
    root.mkdir()
    with LocalServer(root) as server:
        yield server
