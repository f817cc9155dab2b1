"""One family of checks on the numbers a user gives: function arguments, options, settings.

A number that is out of range stops the code at once with one line that names the argument, the
value, what it must be and, where it helps, what to try::

    check_number("rank", 0, integer=True, at_least=1, hint="typical values are 4, 8 or 16")
    # ValueError: rank must be a positive integer, got 0; typical values are 4, 8 or 16

:func:`parse_number` does the same for text (a command-line option, an environment variable), and
:func:`requirement` says in words what a range allows, so every message reads alike. Booleans are
never numbers here (``True`` is an ``int`` to Python, not a rank to a reader), and a float must be
finite.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, TypeVar

N = TypeVar("N", int, float)


def is_number(value: Any, *, integer: bool = False) -> bool:
    """True for an int or a float (only an int if ``integer``); False for bools, strings, None."""
    kind = numbers.Integral if integer else numbers.Real
    return isinstance(value, kind) and not isinstance(value, bool)


def requirement(
    *,
    integer: bool = False,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
) -> str:
    """What a range allows, in words: ``"a positive integer"``, ``"an integer from 0 to 9"``."""
    adjective = ""
    if at_most is None and below is None:
        if (above == 0 and at_least is None) or (integer and at_least == 1 and above is None):
            adjective, at_least, above = "positive", None, None
        elif at_least == 0 and above is None:
            adjective, at_least = "non-negative", None
    noun = "integer" if integer else "finite number"
    if adjective:
        noun = f"{adjective} {noun}" if integer else f"{adjective}, {noun}"
    if at_least is not None and at_most is not None and above is None and below is None:
        bounds = f"from {_show(at_least)} to {_show(at_most)}"
    else:
        named = (("at least", at_least), ("above", above), ("at most", at_most), ("below", below))
        bounds = " and ".join(
            f"{word} {_show(bound)}" for word, bound in named if bound is not None
        )
    article = "an" if noun[0] in "aeiou" else "a"
    return f"{article} {noun} {bounds}".rstrip()


def _show(bound: float) -> str:
    """A bound as a reader writes it: ``1``, ``0.5``, ``4294967295`` (not ``4.29497e+09``)."""
    if float(bound).is_integer() and abs(bound) < 1e16:
        return str(int(bound))
    return f"{bound:g}"


def in_range(
    value: Any,
    *,
    integer: bool = False,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
) -> bool:
    """True when ``value`` is a number (an integer if ``integer``; finite) within the bounds."""
    if not is_number(value, integer=integer) or not math.isfinite(value):
        return False
    return not (
        (at_least is not None and value < at_least)
        or (above is not None and value <= above)
        or (at_most is not None and value > at_most)
        or (below is not None and value >= below)
    )


def check_number(
    name: str,
    value: N,
    *,
    integer: bool = False,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
    what: str | None = None,
    hint: str = "",
) -> N:
    """``value`` if it is in range, else ValueError: ``"{name} must be {what}, got {value!r}"``.

    ``what`` replaces the :func:`requirement` wording where a name says more ("a probability in
    [0, 1)"); ``hint`` is added after a semicolon: what to try instead.
    """
    bounds = {"at_least": at_least, "above": above, "at_most": at_most, "below": below}
    if not in_range(value, integer=integer, **bounds):
        need = what or requirement(integer=integer, **bounds)
        raise ValueError(f"{name} must be {need}, got {value!r}" + (f"; {hint}" if hint else ""))
    return value


def check_positive(name: str, value: N, *, integer: bool = False, hint: str = "") -> N:
    """``value`` if it is a positive number (integer), else ValueError naming ``name``."""
    return check_number(name, value, integer=integer, above=0, hint=hint)


def parse_number(
    text: str,
    *,
    name: str | None = None,
    integer: bool = False,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
    hint: str = "",
) -> float:
    """The number written in ``text`` (an option, an environment variable), checked as above.

    A ValueError says ``"{name}={text!r} is not {requirement}"`` (``"{text!r} is not ..."``
    without a ``name``: argparse puts the option's name in front itself).
    """
    bounds = {"at_least": at_least, "above": above, "at_most": at_most, "below": below}
    try:
        value: float = int(text) if integer else float(text)
    except ValueError:
        value = math.nan
    if not in_range(value, integer=integer, **bounds):
        given = f"{name}={text!r}" if name else repr(text)
        need = requirement(integer=integer, **bounds)
        raise ValueError(f"{given} is not {need}" + (f"; {hint}" if hint else ""))
    return value
