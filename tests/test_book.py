"""The book's sources keep their promises: every chapter in the table of contents exists, follows
the chapter template, is committed without outputs, sets up Colab from the one repository URL, and
has numbered exercises with hidden solutions. (What the chapters print is test_notebooks' part.)"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
from _helpers import ROOT, chapter_paths, toc_pages

nbformat = pytest.importorskip("nbformat")
yaml = pytest.importorskip("yaml")
from lora_tutorial.classroom.notebooks import exercises  # noqa: E402

BOOK_CONFIG = yaml.safe_load((ROOT / "book" / "_config.yml").read_text())
REPO_URL = BOOK_CONFIG["repository"]["url"]


def markdown(nb: nbformat.NotebookNode) -> str:
    return "\n".join(cell.source for cell in nb.cells if cell.cell_type == "markdown")


def test_the_package_names_the_same_repository() -> None:
    assert f'Homepage = "{REPO_URL}"' in (ROOT / "pyproject.toml").read_text(), (
        "pyproject.toml must name the repository of book/_config.yml"
    )


def test_every_toc_entry_exists() -> None:
    for name in toc_pages():
        matches = [p for p in (ROOT / f"{name}.md", ROOT / f"{name}.ipynb") if p.is_file()]
        assert matches, f"book/_toc.yml lists {name}, but there is no {name}.md or .ipynb"


def test_every_chapter_notebook_is_in_the_toc() -> None:
    listed = set(chapter_paths())
    unlisted = [p.name for p in sorted((ROOT / "chapters").glob("*.ipynb")) if p not in listed]
    assert not unlisted, f"chapters missing from book/_toc.yml: {unlisted}"


@pytest.fixture(params=chapter_paths(), ids=lambda p: p.stem)
def chapter(request: pytest.FixtureRequest) -> nbformat.NotebookNode:
    return nbformat.read(request.param, as_version=4)


def test_committed_without_outputs(chapter: nbformat.NotebookNode) -> None:
    with_outputs = [
        i
        for i, c in enumerate(chapter.cells)
        if c.cell_type == "code" and (c.outputs or c.execution_count)
    ]
    assert not with_outputs, (
        f"code cells {with_outputs} carry outputs; the build executes notebooks"
    )


def test_starts_with_title_then_colab_setup_and_mode_banner(chapter: nbformat.NotebookNode) -> None:
    first_md = next(c for c in chapter.cells if c.cell_type == "markdown")
    assert re.match(r"# \d+\. \S", first_md.source), (
        "the first markdown cell must be the title '# N. Title'"
    )
    code = [c.source for c in chapter.cells if c.cell_type == "code"]
    assert '"google.colab" in sys.modules' in code[0], "the first code cell must set up Colab"
    assert f"git+{REPO_URL}" in code[0], (
        f"the Colab set-up cell must install from {REPO_URL} (book/_config.yml)"
    )
    assert "provenance.header(" in code[1], (
        "the second code cell must print provenance.header(seed=...): the mode and provenance"
    )


def test_follows_the_chapter_template(chapter: nbformat.NotebookNode) -> None:
    headings = [h.lower() for h in re.findall(r"^#{2,3} (.+)$", markdown(chapter), re.MULTILINE)]
    for section in ("learning goals", "summary", "exercises"):
        assert any(section in h for h in headings), f"no '{section}' section; headings: {headings}"
    order = [
        next(i for i, h in enumerate(headings) if s in h)
        for s in ("learning goals", "summary", "exercises")
    ]
    assert order == sorted(order), "sections must come as learning goals → … → summary → exercises"


def test_has_three_exercises_with_hidden_solutions(chapter: nbformat.NotebookNode) -> None:
    text = markdown(chapter)
    labels = re.findall(r"```\{exercise\}[^\n]*\n:label: (\S+)", text)
    assert len(labels) >= 3, f"only {len(labels)} exercises"
    for label in labels:
        solution = re.search(
            r"```\{solution\} " + re.escape(label) + r"\n((?::\S+:[^\n]*\n)*)", text
        )
        assert solution, f"exercise {label} has no solution"
        assert ":class: dropdown" in solution.group(1), f"the solution of {label} is not hidden"


def test_no_control_characters_in_the_sources(chapter: nbformat.NotebookNode) -> None:
    """A ``\\a`` typed through a non-raw string becomes BEL and breaks the math on the page."""
    bad = [
        (index, repr(found.group(0)))
        for index, cell in enumerate(chapter.cells)
        if (found := re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", cell.source))
    ]
    assert not bad, f"control characters in cells (index, character): {bad}"


def test_solution_labels_are_unique(chapter: nbformat.NotebookNode) -> None:
    labels = re.findall(r"```\{solution\} (\S+)", markdown(chapter))
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    assert not repeated, f"solutions given twice: {repeated}"


def test_has_three_checked_exercises(chapter: nbformat.NotebookNode, tmp_path: Path) -> None:
    path = tmp_path / "chapter.ipynb"
    nbformat.write(chapter, path)
    checked = [ex.label for ex in exercises(path) if ex.check]
    assert len(checked) >= 3, f"only {len(checked)} exercises end with a check: {checked}"


TEACHERS = ROOT / "book" / "teachers.md"
EXERCISE_LABEL = re.compile(r"\bch\d+-ex\d+\b")
RUBRIC_ENTRY = re.compile(r"\*\*(ch\d+-ex\d+)\.\*\*")


def exercises_checked() -> dict[str, bool]:
    """Every exercise label of the book, and whether it ends with an automatic check."""
    return {ex.label: ex.check is not None for path in chapter_paths() for ex in exercises(path)}


def rubric_entries() -> list[tuple[str, str]]:
    """The teacher's page's rubric entries (``**chN-exM.**``) and their chapter headings."""
    entries, heading = [], ""
    for line in TEACHERS.read_text().splitlines():
        if re.fullmatch(r"\*\*Chapter \d+\*\*", line.strip()):
            heading = line.strip().strip("*")
        entries += [(label, heading) for label in RUBRIC_ENTRY.findall(line)]
    return entries


def test_rubric_entry_for_every_unchecked_exercise() -> None:
    labels = [label for label, _ in rubric_entries()]
    unchecked = [label for label, checked in exercises_checked().items() if not checked]
    missing = [label for label in unchecked if label not in labels]
    assert not missing, f"book/teachers.md has no rubric entry (**label.**) for {missing}"
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    assert not repeated, f"book/teachers.md gives these rubric entries twice: {repeated}"


def test_rubric_entries_name_existing_unchecked_exercises() -> None:
    known = exercises_checked()
    for label, heading in rubric_entries():
        assert label in known, f"book/teachers.md has a rubric for {label}, which no chapter has"
        assert not known[label], (
            f"book/teachers.md has a rubric for {label}, which the grader checks automatically"
        )
        chapter = f"Chapter {label[2:].split('-')[0]}"
        assert heading == chapter, f"the rubric for {label} sits under '{heading}', not '{chapter}'"


def test_rubric_page_mentions_only_existing_exercises() -> None:
    unknown = sorted(set(EXERCISE_LABEL.findall(TEACHERS.read_text())) - set(exercises_checked()))
    assert not unknown, f"book/teachers.md names exercises that no chapter has: {unknown}"


MACHINERY = re.compile(r"rehearsal|record_repeats|config\.mode\(|empty_cache|SKIPPED")


def test_visible_code_shows_only_the_lesson(chapter: nbformat.NotebookNode) -> None:
    """No machinery in the code a reader sees, and no cell too long to read at once."""
    problems = []
    for index, cell in enumerate(chapter.cells):
        tags = cell.metadata.get("tags", [])
        if cell.cell_type != "code" or "remove-cell" in tags or "remove-input" in tags:
            continue
        lines = cell.source.splitlines()
        if len(lines) > 40:
            problems.append(f"cell {index}: {len(lines)} lines (at most 40)")
        if found := MACHINERY.search(cell.source):
            problems.append(f"cell {index} shows machinery: {found.group(0)!r}")
    assert not problems, problems


def test_every_citation_is_in_the_bibliography(chapter: nbformat.NotebookNode) -> None:
    bib = (ROOT / "book" / "references.bib").read_text()
    keys = set(re.findall(r"^@\w+\{([^,]+),", bib, re.MULTILINE))
    cited = {
        key.strip()
        for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", markdown(chapter))
        for key in group.split(",")
    }
    assert not cited - keys, f"cited but not in book/references.bib: {sorted(cited - keys)}"


def test_reads_quick_mode_only_through_config(chapter: nbformat.NotebookNode) -> None:
    code = "\n".join(c.source for c in chapter.cells if c.cell_type == "code")
    assert "LORA_TUTORIAL_QUICK" not in code, (
        "read quick mode with config.is_quick(), not the environment"
    )
    assert "tqdm.auto" not in code and "ipywidgets" not in code, (
        "widget output loads scripts from a CDN"
    )


def test_progress_bars_render_once_in_their_final_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """book/_ext/stream_outputs.py: tqdm's redraws collapse to what a terminal shows at the end."""
    pytest.importorskip("myst_nb")  # the extension hooks into myst-nb (the `book` extra)
    monkeypatch.syspath_prepend(str(ROOT / "book" / "_ext"))
    from stream_outputs import coalesce_streams

    def stream(name: str, text: str) -> nbformat.NotebookNode:
        return nbformat.v4.new_output("stream", name=name, text=text)

    outputs = [
        stream("stderr", "\rtrain:   0%|          | 0/3"),
        stream("stderr", "\rtrain:  67%|######6   | 2/3"),
        stream("stderr", "\rtrain: 100%|##########| 3/3\n"),
        stream("stdout", "done\n"),
        stream("stderr", "\repoch:  50%|#####     | 1/2"),
        stream("stderr", "\r                              \r"),  # a bar with leave=False
    ]
    merged = coalesce_streams(outputs)
    texts = {o["name"]: o["text"] for o in merged}
    assert texts == {"stderr": "train: 100%|##########| 3/3\n", "stdout": "done\n"}


