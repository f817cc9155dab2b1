"""The classroom command line: ``python -m lora_tutorial.classroom {student,grade} --help``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import nbformat

from lora_tutorial.classroom.grading import (
    Interrupted,
    check_inputs,
    grade,
    summary,
)
from lora_tutorial.classroom.notebooks import STUDENT_TEXT, chapter_paths, student_notebook
from lora_tutorial.runtime.files import atomic_write

UNTRUSTED = (
    "Submissions are untrusted code: each runs in a disposable sandbox (its own namespaces where "
    "the system allows them, resource limits, a temporary folder) and every verdict is decided "
    "outside it, but this is not a full container. Grade submissions from people you do not trust "
    "in a throwaway account."
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lora_tutorial.classroom",
        description="Student notebooks without solutions, and a grader for a class's submissions.",
        epilog=UNTRUSTED,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    student = commands.add_parser(
        "student",
        help="write student notebooks (solutions removed, checks ready to run)",
        description="Write each chapter as a student notebook: solutions removed, one answer "
        "cell with its check per checked exercise.",
    )
    student.add_argument("out_dir", type=Path, help="folder to write the notebooks into")
    student.add_argument(
        "chapters", nargs="*", help="chapters (3, 03 or a file name); default: all"
    )
    student.add_argument(
        "--lang",
        choices=sorted(STUDENT_TEXT),
        default="en",
        help="the edition's language: text translated, code as it is (default: %(default)s)",
    )
    grader = commands.add_parser(
        "grade",
        help="grade submitted student notebooks into a CSV table",
        description="Run each submission in its own kernel and record, for every exercise with "
        "an automatic check: pass, fail, raised, timeout, not-attempted or broken. " + UNTRUSTED,
    )
    grader.add_argument("submissions", nargs="+", type=Path, help="submitted .ipynb files")
    grader.add_argument("--out", type=Path, required=True, help="the CSV file to write")
    grader.add_argument(
        "--cell-timeout", type=int, default=120, help="seconds per cell (default: %(default)s)"
    )
    grader.add_argument(
        "--notebook-timeout",
        type=int,
        default=1800,
        help="seconds per submission (default: %(default)s)",
    )
    grader.add_argument(
        "--jobs", type=int, default=1, help="submissions graded at once (default: %(default)s)"
    )
    grader.add_argument(
        "--full",
        action="store_true",
        help="run in full mode (real GPT-2, from your cache) instead of quick mode",
    )
    for sub in (student, grader):
        sub.add_argument(
            "--chapters-dir", type=Path, default=None, help="the chapter notebooks' folder"
        )
        sub.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = parser.parse_args(argv)
    if args.command == "grade":
        if args.cell_timeout < 1 or args.notebook_timeout < 1:
            parser.error("--cell-timeout and --notebook-timeout must be at least 1 second")
        if args.jobs < 1:
            parser.error("--jobs must be at least 1")
    return args


def write_students(
    out_dir: Path, chapters: list[Path], overwrite: bool, lang: str = "en"
) -> list[Path]:
    """Write the student notebooks of ``chapters`` into ``out_dir``; refuse to replace files."""
    targets = [out_dir / p.name for p in chapters]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} exist; choose another folder or --overwrite")
    for chapter, target in zip(chapters, targets, strict=True):
        nb = student_notebook(chapter, lang=lang)
        with atomic_write(target) as tmp:
            nbformat.write(nb, tmp)
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "student":
            chapters = chapter_paths(args.chapters_dir, args.chapters)
            for path in write_students(args.out_dir, chapters, args.overwrite, args.lang):
                print(f"wrote {path}")
            return 0
        check_inputs(args.submissions, args.out, args.chapters_dir, args.overwrite)
        print(UNTRUSTED, file=sys.stderr)
        grades = grade(
            args.submissions,
            args.chapters_dir,
            args.cell_timeout,
            args.notebook_timeout,
            quick=not args.full,
            jobs=args.jobs,
            out=args.out,
        )
    except Interrupted as stop:
        print(f"stopped by {stop}: {args.out} holds the students graded so far", file=sys.stderr)
        return 130
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not grades:
        print("error: no submission to grade", file=sys.stderr)
        return 2
    print(summary(grades).to_string(index=False))
    print(f"wrote {len(grades)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
