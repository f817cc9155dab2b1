"""Helpers shared by the test modules (fixtures live in conftest.py; test modules import these).

- where the book's sources and its build are: the table of contents, the chapter notebooks, the
  built site and the executed notebooks the build leaves behind;
- a static file server on 127.0.0.1 for the download and browser tests;
- tiny chapters for the grader's tests: a chapter's checked exercises alone.
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path

import nbformat
import pytest

from lora_tutorial.runtime.config import repo_root

ROOT = repo_root()

# The book build (README, command 1) writes the site to _build/html and, through myst-nb, every
# executed notebook to _build/jupyter_execute/<path in the book>.ipynb.
BUILD = Path(os.environ.get("LORA_TUTORIAL_BUILD", ROOT / "_build"))
SITE = BUILD / "html"
EXECUTED = BUILD / "jupyter_execute"

# Set to 1 (as CI does, after the build) to make a missing or stale build fail the tests that
# read it, instead of skipping them or executing the chapters again.
REQUIRE_BUILD_ENV = "LORA_TUTORIAL_REQUIRE_BUILD"
# A GPT small enough for tests that build many models (serving, chapter 8's tables).
SMALL_GPT = {
    "vocab_size": 60,
    "context_length": 12,
    "emb_dim": 16,
    "n_heads": 2,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
}


def build_required() -> bool:
    return os.environ.get(REQUIRE_BUILD_ENV) == "1"


def toc_pages() -> list[str]:
    """Every document in ``book/_toc.yml``, root first, as paths without suffix."""
    yaml = pytest.importorskip("yaml")
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    pages = [toc["root"]]

    def walk(entries: list[dict]) -> None:
        for entry in entries:
            if "file" in entry:
                pages.append(entry["file"])
            for key in ("chapters", "sections", "parts"):
                walk(entry.get(key, []))

    walk(toc.get("parts", []) + toc.get("chapters", []))
    return pages


def chapter_paths() -> list[Path]:
    """The chapter notebooks, in table-of-contents order."""
    return [ROOT / f"{page}.ipynb" for page in toc_pages() if page.startswith("chapters/")]


def tiny_chapter(chapter: str, folder: Path, setup: str = "") -> Path:
    """``folder/NN_tiny.ipynb``: chapter ``chapter``'s title, its first code cell, a ``setup``
    cell, then each checked exercise with the code cell after it, so a grading run takes seconds.
    """
    source = nbformat.read(ROOT / "chapters" / f"{chapter}.ipynb", as_version=4)
    keep = [source.cells[0], next(c for c in source.cells if c.cell_type == "code")]
    if setup:
        keep.append(nbformat.v4.new_code_cell(setup))
    for i, cell in enumerate(source.cells):
        if cell.cell_type == "markdown" and "check_" in cell.source and "{exercise}" in cell.source:
            keep += [cell, source.cells[i + 1]]
    source.cells = keep
    path = folder / f"{chapter[:2]}_tiny.ipynb"
    nbformat.write(source, path)
    return path


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
        return f"http://{host!s}:{port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def __enter__(self) -> LocalServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
