"""Student notebooks: a chapter without solutions, with a ready-to-run cell per checked exercise.

A chapter keeps its exercises in markdown cells as sphinx-exercise directives::

    ````{exercise}
    :label: ch3-ex2
    ... a ```python block that calls a check such as check_merge(merge_weight) ...
    ````

    ````{solution} ch3-ex2
    ...
    ````

The student notebook drops every ``{solution}`` block (and code cells tagged ``solution``) and
puts, for each exercise with a check, a code cell with a stub of the function to write and the
check call. That cell carries ``{"lora_tutorial": {"exercise": label}}`` in its metadata so that
the grader finds it again.

An exercise is *checked* when its text has a code block that calls ``check_x(name)``. Two kinds:

- a **function exercise** (the learner writes ``name``): the answer cell's stub is
  ``def name(signature): raise NotImplementedError(...)``, the signature taken from the text's
  ```` `name(signature)` ````;
- a **value exercise** (the learner predicts a number): the snippet itself sets the name on a line
  of its own before the call, ``predicted = 18_000  # your prediction`` then
  ``check_x(predicted)``. That one rule decides the kind. The answer cell's stub sets the name to
  ``None``, which every check of a value rejects, and runs the snippet without its example line.

The solved notebook puts the code of each ``{solution}`` block's fenced code blocks in place of
the stub: a function's definition, or for a value exercise a line such as ``predicted = 18_562``.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import nbformat

from lora_tutorial import __version__
from lora_tutorial.book import translation
from lora_tutorial.runtime import config

META = "lora_tutorial"  # the metadata key of student notebooks and their answer cells
_OPEN = re.compile(r"^\s*(?P<fence>`{3,}|:{3,})\{(?P<name>[\w-]+)\}\s*(?P<arg>.*)$")
_CODE = re.compile(r"^```+\s*(?:python|ipython3?)?\s*$")
_CHECK_CALL = re.compile(r"\b(check_\w+)\(\s*([A-Za-z_]\w*)\s*\)")


def _sets(line: str, name: str | None) -> bool:
    """Whether a line of code assigns ``name`` (``name = ...``, not ``name == ...``)."""
    return name is not None and re.match(rf"\s*{re.escape(name)}\s*=(?!=)", line) is not None


@dataclass(frozen=True)
class Exercise:
    """One exercise of a chapter: its label and, when it has an automatic check, how to run it."""

    chapter: str  # the chapter notebook's stem, e.g. "03_lora_from_scratch"
    label: str  # e.g. "ch3-ex2"
    check: str | None  # the check snippet from the exercise text, None for a discussion exercise
    function: str | None  # the learner's function that the check receives, e.g. "merge_weight"
    signature: str  # its parameters as the exercise writes them, e.g. "weight, A, B, scaling"
    solution_code: str  # the code of its solution block ("" when there is none)
    value: bool = False  # a value exercise: the snippet sets ``function`` (a prediction) itself

    @property
    def check_code(self) -> str:
        """The check snippet as an answer cell runs it: for a value exercise, without the lines
        that set the value (the answer above them sets it)."""
        if not self.value:
            return (self.check or "").strip()
        return "\n".join(
            line for line in (self.check or "").splitlines() if not _sets(line, self.function)
        ).strip()

    @property
    def check_name(self) -> str | None:
        """The check function's name, e.g. ``check_merge``."""
        match = _CHECK_CALL.search(self.check or "")
        return match.group(1) if match else None


@dataclass(frozen=True)
class Directive:
    """A top-level ``{exercise}`` or ``{solution}`` block of a markdown text (``start:end``)."""

    name: str
    arg: str
    start: int
    end: int
    body: list[str]


def directives(text: str) -> list[Directive]:
    """The top-level MyST directives of a markdown text; an unclosed one runs to the end."""
    lines = text.splitlines()
    found, i = [], 0
    while i < len(lines):
        match = _OPEN.match(lines[i])
        if not match:
            i += 1
            continue
        fence = match.group("fence")
        end = i + 1
        while end < len(lines):
            stripped = lines[end].strip()
            if stripped and set(stripped) == {fence[0]} and len(stripped) >= len(fence):
                break
            end += 1
        found.append(
            Directive(
                match.group("name"), match.group("arg").strip(), i, end + 1, lines[i + 1 : end]
            )
        )
        i = end + 1
    return found


