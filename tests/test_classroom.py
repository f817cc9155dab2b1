"""The classroom kit from a teacher's side: student notebooks keep no solution, and the grader
records pass, fail, raised, timeout, not-attempted and broken submissions without stopping."""

from __future__ import annotations

import ast
import csv
import importlib
import json
from pathlib import Path

import nbformat
import pytest
from _helpers import tiny_chapter
from nbclient import NotebookClient

from lora_tutorial import __version__, classroom
from lora_tutorial.classroom import grading
from lora_tutorial.classroom.__main__ import main
from lora_tutorial.classroom.notebooks import answer_cell_source, commit, directives
from lora_tutorial.exercises._feedback import encode
from lora_tutorial.runtime import config

ROOT = config.repo_root()
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))  # every chapter, also ones added later
CH3 = ROOT / "chapters" / "03_lora_from_scratch.ipynb"


def solution_lines(chapter: Path) -> list[str]:
    """The lines of the chapter's solution blocks that appear nowhere else in the chapter.

    A solution's ``def name(args):`` line is left out: the student's stub has the same line.
    """
    nb = nbformat.read(chapter, as_version=4)
    inside, outside = [], []
    for cell in nb.cells:
        lines = cell.source.splitlines()
        blocks = [d for d in directives(cell.source) if d.name == "solution"]
        for block in blocks:
            inside += block.body
        kept = set(range(len(lines))) - {i for b in blocks for i in range(b.start, b.end)}
        outside += [lines[i] for i in kept]
    others = {line.strip() for line in outside}
    return [
        line.strip()
        for line in inside
        if len(line.strip()) > 15
        and line.strip() not in others
        and not line.startswith(":")
        and not (line.startswith("def ") and line.rstrip().endswith(":"))
    ]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_no_solution_text_survives_in_a_student_notebook(chapter: Path, tmp_path: Path) -> None:
    assert main(["student", str(tmp_path), chapter.stem]) == 0
    student = nbformat.read(tmp_path / chapter.name, as_version=4)
    text = "\n".join(cell.source for cell in student.cells)
    assert "{solution}" not in text
    secrets = solution_lines(chapter)
    assert secrets, f"{chapter.name} has no solution text to hide (is the test still looking?)"
    leaked = [line for line in secrets if line in text]
    assert not leaked, f"solution text left in the student notebook of {chapter.name}: {leaked}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_student_notebook_keeps_every_exercise_and_its_check(chapter: Path) -> None:
    student = classroom.student_notebook(chapter)
    text = "\n".join(cell.source for cell in student.cells)
    header = student.cells[0].source
    assert chapter.name in header and __version__ in header and commit() in header
    code = [c for c in student.cells if c.cell_type == "code"]
    assert '"google.colab" in sys.modules' in code[0].source, "the install cell must come first"
    for ex in classroom.exercises(chapter):
        assert f":label: {ex.label}" in text, f"exercise {ex.label} is missing"
        if ex.check:
            cells = [
                c for c in code if c.metadata.get("lora_tutorial", {}).get("exercise") == ex.label
            ]
            assert len(cells) == 1 and ex.check_code in cells[0].source


def test_existing_student_notebooks_are_not_overwritten(tmp_path: Path) -> None:
    target = tmp_path / CH3.name
    target.write_text("mine")
    assert main(["student", str(tmp_path), "3"]) == 2
    assert target.read_text() == "mine"


def test_an_unknown_chapter_is_an_error_naming_the_choices(tmp_path: Path, capsys) -> None:
    assert main(["student", str(tmp_path), "99"]) == 2
    assert "03_lora_from_scratch" in capsys.readouterr().err


@pytest.fixture
def tiny_chapters(tmp_path: Path) -> Path:
    """Chapter 1's three function exercises and chapter 2's three predictions: quick checks."""
    folder = tmp_path / "chapters"
    folder.mkdir()
    tiny_chapter("01_low_rank", folder, "import torch")  # the solutions use the chapter's torch
    tiny_chapter("02_parameter_savings", folder, "import lora_tutorial.exercises.ch02")
    return folder


