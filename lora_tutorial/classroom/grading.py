"""The grader: each submission runs sandboxed; every verdict is decided outside it.

**Threat model.** A submission is hostile code. It may patch checks, ``sys.modules``, builtins or
IPython (input transformers), print fake verdicts, call ``os._exit``, fork daemons, signal its
parent, fill memory or disk, reach the network, write to any file its user may write (the package,
other submissions, ``grades.csv``), or be a symlink, a FIFO or a huge file. The grader must still
give it no ``pass`` it has not earned, and leave ``grades.csv``, the other submissions and the
package as they were.

**How a verdict is produced.** Each exercise check is a *probe* and a *judge*
(``lora_tutorial.exercises._feedback``). At start-up, before any student code runs, the grader
imports every check module and records the sha256 of the package's files. Per submission it:

1. copies the file (a regular file only, at most ``MAX_BYTES``) into a private temporary folder and
   reads the notebook there; it finds the answer cells and which are untouched stubs itself;
2. starts a disposable runner (``_sandbox.py``) in new user, network, PID and mount namespaces
   (``unshare``) where the system allows them: every file system but its folder is read-only, the
   network is loopback only, the grader's processes are invisible, and every process of the
   submission dies with the namespace. Without namespaces the runner gets a new session, proxy
   variables pointing at a closed port, and the grader kills its whole process tree afterwards and
   restores any package file or submission changed meanwhile. Either way: resource limits
   (memory, CPU, file size, open files, processes), a wall-clock limit, no kept output;
3. the runner executes the notebook in a kernel and, after each attempted answer cell, the
   exercise's probe, which writes the answer's outputs on the check's inputs as plain JSON data;
4. the grader reads those files as *data* (size-capped, decoded into exact builtin types, tensors
   and DataFrames only) and calls the judge, in its own process, on them. Nothing the submission
   prints or returns is ever read as a verdict; the worst a submission can do is forge the outputs
   for the check's inputs, which means computing the right answers.

Statuses: ``pass`` (the judge accepted the outputs), ``fail`` (it did not; its message says why),
``raised`` (the answer cell or the answer raised), ``timeout`` (a cell or the notebook ran past its
limit), ``not-attempted`` (the answer cell is missing or still the stub), ``broken`` (the submission
could not be read or run to that exercise: the kernel or runner died, it is not a regular file, it
changed files outside its folder, or it sent malformed data).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from tqdm import tqdm

import lora_tutorial
from lora_tutorial.classroom.notebooks import (
    META,
    STUDENT_TEXT,
    Exercise,
    answer_cell_source,
    chapter_paths,
    exercises,
)
from lora_tutorial.exercises._feedback import Check
from lora_tutorial.runtime import config
from lora_tutorial.runtime.files import atomic_write

STATUSES = ("pass", "fail", "raised", "timeout", "not-attempted", "broken")
MAX_BYTES = 20 * 2**20  # the largest submission file graded
MAX_MESSAGE = 500  # characters kept of a message in grades.csv
MAX_PROBE = 16 * 2**20  # bytes read of one probe's data
MEMORY_LIMIT = 8 * 2**30  # address space of a submission's processes
SANDBOX_ENV = "LORA_TUTORIAL_SANDBOX"  # "plain" turns namespaces off (to test the fallback)
_FORMULA = ("=", "+", "-", "@", "\t", "\r")
_JUDGING = threading.Lock()  # judges run one at a time (see _judge)


class GradingError(ValueError):
    """Bad input to the grader, found before anything runs (its message is one line)."""


@dataclass(frozen=True)
class Grade:
    """One row of ``grades.csv``: one student's result on one exercise."""

    student: str
    chapter: str
    exercise: str
    status: str
    message: str


