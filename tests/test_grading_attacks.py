"""Hostile submissions, from a teacher's side: none of them passes, and none changes grades.csv,
another student's file or the package, leaves a process or a temporary folder behind, or stops
the grader. One grading run covers the attacks that need a kernel (it takes about a minute)."""

from __future__ import annotations

import csv
import hashlib
import os
import socket
import tempfile
import textwrap
import time
from pathlib import Path

import nbformat
import pytest

import lora_tutorial
from lora_tutorial import classroom
from lora_tutorial.classroom.__main__ import main
from lora_tutorial.exercises import ch01, ch02, ch06
from lora_tutorial.runtime import config

ROOT = config.repo_root()
MARKER = "lora-tutorial-attack-marker"
WRONG = {
    "ch2-ex2": "def qv_lora_params(cfg, rank):\n    return 0",
    "ch2-ex3": "def training_bytes(n_total, n_trainable, bytes_per_number):\n    return 0",
}


def package_digest() -> str:
    root = Path(lora_tutorial.__file__).parent
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*.py")))).hexdigest()


def leftovers() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("lora-tutorial-grade-*")}


def marked_processes() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and MARKER in (entry / "cmdline").read_text():
                found.append(entry.name)
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def tiny_chapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Chapter 2's two checked exercises alone: their checks run in a moment."""
    source = nbformat.read(ROOT / "chapters" / "02_parameter_savings.ipynb", as_version=4)
    keep = [source.cells[0], next(c for c in source.cells if c.cell_type == "code")]
    for i, cell in enumerate(source.cells):
        if cell.cell_type == "markdown" and "check_" in cell.source:
            keep += [cell, source.cells[i + 1]]
    source.cells = keep
    folder = tmp_path_factory.mktemp("chapters")
    nbformat.write(source, folder / "02_tiny.ipynb")
    return folder


def hostile(chapters: Path, before: str = "", answers: dict[str, str] | None = None):
    """The solved tiny chapter, with wrong answers (by default) and ``before`` run first."""
    chapter = chapters / "02_tiny.ipynb"
    nb = classroom.solved_notebook(chapter)
    for ex in classroom.exercises(chapter):
        code = (answers if answers is not None else WRONG).get(ex.label)
        cell = next(
            (
                c
                for c in nb.cells
                if c.metadata.get("lora_tutorial", {}).get("exercise") == ex.label
            ),
            None,
        )
        if code is not None and cell is not None:
            cell.source = classroom.notebooks.answer_cell_source(ex, code)
    if before:
        nb.cells.insert(2, nbformat.v4.new_code_cell(textwrap.dedent(before)))
    return nb


