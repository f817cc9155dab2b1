"""Hostile submissions, from a teacher's side: none of them passes, and none changes grades.csv,
another student's file or the package, leaves a process or a temporary folder behind, or stops
the grader. One grading run covers the attacks that need a kernel: the attacks that leave the
kernel running share one notebook (whose wrong answers must still be judged, so none of them may
break the run), and each attack that kills the run or touches the verdict has its own."""

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
from _helpers import tiny_chapter

import lora_tutorial
from lora_tutorial import classroom
from lora_tutorial.classroom.__main__ import main
from lora_tutorial.exercises import ch01, ch02, ch04
from lora_tutorial.runtime import config

ROOT = config.repo_root()
MARKER = "lora-tutorial-attack-marker"
LABELS = ["ch1-ex3", "ch1-ex4", "ch1-ex5"]
WRONG = {
    "ch1-ex3": "def rank_r_approx(W, r):\n    return W",
    "ch1-ex4": "def subspace_similarity(A1, A2, i, j):\n    return 0.5",
    "ch1-ex5": "def break_even_rank(m, n):\n    return 0",
}
# Right values in the wrong types: a tensor subclass, NaN, an int that equals everything.
CHEATS = {
    "ch1-ex3": "class T(torch.Tensor):\n    pass\n\n"
    "def rank_r_approx(W, r):\n"
    "    U, S, Vh = torch.linalg.svd(W, full_matrices=False)\n"
    "    return (U[:, :r] @ torch.diag(S[:r]) @ Vh[:r, :]).as_subclass(T)",
    "ch1-ex4": "def subspace_similarity(A1, A2, i, j):\n    return float('nan')",
    "ch1-ex5": "class Int(int):\n    def __eq__(self, other):\n        return True\n"
    "    __hash__ = int.__hash__\n\n"
    "def break_even_rank(m, n):\n    return Int(1)",
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
    """Chapter 1's three function exercises alone: their checks run in a moment."""
    folder = tmp_path_factory.mktemp("chapters")
    tiny_chapter("01_low_rank", folder, "import torch")
    return folder


def hostile(chapters: Path, *before: str, answers: dict[str, str] | None = None):
    """The solved tiny chapter, with wrong answers (by default) and the cells ``before`` first."""
    chapter = chapters / "01_tiny.ipynb"
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
    nb.cells[3:3] = [nbformat.v4.new_code_cell(textwrap.dedent(code)) for code in before]
    return nb


# Which submission carries each attack: those that leave the kernel running and the verdicts
# alone share the "=noise" notebook (its name is also a spreadsheet formula); the attacks on
# files outside the sandbox and on the grader's processes share another, each in its own cell.
SUBMISSION = {
    "fake_print": "=noise",
    "rewrite_csv": "=noise",
    "orphan": "=noise",
    "network": "=noise",
    "prints": "=noise",
    "big_message": "=noise",
    "nan_and_subclass": "=noise",
    "patch_checks": "patch_checks",
    "transformer": "transformer",
    "exit_in_check": "exit_in_check",
    "overwrite_victim": "files_and_signals",
    "append_package": "files_and_signals",
    "kill_parent": "files_and_signals",  # last: it may end the run
}


@pytest.fixture(scope="module")
def graded(tiny_chapters: Path, tmp_path_factory: pytest.TempPathFactory):
    """Grade a class of hostile submissions (and an honest one) once, through the CLI."""
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
    ch01_file = Path(ch01.__file__)
    attacks = {
        "patch_checks": """
            import lora_tutorial.exercises.ch01 as m
            m.check_rank_r_approx = m.check_subspace_similarity = lambda f: True
            m.check_break_even_rank = lambda f: True
            """,
        "transformer": """
            ip = get_ipython()
            ip.input_transformers_cleanup.append(
                lambda lines: ["True\\n" if "check_" in l else l for l in lines]
            )
            """,
        "fake_print": """
            print("Correct! ch1-ex3 pass True")
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
                    time.sleep(3)
                    open({str(out)!r}, "w").write("student,status\\nme,pass\\n")
                os._exit(0)
            """,
        "overwrite_victim": f"""
            open({str(victim)!r}, "w").write("overwritten")
            """,
        "append_package": f"""
            open({str(ch01_file)!r}, "a").write("\\ncheck_break_even_rank = lambda f: True\\n")
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
    cells: dict[str, list[str]] = {}
    for attack, student in SUBMISSION.items():
        cells.setdefault(student, []).extend([attacks[attack]] if attack in attacks else [])
    paths = {}
    for student, before in cells.items():
        paths[student] = subs / f"{student}.ipynb"
        answers = CHEATS if student == SUBMISSION["nan_and_subclass"] else None
        nbformat.write(hostile(tiny_chapters, *before, answers=answers), paths[student])
    nbformat.write(classroom.solved_notebook(tiny_chapters / "01_tiny.ipynb"), victim)
    paths["victim"] = victim
    paths["dev_zero"] = subs / "dev_zero_01_tiny.ipynb"
    paths["dev_zero"].symlink_to("/dev/zero")
    paths["fifo"] = subs / "fifo_01_tiny.ipynb"
    os.mkfifo(paths["fifo"])
    order = ["victim", *(p for p in paths if p not in ("victim", "=noise")), "=noise"]
    victim_bytes, package = victim.read_bytes(), package_digest()
    temp_before = leftovers()
    args = ["grade", *(str(paths[p]) for p in order), "--out", str(out), "--jobs", "2"]
    started = time.monotonic()
    code = main([*args, "--cell-timeout", "30", "--chapters-dir", str(tiny_chapters)])
    seconds = time.monotonic() - started
    csv_after_grading = out.read_bytes()
    time.sleep(4)  # the detached writer (3 s after the noise notebook began) would have struck
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


def csv_name(student: str) -> str:
    return "'" + student if student.startswith("=") else student


@pytest.mark.parametrize("attack", list(SUBMISSION))
def test_a_hostile_submission_gets_no_pass(graded: dict, attack: str) -> None:
    got = statuses(graded, csv_name(SUBMISSION[attack]))
    assert got and "pass" not in got.values(), got


def test_the_shared_attacks_leave_the_run_whole_and_the_cheats_fail(graded: dict) -> None:
    """The noise notebook ran to its end and every cheat was judged (not broken): a fail."""
    assert statuses(graded, csv_name("=noise")) == dict.fromkeys(LABELS, "fail")


def test_the_grader_survives_the_class_and_grades_the_honest_student(graded: dict) -> None:
    assert graded["code"] == 0
    assert statuses(graded, "victim") == dict.fromkeys(LABELS, "pass")


def test_nothing_outside_the_sandbox_changed(graded: dict) -> None:
    assert not graded["csv_changed"], "grades.csv changed after the grader exited"
    assert not graded["victim_changed"], "another student's submission changed"
    assert not graded["package_changed"], "the package's files changed"
    assert not graded["reached"], "a submission reached the network"
    assert not graded["temp_left"], graded["temp_left"]
    assert not graded["orphans"], "a submission's process outlived the grader"


def test_files_that_are_not_regular_files_are_refused(graded: dict) -> None:
    messages = {r["student"]: r["message"] for r in graded["rows"]}
    assert "symbolic link" in messages["dev_zero_01_tiny"]
    assert "not a regular file" in messages["fifo_01_tiny"]
    assert statuses(graded, "fifo_01_tiny") == dict.fromkeys(LABELS, "broken")


def test_csv_cells_cannot_be_formulas_and_messages_are_capped(graded: dict) -> None:
    for row in graded["rows"]:
        for value in row.values():
            assert not value.startswith(("=", "+", "-", "@", "\t", "\r")), row
            assert len(value) <= 500
    assert any(r["student"] == "'=noise" for r in graded["rows"])


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
    nbformat.write(classroom.student_notebook(tiny_chapters / "01_tiny.ipynb"), path)
    grades = classroom.grade([path, path, tmp_path / "." / "once.ipynb"], tiny_chapters)
    assert len(grades) == len(LABELS) and {g.status for g in grades} == {"not-attempted"}


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
    assert not ch02.check_sgd_state_prediction(float("nan"))


def test_a_number_subclass_that_equals_everything_never_passes(capsys) -> None:
    class Liar(int):
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = int.__hash__

    class FloatLiar(float):
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = float.__hash__

    assert not ch01.check_break_even_rank(lambda m, n: Liar(0))
    assert not ch01.check_subspace_similarity(lambda a, b, i, j: FloatLiar(0))
    assert not ch02.check_trainable_prediction(Liar(0))
    assert not ch02.check_sgd_state_prediction(FloatLiar(0))
    assert not ch04.check_count_leaks(lambda train, other: Liar(3))
    assert not ch01.check_break_even_rank(lambda m, n: True)  # a bool is not an int
    assert not ch02.check_trainable_prediction(True)
    assert "Liar" in capsys.readouterr().out
