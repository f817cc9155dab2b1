"""The common form of every exercise check's answer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def call(fn: Callable, *args: object) -> tuple[Any, str | None]:
    """``(fn(*args), None)``, or ``(None, "ErrorType: message")`` when a learner's function raises.

    The result is typed ``Any``: a learner's function may return anything, and every check tests
    what it got before using it.
    """
    try:
        return fn(*args), None
    except Exception as err:  # a learner's bug: report it in words instead of a traceback
        return None, f"{type(err).__name__}: {err}"


def report(problems: list[str], success: str) -> bool:
    """Print the problems found (or ``success`` when there are none); return whether all is
    right."""
    if problems:
        print("Not yet:")
        for problem in problems:
            print(f"  - {problem}")
        return False
    print(f"Correct! {success}")
    return True
