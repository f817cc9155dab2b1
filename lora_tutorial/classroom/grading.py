"""The grader: run each submitted notebook in its own kernel and record every checked exercise.

Submissions are untrusted code. Each one runs in a fresh Jupyter kernel whose working folder,
cache and configuration folders are a new temporary folder, deleted afterwards, with network
proxies pointed at a closed port; that keeps honest mistakes contained but is **not** a sandbox:
the code runs with the teacher's permissions. Run the grader in a container or a throwaway
account when the submissions come from people you do not trust.

How an exercise gets its status: the submission runs top to bottom; right after an exercise's
answer cell (found by its metadata, else by its check call) the grader runs the exercise's own
check snippet from the chapter in the same kernel and reads the check's return value.

- ``pass``: the check returned True;  ``fail``: it returned False (its printout is the message);
- ``raised``: the answer cell or the check raised (the exception is the message);
- ``timeout``: the answer cell or the check ran past the cell limit, or the notebook's ran out;
- ``not-attempted``: the answer cell is missing or still the stub it was handed out with;
- ``broken``: the notebook cannot be read, or its kernel died before the exercise was graded.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError
from tqdm import tqdm

from lora_tutorial.classroom.notebooks import (
    META,
    Exercise,
    answer_cell_source,
    chapter_paths,
    exercises,
)
from lora_tutorial.runtime import config
from lora_tutorial.runtime.files import atomic_write

STATUSES = ("pass", "fail", "raised", "timeout", "not-attempted", "broken")
_TIMEOUT = "CellTimeout"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Grade:
    """One row of ``grades.csv``: one student's result on one exercise."""

    student: str
    chapter: str
    exercise: str
    status: str
    message: str


def _normalize(source: str) -> str:
    return "\n".join(line.rstrip() for line in source.strip().splitlines())


def _reply(outcome: dict[str, Any]) -> tuple[str, str]:
    """``(kind, message)`` of an executed cell: kind is ``ok``, ``error`` or ``timeout``."""
    content = outcome.get("content", {})
    if content.get("status") != "error":
        return "ok", ""
    if content.get("ename") == _TIMEOUT:
        return "timeout", content.get("evalue", "")
    return "error", _ANSI.sub("", f"{content.get('ename')}: {content.get('evalue')}")


def _stdout(cell: nbformat.NotebookNode) -> str:
    text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")
    return " ".join(_ANSI.sub("", text).split())


def _result(cell: nbformat.NotebookNode) -> str | None:
    for out in cell.get("outputs", []):
        if out.output_type == "execute_result":
            return str(out.get("data", {}).get("text/plain", ""))
    return None


class _Session:
    """One submission's kernel: runs cells within the cell and notebook limits."""

    def __init__(self, nb: nbformat.NotebookNode, folder: Path, cell_timeout: int, deadline: float):
        self.nb, self.cell_timeout, self.deadline = nb, cell_timeout, deadline
        km = AsyncKernelManager(kernel_name="python3")
        km.connection_file = str(folder / "kernel.json")  # the grader writes only into `folder`
        self.client = NotebookClient(
            nb,
            km=km,
            timeout=cell_timeout,
            allow_errors=True,
            interrupt_on_timeout=True,
            error_on_timeout={"ename": _TIMEOUT, "evalue": "", "traceback": []},
            shutdown_kernel="immediate",
            resources={"metadata": {"path": str(folder / "work")}},
        )
        self.client.on_cell_executed = self._remember
        self._last: dict[str, Any] = {}

    def _remember(self, **kwargs: Any) -> None:
        self._last = kwargs.get("execute_reply") or {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cell: nbformat.NotebookNode, index: int | None = None) -> tuple[str, str]:
        """Run ``cell`` (notebook cell ``index``, or an extra one); DeadKernelError escapes."""
        limit = max(1, min(self.cell_timeout, int(self.left())))
        self.client.timeout = limit
        self._last = {}
        if index is None:  # nbclient stores a cell back by index: give an extra cell a slot
            self.nb.cells.append(cell)
            try:
                self.client.execute_cell(cell, len(self.nb.cells) - 1)
            finally:
                self.nb.cells.pop()
        else:
            self.client.execute_cell(cell, index)
        kind, message = _reply(self._last)
        if kind == "timeout":
            message = f"ran past the time limit of {limit} s"
        return kind, message