def submissions(folder: Path, chapters: Path) -> dict[str, Path]:
    """One submission of each kind, from the tiny chapter 1's student notebook; and chapter 2's
    predictions solved, untouched and wrong."""
    folder.mkdir(exist_ok=True)
    chapter, predictions = chapters / "01_tiny.ipynb", chapters / "02_tiny.ipynb"
    made = {
        "solved": classroom.solved_notebook(chapter),
        "untouched": classroom.student_notebook(chapter),
        "predicted": classroom.solved_notebook(predictions),
        "no_prediction": classroom.student_notebook(predictions),
        "wrong_prediction": classroom.solved_notebook(predictions),
    }
    for ex in classroom.exercises(predictions):
        if ex.check:
            cell = next(c for c in made["wrong_prediction"].cells if _is_answer(c, ex.label))
            cell.source = answer_cell_source(ex, f"{ex.function} = 1")
    answer = {"loop": "while True:\n    pass", "exit": "import sys\nsys.exit(3)"}
    for name, code in answer.items():
        nb = classroom.solved_notebook(chapter)
        cell = next(c for c in nb.cells if "lora_tutorial" in c.metadata)
        cell.source = code + "\n" + cell.source
        made[name] = nb
    made["solved"].cells.insert(3, nbformat.v4.new_code_cell("open('left.txt', 'w').write('x')"))
    killed = classroom.solved_notebook(chapter)
    killed.cells.insert(3, nbformat.v4.new_code_cell("import os\nos._exit(1)"))
    made["killed"] = killed
    paths = {}
    for name, nb in made.items():
        paths[name] = folder / f"{name}.ipynb"
        nbformat.write(nb, paths[name])
    paths["invalid"] = folder / "invalid_01_tiny.ipynb"
    paths["invalid"].write_text('{"cells": [')
    return paths


def _is_answer(cell: nbformat.NotebookNode, label: str) -> bool:
    return cell.metadata.get("lora_tutorial", {}).get("exercise") == label