# The layers of README's import-flow paragraph, bottom first: a module imports only from its own
# layer or below. Modules are named relative to the package ("runtime.config"); the subpackages
# exercises and classroom count as one module each.
IMPORT_LAYERS = [
    {"__init__", "runtime.__init__", "runtime.checks", "runtime.config", "runtime.files"},
    {"runtime.download", "runtime.rehearsal", "runtime.distributed"},
    {"lowrank", "counting", "lora", "gpt", "data"},
    {"adapters", "variants", "quantize", "serving", "classify", "analysis", "hf", "encoder"},
    {"train"},
    {"sweeps"},
    {"book.__init__", "book.provenance", "book.display"},
    {"book.translation"},
    {"book.plots", "book.diagrams", "book.editions"},
    {"finetune.options", "finetune.output_folder"},
    {"finetune.run", "finetune.__init__", "finetune.__main__", "exercises", "classroom"},
]
WHOLE = ("exercises", "classroom")  # subpackages placed as one module


def package_modules() -> dict[str, Path]:
    """Each module of the package by dotted name (``exercises``, ``classroom``: the folders)."""
    package = ROOT / "lora_tutorial"
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        if parts[0] in WHOLE:
            modules[parts[0]] = package / parts[0]
        else:
            modules[".".join(parts)] = path
    return modules


