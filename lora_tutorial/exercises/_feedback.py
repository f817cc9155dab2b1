"""The common form of every exercise check's answer."""

from __future__ import annotations


def report(problems: list[str], success: str) -> bool:
    """Print the problems found (or ``success`` when there are none) and return whether all is right."""
    if problems:
        print("Not yet:")
        for problem in problems:
            print(f"  - {problem}")
        return False
    print(f"Correct! {success}")
    return True