def _kernel_env(folder: Path, quick: bool) -> dict[str, str]:
    """The kernel's environment: the mode, offline, and every writable folder inside ``folder``."""
    env = dict(os.environ)
    env[config.QUICK_ENV] = "1" if quick else "0"
    env[config.REHEARSAL_ENV] = "0"
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[name] = "http://127.0.0.1:9"  # a closed port: downloads fail at once
    env.update(NO_PROXY="", no_proxy="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(IPYTHONDIR=str(folder / "ipython"), MPLCONFIGDIR=str(folder / "matplotlib"))
    env.update(PYTHONDONTWRITEBYTECODE="1", HOME=str(folder / "home"))
    if quick:  # full mode needs the teacher's cache of GPT-2 weights, since nothing is downloaded
        env[config.CACHE_ENV] = str(folder / "cache")
    return env


def _chapter_of(nb: nbformat.NotebookNode | None, path: Path, chapters: list[Path]) -> Path | None:
    """Which chapter a submission is: its metadata, else its file name, else its chapter title."""
    by_stem = {p.stem: p for p in chapters}
    if nb is not None:
        stem = nb.metadata.get(META, {}).get("chapter")
        if stem in by_stem:
            return by_stem[stem]
    for stem, chapter in by_stem.items():
        if stem in path.name:
            return chapter
    if nb is not None:
        text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
        for chapter in chapters:
            first = nbformat.read(chapter, as_version=4).cells[0].source.splitlines()[0]
            if first in text:
                return chapter
    return None


def _answer_cells(nb: nbformat.NotebookNode, checked: list[Exercise]) -> dict[int, Exercise]:
    """Cell index → exercise, for the answer cells found (metadata first, then the check call)."""
    found: dict[int, Exercise] = {}
    for ex in checked:
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code" and cell.metadata.get(META, {}).get("exercise") == ex.label:
                found[i] = ex
                break
        else:
            for i, cell in enumerate(nb.cells):
                if (
                    cell.cell_type == "code"
                    and f"{ex.check_name}(" in cell.source
                    and i not in found
                ):
                    found[i] = ex
                    break
    return found


def grade_submission(
    path: Path,
    student: str,
    chapters: list[Path],
    cell_timeout: int = 120,
    notebook_timeout: int = 1800,
    quick: bool = True,
) -> list[Grade]:
    """Run one submission and grade each checked exercise; a bad notebook is a row."""
    nb: nbformat.NotebookNode | None = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nb = nbformat.read(path, as_version=4)
        problem = None
    except Exception as err:  # invalid JSON, not a notebook, unreadable file
        problem = f"cannot read the notebook: {type(err).__name__}: {err}"
    chapter = _chapter_of(nb, path, chapters)
    if chapter is None:
        why = problem or "cannot tell which chapter this is (no chapter metadata, name or title)"
        return [Grade(student, "?", "?", "broken", why)]
    checked = [ex for ex in exercises(chapter) if ex.check]
    grades: dict[str, Grade] = {}

    def record(ex: Exercise, status: str, message: str = "") -> None:
        grades[ex.label] = Grade(student, chapter.stem, ex.label, status, message)

    def finish(status: str, message: str) -> list[Grade]:
        for ex in checked:
            if ex.label not in grades:
                record(ex, status, message)
        return [grades[ex.label] for ex in checked]

    if nb is None:
        return finish("broken", problem or "")
    answers = _answer_cells(nb, checked)
    for missing in checked:
        if missing not in answers.values():
            record(missing, "not-attempted", "the answer cell is missing")
    with tempfile.TemporaryDirectory(prefix="lora-tutorial-grade-") as tmp:
        folder = Path(tmp)
        (folder / "work").mkdir()
        session = _Session(nb, folder, cell_timeout, time.monotonic() + notebook_timeout)
        try:
            with session.client.setup_kernel(  # the kernel process's own stderr: its warnings
                env=_kernel_env(folder, quick), cwd=str(folder / "work"), stderr=subprocess.DEVNULL
            ):
                for index, cell in enumerate(list(nb.cells)):
                    if cell.cell_type != "code":
                        continue
                    if session.left() <= 0:
                        return finish("timeout", f"the notebook ran past {notebook_timeout} s")
                    ex = answers.get(index)
                    untouched = ex is not None and _normalize(cell.source) in (
                        "",
                        _normalize(answer_cell_source(ex)),
                    )
                    kind, message = session.run(cell, index)
                    if (
                        kind == "timeout"
                        and session.run(nbformat.v4.new_code_cell("pass"))[0] != "ok"
                    ):
                        if ex is not None:
                            record(ex, "timeout", f"cell {index} {message}")
                        return finish("timeout", f"not run: the kernel hung in cell {index}")
                    if ex is None:
                        continue
                    if untouched:
                        record(ex, "not-attempted", "the answer cell is unchanged")
                    elif kind != "ok":
                        record(ex, "timeout" if kind == "timeout" else "raised", message)
                    else:
                        _check(session, ex, record)
        except DeadKernelError:
            return finish("broken", "the kernel died (os._exit, a crash or out of memory)")
        except Exception as err:  # the kernel did not start, or the protocol broke
            return finish("broken", f"grading failed: {type(err).__name__}: {err}")
    return finish("not-attempted", "")


def _check(session: _Session, ex: Exercise, record: Any) -> None:
    """Run the chapter's own check snippet in the submission's kernel and record what it says."""
    cell = nbformat.v4.new_code_cell(ex.check or "")
    kind, message = session.run(cell)
    if kind == "timeout":
        record(ex, "timeout", f"the check {message}")
    elif kind == "error" and message.startswith("NameError") and f"'{ex.function}'" in message:
        record(ex, "fail", f"{ex.function} is not defined")
    elif kind == "error":
        record(ex, "raised", message)
    elif _result(cell) == "True":
        record(ex, "pass", _stdout(cell))
    else:
        record(ex, "fail", _stdout(cell) or f"the check returned {_result(cell)}")


def student_names(paths: Sequence[Path]) -> list[str]:
    """Each submission's student: its file name without ``.ipynb`` (its path where names repeat)."""
    stems = [p.stem for p in paths]
    return [p.stem if stems.count(p.stem) == 1 else str(p.with_suffix("")) for p in paths]


def grade(
    paths: Sequence[Path],
    chapters_folder: Path | None = None,
    cell_timeout: int = 120,
    notebook_timeout: int = 1800,
    quick: bool = True,
    jobs: int = 1,
) -> list[Grade]:
    """Grade every submission (a fresh kernel each, ``jobs`` at a time); a broken one stops nothing.

    The rows come in the order of ``paths``, each submission's exercises in chapter order.
    """
    if jobs < 1:
        raise ValueError(f"jobs={jobs}: grade at least one submission at a time")
    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        raise FileNotFoundError(
            "no Jupyter kernel named python3 to run submissions in: pip install ipykernel"
        ) from None
    chapters = chapter_paths(chapters_folder)
    paths = [Path(p) for p in paths]
    names = student_names(paths)

    def one(i: int) -> list[Grade]:
        return grade_submission(paths[i], names[i], chapters, cell_timeout, notebook_timeout, quick)

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # each kernel is its own process
        results = list(tqdm(pool.map(one, range(len(paths))), total=len(paths), desc="grading"))
    return [row for rows in results for row in rows]


def write_csv(grades: Sequence[Grade], out: Path) -> None:
    """Write ``grades.csv`` atomically: the complete table appears, or nothing does."""
    with atomic_write(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([field.name for field in fields(Grade)])
        writer.writerows(astuple(g) for g in grades)


def summary(grades: Sequence[Grade]) -> pd.DataFrame:
    """Per exercise: how many students got each status, and the pass rate."""
    table = pd.DataFrame([g.__dict__ for g in grades], columns=[f.name for f in fields(Grade)])
    counts = pd.crosstab([table.chapter, table.exercise], table.status)
    counts = counts.reindex(
        columns=[s for s in STATUSES if s in counts.columns] or ["pass"], fill_value=0
    )
    counts["pass rate"] = (counts.get("pass", 0) / counts.sum(axis=1)).map("{:.0%}".format)
    return counts.reset_index().rename_axis(columns=None)