def code_blocks(lines: list[str]) -> list[str]:
    """The fenced code blocks (``` python or plain) inside a directive's body."""
    blocks: list[str] = []
    current: list[str] | None = None
    for line in lines:
        if current is None and _CODE.match(line.strip()):
            current = []
        elif current is not None and line.strip().startswith("```"):
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def chapters_dir() -> Path:
    """The repository's ``chapters/`` folder, or a clear error where this install has none."""
    path = config.repo_root() / "chapters"
    if not path.is_dir():
        raise FileNotFoundError(
            f"no chapters folder at {path}: run from a clone of the repository "
            "or pass --chapters FOLDER"
        )
    return path


def chapter_paths(folder: Path | None = None, names: list[str] | None = None) -> list[Path]:
    """The chapter notebooks of ``folder``: all, or those named (``3``, ``03``, a stem, a file)."""
    folder = folder or chapters_dir()
    every = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not names:
        return every
    chosen = []
    for name in names:
        stem = Path(name).stem
        hits = [
            p for p in every if p.stem == stem or (stem.isdigit() and int(p.stem[:2]) == int(stem))
        ]
        if not hits:
            known = ", ".join(p.stem for p in every)
            raise ValueError(f"no chapter {name!r} in {folder}; choose from: {known}")
        chosen += hits
    return chosen


def exercises(path: Path) -> list[Exercise]:
    """Every exercise of a chapter notebook, in order, with its check (if any) and solution code."""
    nb = nbformat.read(path, as_version=4)
    found: list[tuple[str, list[str]]] = []
    solutions: dict[str, str] = {}
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for block in directives(cell.source):
            if block.name == "exercise":
                labels = [
                    line.split(":label:", 1)[1].strip() for line in block.body if ":label:" in line
                ]
                if labels:
                    found.append((labels[0], block.body))
            elif block.name == "solution":
                solutions[block.arg] = "\n\n".join(code_blocks(block.body))
    result = []
    for label, body in found:
        check = next((code for code in code_blocks(body) if _CHECK_CALL.search(code)), None)
        call = _CHECK_CALL.search(check or "")
        function = call.group(2) if call else None
        before_call = (check or "")[: call.start()].splitlines() if call else []
        value = any(_sets(line, function) for line in before_call)
        signature = re.search(rf"`{function}\(([^)`]*)\)`", "\n".join(body)) if function else None
        result.append(
            Exercise(
                chapter=path.stem,
                label=label,
                check=check,
                function=function,
                signature=signature.group(1).strip() if signature else "*args",
                solution_code=solutions.get(label, ""),
                value=value,
            )
        )
    return result


STUDENT_TEXT = {
    "en": {
        "predict": "set {name} to your prediction",
        "predict stub": "replace None with your prediction",
        "write": "write {name}",
        "write stub": "replace this line with your code",
        "task": "# Exercise {label}: {task} below, then run this cell.",
        "header": (
            "**Student notebook of chapter {title}**\n\n"
            "Generated from `chapters/{file}` by lora-tutorial {version} (commit {commit}).\n\n"
            "The solutions are removed. Each exercise with an automatic check has a code cell "
            "below\nit: replace its `raise NotImplementedError` line with your code (or, for a "
            "prediction,\nits `None` with your number) and run the cell; the check prints what "
            "is right or what\nis wrong. Keep the function's (or the prediction's) name and that "
            "cell."
        ),
    },
    "fr": {
        "predict": "donnez à {name} la valeur que vous prédisez",
        "predict stub": "remplacez None par votre prédiction",
        "write": "écrivez {name}",
        "write stub": "remplacez cette ligne par votre code",
        "task": "# Exercice {label} : {task} ci-dessous, puis exécutez cette cellule.",
        "header": (
            "**Notebook de l'élève du chapitre {title}**\n\n"
            "Produit à partir de `chapters/{file}` par lora-tutorial {version} "
            "(commit {commit}).\n\n"
            "Les solutions sont retirées. Chaque exercice vérifié automatiquement est suivi "
            "d'une cellule de code\u00a0: remplacez sa ligne `raise NotImplementedError` par "
            "votre code (ou, pour une prédiction, son `None` par votre nombre) et exécutez la "
            "cellule\u00a0; la vérification affiche ce qui est juste ou ce qui ne l'est pas "
            "encore. Gardez le nom de la fonction (ou de la prédiction) et cette cellule. Le code "
            "et ses sorties restent en anglais."
        ),
    },
}
"""What the student notebook itself writes, in each language of the book (the chapter's own
text comes from the book's catalogs, ``lora_tutorial.book.translation``)."""


