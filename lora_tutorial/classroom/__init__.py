"""The classroom kit: student notebooks without solutions, and a grader for a class's submissions.

``python -m lora_tutorial.classroom student OUT_DIR [CHAPTER...]`` writes the student notebooks;
``python -m lora_tutorial.classroom grade SUBMISSION.ipynb... --out grades.csv`` grades them.
The book's page for teachers (``book/teachers.md``) shows both at work.
"""

from lora_tutorial.classroom.grading import (
    STATUSES,
    Grade,
    grade,
    grade_submission,
    summary,
    write_csv,
)
from lora_tutorial.classroom.notebooks import (
    Exercise,
    chapter_paths,
    chapters_dir,
    exercises,
    solved_notebook,
    student_notebook,
)

__all__ = [
    "STATUSES",
    "Exercise",
    "Grade",
    "chapter_paths",
    "chapters_dir",
    "exercises",
    "grade",
    "grade_submission",
    "solved_notebook",
    "student_notebook",
    "summary",
    "write_csv",
]
