"""Every chapter runs top to bottom in quick mode, and a chapter that raises fails both the tests and the build."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from test_book import chapter_paths

from lora_tutorial import config

ROOT = config.repo_root()


def execute(path: Path, timeout: int = 900) -> nbformat.NotebookNode:
    """Run a notebook as the book build does: in its own folder, with a fresh kernel."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    return nb


def outputs_text(nb: nbformat.NotebookNode) -> str:
    return "\n".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )


@pytest.fixture
def quick_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.QUICK_ENV, "1")


@pytest.mark.parametrize("path", chapter_paths(), ids=lambda p: p.stem)
def test_chapter_runs_in_quick_mode_and_says_so(path: Path, quick_mode: None) -> None:
    nb = execute(path)
    assert "QUICK MODE" in outputs_text(nb), f"{path.name} does not print the quick-mode banner"


def broken_notebook(folder: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Broken\n\nThis chapter raises."),
        nbformat.v4.new_code_cell("x = 1\n1 / 0"),
    ]
    path = folder / "broken.ipynb"
    nbformat.write(nb, path)
    return path


def test_a_chapter_that_raises_fails_execution(tmp_path: Path) -> None:
    with pytest.raises(CellExecutionError, match="ZeroDivisionError"):
        execute(broken_notebook(tmp_path))


def test_a_chapter_that_raises_fails_the_book_build(tmp_path: Path) -> None:
    """The real book configuration, with a broken notebook as its one chapter, does not build."""
    shutil.copytree(ROOT / "book", tmp_path / "book")
    (tmp_path / "chapters").mkdir()
    broken_notebook(tmp_path / "chapters")
    (tmp_path / "book" / "_toc.yml").write_text(
        "format: jb-book\nroot: book/intro\nchapters:\n  - file: chapters/broken\n"
    )
    (tmp_path / "book" / "intro.md").write_text("# Intro\n\nA page.\n")
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    result = subprocess.run(
        [
            str(jupyter_book),
            "build",
            str(tmp_path),
            "--config",
            "book/_config.yml",
            "--toc",
            "book/_toc.yml",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode != 0, "the build succeeded although a chapter raised"
    assert "ZeroDivisionError" in log