def answer_cell_source(exercise: Exercise, answer: str | None = None, lang: str = "en") -> str:
    """The code cell a learner fills in: ``answer`` (default: a stub the check rejects), then the
    check. The stub of a function raises; the stub of a value exercise sets the value to None."""
    assert exercise.check is not None and exercise.function is not None
    text = STUDENT_TEXT[lang]
    if exercise.value:
        task = text["predict"].format(name=exercise.function)
        stub = f"{exercise.function} = None  # {text['predict stub']}"
    else:
        task = text["write"].format(name=exercise.function)
        stub = (
            f"def {exercise.function}({exercise.signature}):\n"
            f'    raise NotImplementedError("{text["write stub"]}")'
        )
    return (
        f"{text['task'].format(label=exercise.label, task=task)}\n"
        f"{(stub if answer is None else answer).strip()}\n\n\n{exercise.check_code}"
    )


def _remove_solutions(text: str) -> str:
    """The markdown text without its ``{solution}`` blocks (and the blank lines they leave)."""
    lines = text.splitlines()
    for block in reversed([d for d in directives(text) if d.name == "solution"]):
        del lines[block.start : block.end]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _answer_cell(
    exercise: Exercise, answer: str | None = None, lang: str = "en"
) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(answer_cell_source(exercise, answer, lang))
    cell.metadata[META] = {"exercise": exercise.label}
    cell.metadata["tags"] = ["exercise"]
    return cell


def commit() -> str:
    """The repository's current commit (short), or ``"unknown"`` outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", str(config.repo_root()), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def student_notebook(
    path: Path, answers: dict[str, str] | None = None, lang: str = "en"
) -> nbformat.NotebookNode:
    """Chapter ``path`` as a student notebook: no solutions, an answer cell per checked exercise.

    ``answers`` maps exercise labels to code put into their answer cells instead of the stub (the
    book uses it to make an example submission with the solutions filled in). ``lang`` is the
    edition: ``"fr"`` translates the text from the book's French catalogs; code stays as it is.
    """
    if lang not in STUDENT_TEXT:
        raise ValueError(f"no {lang!r} edition; choose from: {', '.join(STUDENT_TEXT)}")
    nb = nbformat.read(path, as_version=4)
    if lang != "en":
        translator = translation.Translator(lang)
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                cell.source = translator.markdown(f"chapters/{path.stem}", cell.source)
    chapter_exercises = exercises(path)
    checked = {ex.label: ex for ex in chapter_exercises if ex.check}
    title = next(
        (c.source.splitlines()[0].lstrip("# ") for c in nb.cells if c.cell_type == "markdown"),
        path.stem,
    )
    made_by = {"chapter": path.stem, "version": __version__, "commit": commit()}
    header = nbformat.v4.new_markdown_cell(
        STUDENT_TEXT[lang]["header"].format(
            title=title, file=path.name, version=__version__, commit=made_by["commit"]
        )
    )
    cells, pending, placed = [header], [], set()
    for cell in nb.cells:
        if cell.cell_type == "code" and "solution" in cell.metadata.get("tags", []):
            continue  # hidden solution code
        if cell.cell_type == "markdown":
            new = dict(cell)
            new["source"] = _remove_solutions(cell.source)
            if new["source"]:
                cells.append(nbformat.from_dict(new))
            labels = [b.body for b in directives(cell.source) if b.name == "exercise"]
            pending += [
                label
                for body in labels
                for line in body
                if ":label:" in line and (label := line.split(":label:", 1)[1].strip()) in checked
            ]
            continue
        if (
            cell.cell_type == "code"
            and cell.source.lstrip().startswith("# your code here")
            and pending
        ):
            label = pending.pop(0)
            cells.append(_answer_cell(checked[label], (answers or {}).get(label), lang))
            placed.add(label)
            continue
        cell = nbformat.from_dict(dict(cell))
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cells.append(cell)
    for label in checked:  # an exercise without a "your code here" cell gets one at the end
        if label not in placed:
            cells.append(_answer_cell(checked[label], (answers or {}).get(label), lang))
    nb.cells = cells
    nb.metadata[META] = {
        **made_by,
        "language": lang,
        "exercises": [ex.label for ex in chapter_exercises],
    }
    return nb


def solved_notebook(path: Path, lang: str = "en") -> nbformat.NotebookNode:
    """The student notebook of ``path`` with each checked exercise answered by its solution."""
    answers = {ex.label: ex.solution_code for ex in exercises(path) if ex.solution_code}
    return student_notebook(path, answers, lang)
