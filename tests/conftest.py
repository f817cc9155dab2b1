"""Fixtures shared by the test modules: isolated settings, offline data and tokenizer, quick mode,
one torch thread, a loopback HTTP server. Plain helpers live in ``_helpers.py``.

Optional dependencies (those of the ``test`` and ``book`` extras, not of the package) are imported
with ``name = pytest.importorskip("name")``: at the top of a module when all of it needs them,
otherwise inside the test or fixture that does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _helpers import LocalServer

from lora_tutorial.runtime import config, download, rehearsal


@pytest.fixture(autouse=True)
def _isolated_settings(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each test downloads into its own cache folder, never the user's, and starts in full mode
    whatever the caller's environment says; a test that wants a mode sets it. No rehearsal run is
    remembered from an earlier test."""
    monkeypatch.setenv(config.CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv(config.QUICK_ENV, raising=False)
    monkeypatch.delenv(config.REHEARSAL_ENV, raising=False)
    rehearsal.forget_trained()


@pytest.fixture
def quick_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quick mode for this test (and any kernel or process it starts)."""
    monkeypatch.setenv(config.QUICK_ENV, "1")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread than on cores shared with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The offline reference data (``../shared/data``); skips where a checkout has none."""
    path = config.data_dir()
    if path is None:
        pytest.skip(
            "no offline data folder: set LORA_TUTORIAL_DATA or place shared/data "
            "beside the repository"
        )
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """tiktoken's GPT-2 encoding, made to work offline from the local BPE files."""
    import tiktoken

    if download.use_offline_tiktoken(tmp_path_factory.mktemp("tiktoken")) is None:
        pytest.skip("GPT-2 BPE files not found in the offline data folder")
    return tiktoken.get_encoding("gpt2")


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[LocalServer]:
    """A loopback HTTP server over a fresh folder; put files in ``server.root`` to serve them."""
    root = tmp_path / "served"
    root.mkdir()
    with LocalServer(root) as server:
        yield server