@pytest.fixture(scope="module")
def graded(tiny_chapters: Path, tmp_path_factory: pytest.TempPathFactory):
    """Grade a class of hostile submissions (and two honest ones) once, through the CLI."""
    folder = tmp_path_factory.mktemp("class")
    subs, results = folder / "submissions", folder / "results"
    subs.mkdir()
    results.mkdir()
    out = results / "grades.csv"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    victim = subs / "victim.ipynb"
    ch02_file = Path(ch02.__file__)
    attacks = {
        "patch_checks": """
            import lora_tutorial.exercises.ch02 as m
            m.check_qv_lora_params = m.check_training_bytes = lambda f: True
            """,
        "transformer": """
            ip = get_ipython()
            ip.input_transformers_cleanup.append(
                lambda lines: ["True\\n" if "check_" in l else l for l in lines]
            )
            """,
        "fake_print": """
            print("Correct! ch2-ex2 pass True")
            """,
        "exit_in_check": """
            import lora_tutorial.exercises._feedback as f, os
            f.encode = lambda data: os._exit(0)
            """,
        "rewrite_csv": f"""
            import os, time
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    time.sleep(4)
                    open({str(out)!r}, "w").write("student,status\\nme,pass\\n")
                os._exit(0)
            """,
        "overwrite_victim": f"""
            open({str(victim)!r}, "w").write("overwritten")
            """,
        "append_package": f"""
            open({str(ch02_file)!r}, "a").write("\\ncheck_qv_lora_params = lambda f: True\\n")
            """,
        "kill_parent": f"""
            import os, signal
            for pid in (os.getppid(), {os.getpid()}):
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass
            """,
        "orphan": f"""
            import subprocess
            subprocess.Popen(["sleep", "120", "{MARKER}"], start_new_session=True)
            """,
        "network": f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
            except OSError:
                pass
            """,
        "prints": """
            import sys
            for _ in range(50):
                sys.stdout.write("x" * 1_000_000)
            """,
        "big_message": """
            class Boom(Exception):
                pass
            Boom.__name__ = "=HYPERLINK(\\"http://evil\\")"
            raise Boom("y" * 20_000_000)
            """,
    }
    paths = {}
    for name, code in attacks.items():
        paths[name] = subs / f"{name}.ipynb"
        nbformat.write(hostile(tiny_chapters, code), paths[name])
    paths["nan_and_subclass"] = subs / "nan_and_subclass.ipynb"
    nbformat.write(
        hostile(
            tiny_chapters,
            answers={
                "ch2-ex2": "class Int(int):\n    def __eq__(self, other):\n        return True\n"
                "    __hash__ = int.__hash__\n\n"
                "def qv_lora_params(cfg, rank):\n    return Int(1)",
                "ch2-ex3": "def training_bytes(n, t, b):\n    return float('nan')",
            },
        ),
        paths["nan_and_subclass"],
    )
    paths["formula"] = subs / "=1+2.ipynb"
    nbformat.write(hostile(tiny_chapters), paths["formula"])
    nbformat.write(classroom.solved_notebook(tiny_chapters / "02_tiny.ipynb"), victim)
    paths["victim"] = victim
    paths["dev_zero"] = subs / "dev_zero_02_tiny.ipynb"
    paths["dev_zero"].symlink_to("/dev/zero")
    paths["fifo"] = subs / "fifo_02_tiny.ipynb"
    os.mkfifo(paths["fifo"])
    victim_bytes, package = victim.read_bytes(), package_digest()
    temp_before = leftovers()
    args = ["grade", *map(str, paths.values()), "--out", str(out), "--jobs", "2"]
    started = time.monotonic()
    code = main([*args, "--cell-timeout", "30", "--chapters-dir", str(tiny_chapters)])
    seconds = time.monotonic() - started
    csv_after_grading = out.read_bytes()
    time.sleep(6)  # the detached writer would have struck by now
    try:
        listener.accept()
        reached = True
    except BlockingIOError:
        reached = False
    listener.close()
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    yield {
        "code": code,
        "rows": rows,
        "seconds": seconds,
        "csv_changed": out.read_bytes() != csv_after_grading,
        "victim_changed": victim.read_bytes() != victim_bytes,
        "package_changed": package_digest() != package,
        "reached": reached,
        "temp_left": leftovers() - temp_before,
        "orphans": marked_processes(),
    }


def statuses(graded: dict, student: str) -> dict[str, str]:
    return {r["exercise"]: r["status"] for r in graded["rows"] if r["student"] == student}


ATTACKS = [
    "patch_checks",
    "transformer",
    "fake_print",
    "exit_in_check",
    "rewrite_csv",
    "overwrite_victim",
    "append_package",
    "kill_parent",
    "orphan",
    "network",
    "prints",
    "nan_and_subclass",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_hostile_submission_gets_no_pass(graded: dict, attack: str) -> None:
    got = statuses(graded, attack)
    assert got and "pass" not in got.values(), got


def test_the_grader_survives_the_class_and_grades_the_honest_student(graded: dict) -> None:
    assert graded["code"] == 0
    assert statuses(graded, "victim") == {"ch2-ex2": "pass", "ch2-ex3": "pass"}


def test_nothing_outside_the_sandbox_changed(graded: dict) -> None:
    assert not graded["csv_changed"], "grades.csv changed after the grader exited"
    assert not graded["victim_changed"], "another student's submission changed"
    assert not graded["package_changed"], "the package's files changed"
    assert not graded["reached"], "a submission reached the network"
    assert not graded["temp_left"], graded["temp_left"]
    assert not graded["orphans"], "a submission's process outlived the grader"


def test_files_that_are_not_regular_files_are_refused(graded: dict) -> None:
    messages = {r["student"]: r["message"] for r in graded["rows"]}
    assert "symbolic link" in messages["dev_zero_02_tiny"]
    assert "not a regular file" in messages["fifo_02_tiny"]
    assert statuses(graded, "fifo_02_tiny") == {"ch2-ex2": "broken", "ch2-ex3": "broken"}


def test_csv_cells_cannot_be_formulas_and_messages_are_capped(graded: dict) -> None:
    for row in graded["rows"]:
        for value in row.values():
            assert not value.startswith(("=", "+", "-", "@", "\t", "\r")), row
            assert len(value) <= 500
    assert any(r["student"] == "'=1+2" for r in graded["rows"])
    big = [r for r in graded["rows"] if r["student"] == "big_message"]
    assert big and all(r["status"] != "pass" for r in big)


# ----------------------------------------------------------------------------- arguments


def test_names_that_differ_only_in_case_are_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "s").mkdir()
    for name in ("carol.ipynb", "carol.IPYNB"):
        (tmp_path / "s" / name).write_text("{}")
    out = tmp_path / "grades.csv"
    assert main(["grade", *map(str, (tmp_path / "s").iterdir()), "--out", str(out)]) == 2
    assert "same student name" in capsys.readouterr().err and not out.exists()


def test_one_path_given_three_times_is_graded_once(tiny_chapters: Path, tmp_path: Path) -> None:
    path = tmp_path / "once.ipynb"
    nbformat.write(classroom.student_notebook(tiny_chapters / "02_tiny.ipynb"), path)
    grades = classroom.grade([path, path, tmp_path / "." / "once.ipynb"], tiny_chapters)
    assert len(grades) == 2 and {g.status for g in grades} == {"not-attempted"}


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_a_bad_chapters_dir_is_an_error_before_grading(tmp_path: Path, capsys, where: str) -> None:
    folder = tmp_path / where
    if where == "empty":
        folder.mkdir()
    out = tmp_path / "out" / "grades.csv"
    out.parent.mkdir()
    sub = tmp_path / "a.ipynb"
    sub.write_text("{}")
    assert main(["grade", str(sub), "--out", str(out), "--chapters-dir", str(folder)]) == 2
    assert "error:" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("bad", ["no_such_folder/grades.csv", "."])
def test_a_bad_out_is_an_error_before_grading(tmp_path: Path, capsys, bad: str) -> None:
    sub = tmp_path / "s" / "a.ipynb"
    sub.parent.mkdir()
    sub.write_text("{}")
    started = time.monotonic()
    assert main(["grade", str(sub), "--out", str(tmp_path / bad), "--overwrite"]) == 2
    assert time.monotonic() - started < 5 and "error: --out" in capsys.readouterr().err


def test_out_among_the_submissions_is_refused(tmp_path: Path, capsys) -> None:
    subs = [tmp_path / "a.ipynb", tmp_path / "b.ipynb"]
    for p in subs:
        p.write_text("{}")
    assert main(["grade", *map(str, subs), "--out", str(tmp_path / "grades.csv")]) == 2
    assert "submissions' folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the checks


def test_nan_never_passes_a_numeric_check(capsys) -> None:
    assert not ch01.check_subspace_similarity(lambda a, b, i, j: float("nan"))
    assert not ch02.check_training_bytes(lambda n, t, b: float("nan"))


def test_a_number_subclass_that_equals_everything_never_passes(capsys) -> None:
    class Liar(int):
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = int.__hash__

    class FloatLiar(float):
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = float.__hash__

    assert not ch02.check_qv_lora_params(lambda cfg, r: Liar(0))
    assert not ch02.check_training_bytes(lambda n, t, b: FloatLiar(0))
    assert not ch06.check_adapter_bytes(lambda model: Liar(0))
    assert not ch02.check_training_bytes(lambda n, t, b: True)  # a bool is not an int
    assert "Liar" in capsys.readouterr().out