def test_grader_records_every_kind_of_submission_and_goes_on(
    tiny_chapters: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    paths = submissions(tmp_path / "submissions", tiny_chapters)
    before = sorted(tmp_path.rglob("*"))
    order = ["invalid", "loop", "exit", "killed", "untouched", "solved"]  # good one last
    order += ["predicted", "no_prediction", "wrong_prediction"]
    out = tmp_path / "grades.csv"
    args = [
        "grade",
        *(str(paths[n]) for n in order),
        "--out",
        str(out),
        "--cell-timeout",
        "15",
        "--jobs",
        "2",
    ]
    assert main([*args, "--chapters-dir", str(tiny_chapters)]) == 0
    assert sorted(tmp_path.rglob("*")) == sorted([*before, out]), "the grader wrote elsewhere"
    rows = read_csv(out)
    assert list(rows[0]) == ["student", "chapter", "exercise", "status", "message"]
    status = {(r["student"], r["exercise"]): r["status"] for r in rows}
    message = {(r["student"], r["exercise"]): r["message"] for r in rows}
    first, *others = labels = ["ch1-ex3", "ch1-ex4", "ch1-ex5"]
    assert {status["solved", e] for e in labels} == {"pass"}
    assert {status["untouched", e] for e in labels} == {"not-attempted"}
    assert {status["invalid_01_tiny", e] for e in labels} == {"broken"}
    assert "cannot read the notebook" in message["invalid_01_tiny", first]
    assert status["loop", first] == "timeout" and {status["loop", e] for e in others} == {"pass"}
    assert status["exit", first] == "raised" and "SystemExit" in message["exit", first]
    assert {status["exit", e] for e in others} == {"pass"}
    assert {status["killed", e] for e in labels} == {"broken"}
    assert "kernel died" in message["killed", first]
    predictions = ["ch2-ex2", "ch2-ex3", "ch2-ex5"]
    assert {status["predicted", e] for e in predictions} == {"pass"}, rows
    assert {status["no_prediction", e] for e in predictions} == {"not-attempted"}
    assert {status["wrong_prediction", e] for e in predictions} == {"fail"}
    assert "you predicted 1" in message["wrong_prediction", "ch2-ex2"]
    printed = capsys.readouterr().out  # also: judges in two threads left sys.stdout working
    assert "pass rate" in printed and "ch1-ex4" in printed and "ch2-ex5" in printed


def test_a_failing_answer_gets_the_checks_message(tiny_chapters: Path, tmp_path: Path) -> None:
    chapter = tiny_chapters / "01_tiny.ipynb"
    nb = classroom.solved_notebook(chapter)
    ex = next(e for e in classroom.exercises(chapter) if e.check)
    cell = next(
        c for c in nb.cells if c.metadata.get("lora_tutorial", {}).get("exercise") == ex.label
    )
    cell.source = answer_cell_source(ex, f"def {ex.function}(*args):\n    return 0")
    nbformat.write(nb, tmp_path / "wrong.ipynb")
    (grade,) = [
        g
        for g in classroom.grade([tmp_path / "wrong.ipynb"], tiny_chapters, cell_timeout=60)
        if g.exercise == ex.label
    ]
    assert grade.status == "fail" and grade.message.startswith("Not yet:"), grade


def test_a_prediction_is_a_value_exercise_the_grader_judges() -> None:
    """Chapter 2's predictions: the snippet sets a name, the stub sets it to None (rejected), the
    solution's value passes, judged as the grader does; chapter 1's exercises are functions."""
    chapter = ROOT / "chapters" / "02_parameter_savings.ipynb"
    checked = [ex for ex in classroom.exercises(chapter) if ex.check]
    assert [ex.label for ex in checked] == ["ch2-ex2", "ch2-ex3", "ch2-ex5"]
    assert all(ex.value for ex in checked)
    assert not any(ex.value for ex in classroom.exercises(ROOT / "chapters" / "01_low_rank.ipynb"))
    student = classroom.student_notebook(chapter)
    for index, ex in grading._answer_cells(student, checked).items():
        stub = student.cells[index].source
        assert stub == answer_cell_source(ex) and f"{ex.function} = None" in stub
        assert f"{ex.function} =" not in ex.check_code  # the snippet's example value is gone
        module, name = grading._check_of(ex)
        check = getattr(importlib.import_module(module), name)
        namespace: dict[str, object] = {}
        exec(ex.solution_code, namespace)
        assert grading._judge(ex, encode(check.probe(namespace[ex.function])))[0] == "pass"
        assert grading._judge(ex, encode(check.probe(None)))[0] == "fail"


def test_grader_refuses_to_overwrite_its_output(tmp_path: Path, capsys) -> None:
    out = tmp_path / "grades.csv"
    out.write_text("earlier grades")
    assert main(["grade", str(tmp_path / "s" / "a.ipynb"), "--out", str(out)]) == 2
    assert out.read_text() == "earlier grades" and "--overwrite" in capsys.readouterr().err


def test_help_warns_that_submissions_are_untrusted(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["grade", "--help"])
    assert "untrusted code" in capsys.readouterr().out


@pytest.mark.slow
def test_grading_chapter_3_filled_in_and_untouched_in_both_languages(tmp_path: Path) -> None:
    nbformat.write(classroom.solved_notebook(CH3), tmp_path / "filled.ipynb")
    nbformat.write(classroom.solved_notebook(CH3, "fr"), tmp_path / "rempli.ipynb")
    nbformat.write(classroom.student_notebook(CH3, lang="fr"), tmp_path / "intact.ipynb")
    submissions = [tmp_path / f"{name}.ipynb" for name in ("filled", "rempli", "intact")]
    grades = classroom.grade(submissions)
    code_exercises = [ex.label for ex in classroom.exercises(CH3) if ex.check]
    assert len(code_exercises) >= 2
    by = {(g.student, g.exercise): g.status for g in grades}
    assert all(by["filled", e] == "pass" for e in code_exercises), grades
    assert all(by["rempli", e] == "pass" for e in code_exercises), grades  # French, graded
    assert all(by["intact", e] == "not-attempted" for e in code_exercises), grades
    table = classroom.summary(grades)
    assert list(table["pass rate"]) == ["67%"] * len(code_exercises)
    assert json.loads(json.dumps([g.__dict__ for g in grades]))  # plain values, CSV-ready


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_every_untouched_answer_cell_fails_its_check_without_raising(
    chapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for ex in classroom.exercises(chapter):
        if not ex.check:
            continue
        *body, last = answer_cell_source(ex).rstrip().splitlines()
        namespace: dict[str, object] = {}
        exec("\n".join(body), namespace)
        assert eval(last, namespace) is False, f"{ex.label}: the stub passed its check"
        assert "Not yet" in capsys.readouterr().out, f"{ex.label}: the check said nothing"


def chapter_imports(chapter: Path) -> str:
    """The chapter's top-level import statements: what a solution may use without defining it."""
    nb = nbformat.read(chapter, as_version=4)
    lines = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        source = "\n".join(
            line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!"))
        )
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines += [ast.unparse(n) for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    return "\n".join(dict.fromkeys(lines))


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_every_checked_solution_passes_its_check(
    chapter: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each solution, put into its answer cell as in ``classroom.solved_notebook``, passes."""
    monkeypatch.setenv(config.QUICK_ENV, "1")
    imports = chapter_imports(chapter)
    for ex in classroom.exercises(chapter):
        if not ex.check:
            continue
        assert ex.solution_code, f"{ex.label}: a checked exercise without solution code"
        *body, last = answer_cell_source(ex, ex.solution_code).rstrip().splitlines()
        namespace: dict[str, object] = {}
        exec(imports, namespace)
        exec("\n".join(body), namespace)
        passed = eval(last, namespace)
        out = capsys.readouterr().out
        assert passed is True, f"{ex.label}: its own solution fails its check:\n{out}"
        assert "Correct!" in out, f"{ex.label}: the check passed without saying so"


@pytest.mark.slow
@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_solved_notebook_runs_in_quick_mode_and_every_check_passes(
    chapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The student notebook filled in with the chapter's solutions, run top to bottom."""
    monkeypatch.setenv(config.QUICK_ENV, "1")
    nb = classroom.solved_notebook(chapter)
    client = NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises if any cell raises
    for cell in nb.cells:
        if "lora_tutorial" in cell.metadata:
            result = [o for o in cell.outputs if o.output_type == "execute_result"]
            assert result and result[0].data["text/plain"] == "True", cell.source
            assert "Correct!" in "".join(o.get("text", "") for o in cell.outputs)
