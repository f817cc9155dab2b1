"""Every chapter runs top to bottom and what it prints keeps the book's promises.

CI executes each chapter once, in the book build (README, command 1); myst-nb leaves the executed
notebooks in ``_build/jupyter_execute/``, and these tests read them. A chapter that has no executed
copy there, or whose copy is older than its source, is executed here in quick mode instead: those
tests are marked ``slow``. With ``LORA_TUTORIAL_REQUIRE_BUILD=1`` (CI, after the build) a missing or
stale copy fails instead of being executed a second time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import EXECUTED, REQUIRE_BUILD_ENV, ROOT, build_required, chapter_paths

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

BANNERS = ("QUICK MODE", "REHEARSAL MODE", "FULL MODE")  # config.mode_banner() of each mode
CHECK_CALL = re.compile(r"^\s*check_\w+\(", re.MULTILINE)  # an exercise check, called in a cell
CHECK_RESULT = ("Correct!", "Not yet:")  # what lora_tutorial.exercises._feedback.report prints


def code_sources(nb: nbformat.NotebookNode) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def executed_copy(path: Path) -> Path | None:
    """The build's executed copy of chapter ``path``, if there is one made from today's source."""
    copy = EXECUTED / path.relative_to(ROOT)
    if not copy.is_file():
        return None
    source, built = (nbformat.read(p, as_version=4) for p in (path, copy))
    return copy if code_sources(source) == code_sources(built) else None


def execute(path: Path, timeout: int = 900) -> nbformat.NotebookNode:
    """Run a notebook as the book build does: in its own folder, with a fresh kernel."""
    pytest.importorskip("ipykernel")  # the `book` extra: the kernel that runs the chapters
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    return nb


def chapter_params() -> list:
    """One case per chapter: reading the build's copy is fast, executing the chapter is slow."""
    params = []
    for path in chapter_paths():
        built = executed_copy(path) is not None
        marks = () if built else (pytest.mark.slow,)
        params.append(
            pytest.param(path, marks=marks, id=f"{path.stem}-{'built' if built else 'run'}")
        )
    return params


@pytest.fixture(params=chapter_params())
def executed(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> nbformat.NotebookNode:
    """A chapter as executed: the book build's copy, or (without one) a quick-mode run here."""
    path: Path = request.param
    copy = executed_copy(path)
    if copy is not None:
        return nbformat.read(copy, as_version=4)
    if build_required():
        pytest.fail(
            f"{REQUIRE_BUILD_ENV}=1 but the build left no executed copy of {path.name} made "
            f"from its current source in {EXECUTED}: build the book first (README, command 1)"
        )
    monkeypatch.setenv("LORA_TUTORIAL_QUICK", "1")  # the kernel inherits the environment
    return execute(path)


def text_of(cell: nbformat.NotebookNode) -> str:
    """Everything a code cell showed as text: its streams and its plain-text results."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_chapter_ran_every_cell_and_kept_its_promises(executed: nbformat.NotebookNode) -> None:
    code = [cell for cell in executed.cells if cell.cell_type == "code"]
    unexecuted = [
        i for i, cell in enumerate(code) if cell.source.strip() and not cell.get("execution_count")
    ]
    assert not unexecuted, f"code cells {unexecuted} were not executed"

    errors = [
        f"code cell {i}: {out.get('ename')}: {out.get('evalue')}"
        for i, cell in enumerate(code)
        for out in cell.get("outputs", [])
        if out.output_type == "error"
    ]
    assert not errors, f"error output: {errors}"

    banner = text_of(code[1])
    assert any(name in banner for name in BANNERS), (
        f"the second code cell must print the mode banner; it printed {banner[:200]!r}"
    )

    silent_checks = [
        i
        for i, cell in enumerate(code)
        if CHECK_CALL.search(cell.source) and not any(r in text_of(cell) for r in CHECK_RESULT)
    ]
    assert not silent_checks, f"exercise checks in code cells {silent_checks} printed no result"


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
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="ZeroDivisionError"):
        execute(broken_notebook(tmp_path))


@pytest.mark.slow
def test_a_chapter_that_raises_fails_the_book_build(tmp_path: Path) -> None:
    """The real book configuration, with a broken notebook as its one chapter, does not build."""
    pytest.importorskip("jupyter_book")  # the `book` extra
    shutil.copytree(ROOT / "book", tmp_path / "book")
    (tmp_path / "chapters").mkdir()
    broken_notebook(tmp_path / "chapters")
    (tmp_path / "book" / "_toc.yml").write_text(
        "format: jb-book\nroot: book/intro\nchapters:\n  - file: chapters/broken\n"
    )
    (tmp_path / "book" / "intro.md").write_text("# Intro\n\nA page.\n")
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    command = [jupyter_book, "build", tmp_path, "--config", "book/_config.yml"]
    command += ["--toc", "book/_toc.yml"]
    result = subprocess.run(
        [str(part) for part in command], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    log = result.stdout + result.stderr
    assert result.returncode != 0, "the build succeeded although a chapter raised"
    assert "ZeroDivisionError" in log
