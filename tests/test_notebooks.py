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

from lora_tutorial.runtime import config

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

BANNERS = ("QUICK MODE", "REHEARSAL MODE", "FULL MODE")  # provenance.mode_banner() of each mode
# A call of an exercise check (check_x(...) or chNN.check_x(...)), outside comments and definitions.
CHECK_CALL = re.compile(r"(?<!def )(?<!\w)check_\w+\(")
CHECK_RESULT = ("Correct!", "Not yet:")  # what lora_tutorial.exercises._feedback.report prints


def code_sources(nb: nbformat.NotebookNode) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def executed_copy(path: Path) -> Path | None:
    """The build's executed copy of chapter ``path``, if it was made from the
    chapter's current code."""
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
    monkeypatch.setenv(config.QUICK_ENV, "1")  # the kernel inherits the environment
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


def calls_a_check(source: str) -> bool:
    code = "\n".join(line.split("#", 1)[0] for line in source.splitlines())
    return CHECK_CALL.search(code) is not None


def broken_promises(nb: nbformat.NotebookNode) -> list[str]:
    """What an executed chapter got wrong: cells not run, error output, no mode banner in the
    second code cell, exercise checks that printed no verdict."""
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    problems = [
        f"code cell {i} was not executed"
        for i, cell in enumerate(code)
        if cell.source.strip() and not cell.get("execution_count")
    ]
    problems += [
        f"code cell {i} shows an error: {out.get('ename')}: {out.get('evalue')}"
        for i, cell in enumerate(code)
        for out in cell.get("outputs", [])
        if out.output_type == "error"
    ]
    banner = text_of(code[1]) if len(code) > 1 else ""
    if not any(name in banner for name in BANNERS):
        problems.append(f"the second code cell must print the mode banner, not {banner[:200]!r}")
    problems += [
        f"the exercise check in code cell {i} printed no verdict"
        for i, cell in enumerate(code)
        if calls_a_check(cell.source) and not any(r in text_of(cell) for r in CHECK_RESULT)
    ]
    return problems


def test_chapter_ran_every_cell_and_kept_its_promises(executed: nbformat.NotebookNode) -> None:
    assert broken_promises(executed) == []


def executed_cell(source: str, *outputs: nbformat.NotebookNode) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(source, execution_count=1)
    cell.outputs = list(outputs)
    return cell


def test_the_promises_catch_what_a_broken_chapter_shows() -> None:
    def stdout(text: str) -> nbformat.NotebookNode:
        return nbformat.v4.new_output("stream", name="stdout", text=text)

    good = nbformat.v4.new_notebook()
    good.cells = [
        executed_cell("import sys"),
        executed_cell("print(provenance.mode_banner())", stdout("QUICK MODE (...)\n")),
        executed_cell("# your code here: define f, then call check_f(f)"),
        executed_cell("ch01.check_f(f)", stdout("Correct! ...\n")),
    ]
    assert broken_promises(good) == []

    bad = nbformat.v4.new_notebook()
    error = nbformat.v4.new_output("error", ename="ZeroDivisionError", evalue="division by zero")
    bad.cells = [
        executed_cell("import sys", error),
        executed_cell("print(provenance.mode_banner())", stdout("hello\n")),
        nbformat.v4.new_code_cell("x = 1"),
        executed_cell("check_f(f)  # prints its verdict", stdout("\n")),
    ]
    problems = broken_promises(bad)
    assert problems == [
        "code cell 2 was not executed",
        "code cell 0 shows an error: ZeroDivisionError: division by zero",
        "the second code cell must print the mode banner, not 'hello\\n'",
        "the exercise check in code cell 3 printed no verdict",
    ]


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
