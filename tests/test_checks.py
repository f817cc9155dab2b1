"""runtime.checks: the one family of checks on numbers that function arguments, command-line
options and environment variables share; and files.sha256_file, the one file digest."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest

from lora_tutorial.runtime import checks
from lora_tutorial.runtime.files import sha256_file


@pytest.mark.parametrize(
    ("bounds", "words"),
    [
        ({"above": 0}, "a positive, finite number"),
        ({"integer": True, "at_least": 1}, "a positive integer"),
        ({"at_least": 0}, "a non-negative, finite number"),
        ({"integer": True, "at_least": 0, "at_most": 2**32 - 1}, "an integer from 0 to 4294967295"),
        ({"at_least": 0, "below": 1}, "a finite number at least 0 and below 1"),
        ({"integer": True, "at_least": 2}, "an integer at least 2"),
        ({}, "a finite number"),
    ],
)
def test_requirements_read_alike(bounds: dict, words: str) -> None:
    assert checks.requirement(**bounds) == words


@pytest.mark.parametrize("value", [0, -1, 1.5, math.nan, math.inf, True, "3", None])
def test_a_bad_number_names_the_argument_the_value_and_the_fix(value: object) -> None:
    with pytest.raises(ValueError) as info:
        checks.check_number("rank", value, integer=True, at_least=1, hint="try 8")  # type: ignore[type-var]
    assert str(info.value) == f"rank must be a positive integer, got {value!r}; try 8"


def test_good_numbers_pass_through_and_what_replaces_the_wording() -> None:
    assert checks.check_positive("alpha", 32) == 32
    assert checks.check_number("dropout", 0.0, at_least=0, below=1) == 0.0
    with pytest.raises(ValueError, match=r"^dropout must be a probability in \[0, 1\), got 1$"):
        checks.check_number("dropout", 1, at_least=0, below=1, what="a probability in [0, 1)")
    assert (
        not checks.is_number(True)
        and checks.is_number(2.5)
        and not checks.is_number(2.5, integer=True)
    )


def test_parsed_text_names_the_variable_or_leaves_that_to_argparse() -> None:
    assert checks.parse_number("7", integer=True, at_least=1) == 7
    assert checks.parse_number("1e-3", above=0) == 1e-3
    with pytest.raises(ValueError, match=r"^'nan' is not a positive, finite number$"):
        checks.parse_number("nan", above=0)
    with pytest.raises(ValueError, match=r"^SEED='1\.5' is not an integer from 0 to 9; pick one$"):
        checks.parse_number(
            "1.5", name="SEED", integer=True, at_least=0, at_most=9, hint="pick one"
        )


def test_sha256_file_reads_in_pieces_and_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    blob = bytes(range(256)) * 8193  # a little over 2 MiB: three reads
    path.write_bytes(blob)
    assert sha256_file(path) == hashlib.sha256(blob).hexdigest()