def _clip(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def _normalize(source: str) -> str:
    return "\n".join(line.rstrip() for line in source.strip().splitlines())


def _unchanged(exercise: Exercise) -> set[str]:
    """The exercise's answer cell as generated, in every language of the student notebooks."""
    return {_normalize(answer_cell_source(exercise, lang=lang)) for lang in STUDENT_TEXT}


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


class _Package:
    """The package's files as the grader found them at start-up: digests and contents."""

    def __init__(self) -> None:
        self.root = Path(lora_tutorial.__file__).resolve().parent
        self.files = {p: p.read_bytes() for p in sorted(self.root.rglob("*.py"))}
        self.digests = {p: hashlib.sha256(b).hexdigest() for p, b in self.files.items()}
        for p in sorted((self.root / "exercises").glob("ch*.py")):  # trusted copies, in memory
            importlib.import_module(f"lora_tutorial.exercises.{p.stem}")

    def changed(self) -> list[Path]:
        found = {p for p in self.root.rglob("*.py") if p.is_file()} | set(self.files)
        return sorted(p for p in found if _digest(p) != self.digests.get(p))

    def restore(self) -> list[Path]:
        """Put back every changed file (and remove added ones); return what was changed."""
        changed = self.changed()
        for p in changed:
            if p in self.files:
                with atomic_write(p) as tmp:
                    tmp.write_bytes(self.files[p])
            else:
                p.unlink(missing_ok=True)
        return changed


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def read_submission(path: Path) -> bytes:
    """The bytes of a submission: a regular file (no symlink, FIFO or device), at most MAX_BYTES."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        if path.is_symlink():
            raise GradingError("it is a symbolic link, not a regular file") from None
        raise GradingError(f"cannot open it: {err.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise GradingError("it is not a regular file")
        if info.st_size > MAX_BYTES:
            raise GradingError(f"it is larger than {MAX_BYTES // 2**20} MB")
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise GradingError(f"it is larger than {MAX_BYTES // 2**20} MB")
    return data


def namespaces_available() -> bool:
    """Whether ``unshare`` can give a runner its own user, network, PID and mount namespaces."""
    if os.environ.get(SANDBOX_ENV) == "plain" or shutil.which("unshare") is None:
        return False
    try:
        done = subprocess.run([*_UNSHARE, "true"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


_UNSHARE = ["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"]
_UNSHARE += ["--mount", "--mount-proc"]


def _sandbox_env(folder: Path, quick: bool, namespaces: bool) -> dict[str, str]:
    """The runner's environment: the mode, offline, and every writable folder inside ``folder``."""
    keep = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "VIRTUAL_ENV", config.DATA_ENV)
    env = {k: os.environ[k] for k in keep if k in os.environ}
    if not quick and config.CACHE_ENV in os.environ:
        env[config.CACHE_ENV] = os.environ[config.CACHE_ENV]
    env[config.QUICK_ENV] = "1" if quick else "0"
    env[config.REHEARSAL_ENV] = "0"
    if not namespaces:  # no network namespace: at least point downloads at a closed port
        for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            env[name] = "http://127.0.0.1:9"
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    for name, sub in (
        ("HOME", "home"),
        ("TMPDIR", "tmp"),
        ("IPYTHONDIR", "ipython"),
        ("MPLCONFIGDIR", "matplotlib"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("JUPYTER_DATA_DIR", "jupyter"),
        ("XDG_CACHE_HOME", "cache"),
    ):
        (folder / sub).mkdir(exist_ok=True)
        env[name] = str(folder / sub)
    if quick:  # full mode needs the teacher's cache of GPT-2 weights, since nothing is downloaded
        env[config.CACHE_ENV] = str(folder / "cache")
    return env


def _limits(notebook_timeout: int) -> dict[str, int]:
    return {
        "RLIMIT_AS": MEMORY_LIMIT,
        "RLIMIT_CPU": 2 * notebook_timeout + 60,
        "RLIMIT_FSIZE": 256 * 2**20,
        "RLIMIT_NOFILE": 1024,
        "RLIMIT_CORE": 0,
        "RLIMIT_NPROC": _processes_of_user() + 256,
    }


def _processes_of_user() -> int:
    uid = os.getuid()
    count = 0
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            count += entry.name.isdigit() and entry.stat().st_uid == uid
    return count


class _Runs:
    """The runners alive now, so that a signal to the grader can kill them and clean up."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.folders: set[Path] = set()

    def kill_all(self) -> None:
        with self.lock:
            procs, folders = list(self.procs), list(self.folders)
        for proc in procs:
            _kill_tree(proc)
        for folder in folders:
            _remove(folder)


_RUNS = _Runs()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = (entry / "stat").read_text()
            if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a runner, its process group and every process below it (until none is left)."""
    for _ in range(50):
        stack, tree = [proc.pid], []
        while stack:
            pid = stack.pop()
            kids = _children(pid)
            tree += kids
            stack += kids
        for pid in tree:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if not tree:
            break
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _remove(folder: Path) -> None:
    def unlock(func: Any, path: str, _: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            func(path)

    shutil.rmtree(folder, onerror=unlock)
    shutil.rmtree(folder, ignore_errors=True)


def _read_capped(path: Path, limit: int) -> str | None:
    """A file the runner wrote: a regular file of at most ``limit`` bytes, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        data = f.read(limit + 1)
    return data.decode("utf-8", "replace") if len(data) <= limit else None


def _check_of(ex: Exercise) -> tuple[str, str]:
    """The check's module and name, e.g. ``("lora_tutorial.exercises.ch01", "check_rank")``."""
    match = re.search(r"from\s+(lora_tutorial\.exercises\.\w+)\s+import", ex.check or "")
    if not match or not ex.check_name:
        raise GradingError(f"{ex.label}: its check is not 'from lora_tutorial.exercises.X import'")
    return match.group(1), ex.check_name


def _judge(ex: Exercise, data: str | None) -> tuple[str, str]:
    """The status and message of an exercise from its probe's data, decided in this process."""
    if data is None:
        return "broken", "the check's data are missing or too large"
    module, name = _check_of(ex)
    check = getattr(sys.modules.get(module), name, None)
    if not isinstance(check, Check):
        return "broken", f"{module}.{name} is not a check"
    try:  # redirect_stdout swaps sys.stdout for every thread: one judge at a time
        with _JUDGING, contextlib.redirect_stdout(None):
            problems, success = check.verdict(data)
    except Exception as err:  # forged or malformed data: never a pass
        return "broken", f"the check's data are malformed ({type(err).__name__})"
    if problems:
        return "fail", "Not yet: " + " ".join(f"- {p}" for p in problems)
    return "pass", f"Correct! {success}"


def grade_submission(
    path: Path,
    student: str,
    chapters: list[Path],
    cell_timeout: int = 120,
    notebook_timeout: int = 1800,
    quick: bool = True,
    namespaces: bool | None = None,
    package: _Package | None = None,
    guarded: Sequence[Path] = (),
) -> list[Grade]:
    """Run one submission sandboxed and grade each checked exercise; a bad notebook is a row."""
    namespaces = namespaces_available() if namespaces is None else namespaces
    package = package or _Package()
    nb: nbformat.NotebookNode | None = None
    problem = None
    try:
        raw = read_submission(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nb = nbformat.reads(raw.decode("utf-8"), as_version=4)
    except GradingError as err:
        problem = f"not graded: {err}"
    except Exception as err:  # invalid JSON, not a notebook, not UTF-8
        problem = f"cannot read the notebook: {type(err).__name__}: {err}"
    chapter = _chapter_of(nb, path, chapters)
    if chapter is None:
        why = problem or "cannot tell which chapter this is (no chapter metadata, name or title)"
        return [Grade(student, "?", "?", "broken", _clip(why))]
    checked = [ex for ex in exercises(chapter) if ex.check]
    grades: dict[str, Grade] = {}

    def record(ex: Exercise, status: str, message: str = "") -> None:
        grades[ex.label] = Grade(student, chapter.stem, ex.label, status, _clip(message))

    def finish(status: str, message: str) -> list[Grade]:
        for ex in checked:
            if ex.label not in grades:
                record(ex, status, message)
        return [grades[ex.label] for ex in checked]

    if nb is None:
        return finish("broken", problem or "")
    answers = _answer_cells(nb, checked)
    attempted: dict[int, Exercise] = {}
    for ex in checked:
        index = next((i for i, e in answers.items() if e is ex), None)
        if index is None:
            record(ex, "not-attempted", "the answer cell is missing")
        elif _normalize(nb.cells[index].source) in {"", *_unchanged(ex)}:
            record(ex, "not-attempted", "the answer cell is unchanged")
        else:
            attempted[index] = ex
    if not attempted:
        return finish("not-attempted", "")
    guarded_before = {p: _digest(p) for p in guarded}
    folder = Path(tempfile.mkdtemp(prefix="lora-tutorial-grade-"))
    with _RUNS.lock:
        _RUNS.folders.add(folder)
    try:
        events = _run_sandbox(
            nb, folder, attempted, cell_timeout, notebook_timeout, quick, namespaces
        )
        probes = {
            ex.label: _read_capped(folder / f"probe-{ex.label}.json", MAX_PROBE) for ex in checked
        }
    finally:
        _remove(folder)
        with _RUNS.lock:
            _RUNS.folders.discard(folder)
    tampered = [str(p) for p in package.restore()]
    tampered += [str(p) for p, d in guarded_before.items() if _digest(p) != d]
    if tampered:
        for ex in checked:
            grades.pop(ex.label, None)
        return finish("broken", f"it changed files outside its folder: {', '.join(tampered)}")
    for ex in attempted.values():
        row = events.get(ex.label)
        if row is None:
            continue
        kind, message, stage = row
        if kind == "timeout":
            record(ex, "timeout", f"the {stage} ran past the time limit")
        elif (
            kind == "error"
            and stage == "check"
            and message.startswith("NameError")
            and (f"'{ex.function}'" in message)
        ):
            record(ex, "fail", f"{ex.function} is not defined")
        elif kind == "error":
            record(ex, "raised", message)
        else:
            record(ex, *_judge(ex, probes[ex.label]))
    end = events.get("")
    if end == ("notebook-timeout", "", ""):
        return finish("timeout", f"the notebook ran past {notebook_timeout} s")
    if end is not None and end[0] == "hung":
        return finish("timeout", "not run: the kernel hung in an earlier cell")
    if end is None or end[0] != "done":
        return finish(
            "broken", "the kernel died, or its runner did (os._exit, a signal, out of memory)"
        )
    return finish("not-attempted", "")


def _run_sandbox(
    nb: nbformat.NotebookNode,
    folder: Path,
    attempted: dict[int, Exercise],
    cell_timeout: int,
    notebook_timeout: int,
    quick: bool,
    namespaces: bool,
) -> dict[str, tuple[str, str, str]]:
    """Run the submission in its runner; return label → (kind, message, stage), "" → the end."""
    (folder / "work").mkdir()
    nbformat.write(nb, folder / "work" / "submission.ipynb")
    job = {
        "folder": str(folder),
        "namespaces": namespaces,
        "cell_timeout": cell_timeout,
        "notebook_timeout": notebook_timeout,
        "limits": _limits(notebook_timeout),
        "answers": {
            str(i): dict(
                zip(("module", "check"), _check_of(ex)), label=ex.label, function=ex.function
            )
            for i, ex in attempted.items()
        },
    }
    (folder / "job.json").write_text(json.dumps(job))
    command = [sys.executable, "-m", "lora_tutorial.classroom._sandbox", str(folder / "job.json")]
    proc = subprocess.Popen(
        [*_UNSHARE, *command] if namespaces else command,
        cwd=folder / "work",
        env=_sandbox_env(folder, quick, namespaces),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    with _RUNS.lock:
        _RUNS.procs.add(proc)
    try:
        proc.wait(timeout=notebook_timeout + 2 * cell_timeout + 60)
    except subprocess.TimeoutExpired:
        pass
    finally:
        _kill_tree(proc)
        with _RUNS.lock:
            _RUNS.procs.discard(proc)
    labels = {ex.label for ex in attempted.values()}
    events: dict[str, tuple[str, str, str]] = {}
    for line in (_read_capped(folder / "results.jsonl", MAX_PROBE) or "").splitlines():
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            row = json.loads(line)
            if row.get("label") in labels and row.get("kind") in ("ok", "error", "timeout"):
                stage = "check" if row.get("stage") == "check" else "answer"
                events[row["label"]] = (row["kind"], _clip(str(row.get("message", ""))), stage)
            elif row.get("event") in ("done", "died", "hung", "notebook-timeout"):
                events[""] = (row["event"], "", "")
    return events


def student_names(paths: Sequence[Path]) -> list[str]:
    """Each submission's student: its file name without ``.ipynb``, unique whatever the case."""
    names = [
        p.name[: -len(".ipynb")] if p.name.lower().endswith(".ipynb") else p.stem for p in paths
    ]
    seen: dict[str, Path] = {}
    for path, name in zip(paths, names):
        other = seen.setdefault(name.casefold(), path)
        if other != path:
            raise GradingError(
                f"{other} and {path} give the same student name {name!r}: rename one of them"
            )
    return names


def check_inputs(
    paths: Sequence[Path], out: Path | None, chapters_folder: Path | None, overwrite: bool = True
) -> tuple[list[Path], list[Path]]:
    """The submissions (duplicates dropped) and the chapters; GradingError for any bad input."""
    if chapters_folder is not None and not Path(chapters_folder).is_dir():
        raise GradingError(f"--chapters-dir {chapters_folder} is not a folder")
    try:
        chapters = chapter_paths(chapters_folder)
    except FileNotFoundError as err:
        raise GradingError(str(err)) from None
    if not chapters:
        raise GradingError(f"no chapter notebooks (NN_name.ipynb) in {chapters_folder}")
    unique: dict[Path, Path] = {}
    for p in map(Path, paths):
        unique.setdefault(Path(os.path.abspath(p)), p)
    kept = list(unique.values())
    student_names(kept)
    if out is not None:
        out = Path(out)
        target = Path(os.path.abspath(out))
        if out.is_dir():
            raise GradingError(f"--out {out} is a folder; name a CSV file")
        if not target.parent.is_dir():
            raise GradingError(f"--out {out}: the folder {target.parent} does not exist")
        if not os.access(target.parent, os.W_OK):
            raise GradingError(f"--out {out}: cannot write into {target.parent}")
        if out.exists() and not overwrite:
            raise GradingError(f"{out} exists; choose another --out or pass --overwrite")
        for p in unique:
            if p == target or p.resolve() == target.resolve():
                raise GradingError(f"--out {out} is one of the submissions; choose another file")
            if p.parent == target.parent and len(unique) > 1:
                raise GradingError(
                    f"--out {out} is in the submissions' folder {p.parent}; write it elsewhere"
                )
    return kept, chapters


class Interrupted(Exception):
    """The grader was told to stop (SIGTERM, SIGINT); what was graded is kept."""


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`Interrupted` (in the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def grade(
    paths: Sequence[Path],
    chapters_folder: Path | None = None,
    cell_timeout: int = 120,
    notebook_timeout: int = 1800,
    quick: bool = True,
    jobs: int = 1,
    out: Path | None = None,
) -> list[Grade]:
    """Grade every submission (each sandboxed, ``jobs`` at a time); a broken one stops nothing.

    The rows come in the order of ``paths``, each submission's exercises in chapter order. With
    ``out``, ``grades.csv`` is rewritten (atomically) each time a student is done, so an
    interrupted run keeps what it graded; :class:`Interrupted` is raised after that.
    """
    if jobs < 1:
        raise GradingError(f"jobs={jobs}: grade at least one submission at a time")
    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        raise GradingError(
            "no Jupyter kernel named python3 to run submissions in: pip install ipykernel"
        ) from None
    kept, chapters = check_inputs(paths, out, chapters_folder)
    names = student_names(kept)
    package = _Package()
    namespaces = namespaces_available()
    guarded = [p for p in kept if p.is_file() and not p.is_symlink()]
    done: dict[int, list[Grade]] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        rows = grade_submission(
            kept[i],
            names[i],
            chapters,
            cell_timeout,
            notebook_timeout,
            quick,
            namespaces,
            package,
            [p for p in guarded if p != kept[i]],
        )
        with lock:
            done[i] = rows
            if out is not None:
                write_csv([g for j in sorted(done) for g in done[j]], out)

    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        with _stop_on_signals():
            futures = [pool.submit(one, i) for i in range(len(kept))]
            for future in tqdm(as_completed(futures), total=len(futures), desc="grading"):
                future.result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        _RUNS.kill_all()
        package.restore()
        raise
    finally:
        pool.shutdown(wait=True)
    return [g for j in sorted(done) for g in done[j]]


def _cell(value: str) -> str:
    """A CSV cell that a spreadsheet shows as text, never runs as a formula."""
    return "'" + value if value.startswith(_FORMULA) else value


def write_csv(grades: Sequence[Grade], out: Path) -> None:
    """Write ``grades.csv`` atomically (the complete table appears, or nothing does); every text
    cell is escaped against spreadsheet formulas."""
    with atomic_write(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([field.name for field in fields(Grade)])
        writer.writerows([_cell(_clip(v)) for v in astuple(g)] for g in grades)


def summary(grades: Sequence[Grade]) -> pd.DataFrame:
    """Per exercise: how many students got each status, and the pass rate."""
    table = pd.DataFrame([g.__dict__ for g in grades], columns=[f.name for f in fields(Grade)])
    counts = pd.crosstab([table.chapter, table.exercise], table.status)
    counts = counts.reindex(
        columns=[s for s in STATUSES if s in counts.columns] or ["pass"], fill_value=0
    )
    counts["pass rate"] = (counts.get("pass", 0) / counts.sum(axis=1)).map("{:.0%}".format)
    return counts.reset_index().rename_axis(columns=None)