def _module_name(dotted: str, known: set[str]) -> str:
    """``a.b.c`` (after ``lora_tutorial.``) as a known module name: the longest known prefix."""
    parts = dotted.split(".")
    if parts[0] in WHOLE:
        return parts[0]
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return f"{dotted}.__init__" if f"{dotted}.__init__" in known else dotted


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package modules that the file (or every file of a folder) imports."""
    found: set[str] = set()
    for file in [path] if path.is_file() else sorted(path.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                pytest.fail(
                    f"{file.relative_to(ROOT)} uses a relative import; import lora_tutorial"
                )
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                if parts[0] != "lora_tutorial":
                    continue
                base = ".".join(parts[1:])
                for alias in node.names:
                    candidate = f"{base}.{alias.name}" if base else alias.name
                    if candidate in known or candidate.split(".")[0] in WHOLE:
                        found.add(_module_name(candidate, known))
                    else:
                        found.add(_module_name(base or "__init__", known))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == "lora_tutorial" and len(parts) > 1:
                        found.add(_module_name(".".join(parts[1:]), known))
    return found


def test_imports_flow_one_way_as_the_readme_says() -> None:
    layer_of = {name: i for i, layer in enumerate(IMPORT_LAYERS) for name in layer}
    modules = package_modules()
    unplaced = sorted(set(modules) - set(layer_of))
    assert not unplaced, f"place {unplaced} in README's import flow and in IMPORT_LAYERS"
    upward = [
        f"{name} imports {other}"
        for name, path in modules.items()
        for other in imported_modules(path, set(modules))
        if other in layer_of and layer_of[other] > layer_of[name]
    ]
    assert not upward, f"imports against the flow of README's layout section: {upward}"


def test_the_top_of_the_package_holds_the_teaching_modules() -> None:
    top = [p.stem for p in (ROOT / "lora_tutorial").glob("*.py") if p.stem != "__init__"]
    assert len(top) <= 18, f"{len(top)} modules at the top of lora_tutorial/: {sorted(top)}"


def test_readme_layout_names_every_module() -> None:
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    missing = [
        name
        for name, path in package_modules().items()
        if not name.endswith("__init__")
        and not name.endswith("__main__")
        and f"{path.name}{'/' if path.is_dir() else ''}" not in layout
    ]
    assert not missing, f"README's layout section does not list {missing}"


def test_no_formatter_directives_in_the_package() -> None:
    marked = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "lora_tutorial").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "fmt: " + "skip" in line or "fmt: " + "off" in line
    ]
    assert not marked, f"formatter directives (format the code honestly instead): {marked}"


def test_student_links_follow_the_configured_repository() -> None:
    sys.path.insert(0, str(ROOT / "book" / "_ext"))
    try:
        from student_links import student_url
    finally:
        sys.path.pop(0)
    url = student_url("https://github.com/someone/fork.git", "chapters/03_lora_from_scratch")
    assert url == (
        "https://colab.research.google.com/github/someone/fork/blob/notebooks/students/"
        "03_lora_from_scratch.ipynb"
    )
