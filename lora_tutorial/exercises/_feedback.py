"""The common form of every exercise check: a *probe* that runs the learner's code, and a *judge*.

A check is split in two so that a grader can run them in different processes:

- the **probe** calls the learner's function (or class) on the check's fixed inputs and returns
  what came out as *plain data*: ``None``, exact ``bool``/``int``/``float``/``str``, tuples, lists,
  dicts with string keys, CPU tensors and pandas DataFrames. Anything else (a ``float`` subclass, a
  module, a tensor subclass) arrives as :class:`Other`, a name and a short text, never the object;
- the **judge** receives that data only, recomputes what the right answer is, and returns the
  problems found and the sentence printed on success. It never sees nor calls learner code.

A check of a value rather than of code (``check_x(18_000)``, a learner's prediction) is
``Check.on_value(judge)``: its probe returns the value as it is, and the judge measures.

:func:`encode` and :func:`decode` carry plain data as JSON text between the two. A learner calling
``check_x(fn)`` in a notebook goes through the same ``probe → encode → decode → judge`` path that
the grader uses, so both always agree; the grader runs the probe inside the sandboxed submission and
the judge in its own process (``lora_tutorial.classroom.grading``).

Comparisons in a judge use :func:`number`, :func:`integer`, :func:`tensor`, :func:`near` and
:func:`close`: exact types only (a bool is not an int, a subclass is not a float), and NaN never
compares as close to anything.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

Verdict = tuple[list[str], str]  # the problems found, and the sentence printed when there are none

MAX_TEXT = 500  # characters kept of a learner's exception message or of a value's repr
MAX_ELEMENTS = 5_000_000  # numbers in all tensors of one probe's data together
_DTYPES = {
    str(t).removeprefix("torch."): t
    for t in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.int8,
        torch.uint8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    )
}
_NUMPY_SCALARS = {
    np.float16: float,
    np.float32: float,
    np.float64: float,
    np.int8: int,
    np.int16: int,
    np.int32: int,
    np.int64: int,
    np.uint8: int,
    np.bool_: bool,
}


class BadData(ValueError):
    """A probe's data do not have the form its judge expects (only forged data do that)."""


@dataclass(frozen=True)
class Other:
    """A value that is not plain data: what a judge sees in its place."""

    type_name: str
    text: str

    def __repr__(self) -> str:
        return self.text


def call(fn: Callable, *args: object) -> tuple[Any, str | None]:
    """``(fn(*args), None)``, or ``(None, "ErrorType: message")`` when a learner's function raises.

    The result is typed ``Any``: a learner's function may return anything, and every judge tests
    what it got before using it.
    """
    try:
        return fn(*args), None
    except Exception as err:  # a learner's bug: report it in words instead of a traceback
        return None, _clip(f"{type(err).__name__}: {err}")


def given(answer: Any) -> Any:
    """The probe of a check that receives a value rather than a function: the value itself."""
    return answer


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _other(value: object) -> dict[str, Any]:
    try:
        text = repr(value)
    except Exception:  # a learner's __repr__ may raise
        text = "?"
    return {"other": _clip(type(value).__qualname__), "repr": _clip(text)}


def _encode(value: Any, depth: int) -> Any:
    kind = type(value)
    if depth > 12:
        return _other(value)
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        return value if math.isfinite(value) else {"float": repr(value)}
    if kind in _NUMPY_SCALARS:
        return _encode(_NUMPY_SCALARS[kind](value), depth)
    if kind in (tuple, list):
        return {"tuple" if kind is tuple else "list": [_encode(v, depth + 1) for v in value]}
    if kind is dict and all(type(k) is str for k in value):
        return {"dict": {k: _encode(v, depth + 1) for k, v in value.items()}}
    if kind in (torch.Tensor, torch.nn.Parameter) and str(value.dtype)[6:] in _DTYPES:
        t = value.detach().to("cpu").contiguous()
        raw = t.float() if t.dtype == torch.bfloat16 else t
        data = base64.b64encode(raw.numpy().tobytes()).decode()
        return {"tensor": str(t.dtype)[6:], "shape": list(t.shape), "data": data}
    if kind is pd.DataFrame and all(type(c) is str for c in value.columns):
        columns = {c: [_encode(v, depth + 1) for v in value[c].tolist()] for c in value.columns}
        return {"frame": columns, "index": [_encode(v, depth + 1) for v in value.index.tolist()]}
    return _other(value)


def encode(value: Any) -> str:
    """Plain data as JSON text; anything that is not plain data becomes an :class:`Other`."""
    return json.dumps(_encode(value, 0))


class _Budget:
    def __init__(self) -> None:
        self.left = MAX_ELEMENTS

    def take(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise BadData("too many numbers")


def _decode(data: Any, budget: _Budget) -> Any:
    if data is None or type(data) in (bool, int, str, float):
        return data
    if type(data) is not dict or len(data) not in (1, 2, 3):
        raise BadData("not plain data")
    if "float" in data and data["float"] in ("nan", "inf", "-inf"):
        return float(data["float"])
    if "tuple" in data or "list" in data:
        items = data.get("tuple", data.get("list"))
        if type(items) is not list:
            raise BadData("not a sequence")
        budget.take(len(items))
        decoded = [_decode(v, budget) for v in items]
        return tuple(decoded) if "tuple" in data else decoded
    if "dict" in data and type(data["dict"]) is dict:
        budget.take(len(data["dict"]))
        return {str(k): _decode(v, budget) for k, v in data["dict"].items()}
    if "tensor" in data:
        return _decode_tensor(data, budget)
    if "frame" in data and type(data["frame"]) is dict and type(data.get("index")) is list:
        columns = {
            str(c): [_decode(v, budget) for v in _sequence(vs, budget)]
            for c, vs in data["frame"].items()
        }
        index = [_decode(v, budget) for v in _sequence(data["index"], budget)]
        if any(len(v) != len(index) for v in columns.values()):
            raise BadData("ragged table")
        cells = [*index, *(v for values in columns.values() for v in values)]
        if any(isinstance(v, (tuple, list, dict)) for v in cells):
            raise BadData("a table of containers")
        return pd.DataFrame(columns, index=index, columns=list(columns))
    if "other" in data and type(data["other"]) is str and type(data.get("repr")) is str:
        return Other(_clip(data["other"]), _clip(data["repr"]))
    raise BadData("not plain data")


def _sequence(value: Any, budget: _Budget) -> list:
    if type(value) is not list:
        raise BadData("not a sequence")
    budget.take(len(value))
    return value


def _decode_tensor(data: dict, budget: _Budget) -> torch.Tensor:
    dtype, shape, raw = data.get("tensor"), data.get("shape"), data.get("data")
    if dtype not in _DTYPES or type(shape) is not list or type(raw) is not str:
        raise BadData("not a tensor")
    if not all(type(n) is int and 0 <= n <= MAX_ELEMENTS for n in shape) or len(shape) > 8:
        raise BadData("not a tensor shape")
    numel = math.prod(shape)
    budget.take(numel)
    wire = torch.float32 if dtype == "bfloat16" else _DTYPES[dtype]
    buffer = base64.b64decode(raw, validate=True)
    if len(buffer) != numel * wire.itemsize:
        raise BadData("tensor size does not match its shape")
    flat = torch.frombuffer(bytearray(buffer), dtype=wire) if numel else torch.empty(0, dtype=wire)
    return flat.reshape(shape).to(_DTYPES[dtype]).clone()


def decode(text: str) -> Any:
    """The plain data of :func:`encode`'s text; :class:`BadData` for anything else."""
    try:
        return _decode(json.loads(text), _Budget())
    except (ValueError, TypeError, RecursionError) as err:
        raise BadData(str(err)) from None


# ----------------------------------------------------------------------------- reading the data


def number(value: Any) -> float | None:
    """An exact ``int`` (not a bool) or ``float``, or a one-number real tensor, as a float."""
    if type(value) is int or type(value) is float:
        return float(value)
    if type(value) is torch.Tensor and value.numel() == 1 and value.dtype != torch.bool:
        return float(value.item())
    return None


def integer(value: Any) -> int | None:
    """An exact ``int`` (not a bool, not a float that happens to be whole)."""
    return value if type(value) is int else None


def tensor(value: Any) -> torch.Tensor | None:
    """A plain ``torch.Tensor``, or None."""
    return value if type(value) is torch.Tensor else None


def near(value: float | None, expected: float, tol: float = 1e-4, rel: float = 0.0) -> bool:
    """``value`` within ``tol + rel * |expected|`` of ``expected``; False for None and NaN."""
    return value is not None and abs(value - expected) <= tol + rel * abs(expected)


def close(value: Any, expected: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5) -> bool:
    """A plain tensor of ``expected``'s shape whose values are close to it; NaN is never close."""
    if type(value) is not torch.Tensor or tuple(value.shape) != tuple(expected.shape):
        return False
    if value.dtype == torch.bool or expected.dtype == torch.bool:
        return bool(torch.equal(value, expected))
    return bool(torch.allclose(value.double(), expected.double(), atol=atol, rtol=rtol))


def type_name(value: Any) -> str:
    """The name of a value's type as the learner wrote it: ``Tensor``, ``bool``, ``MyFloat``."""
    return value.type_name if isinstance(value, Other) else type(value).__name__


def describe(value: Any) -> str:
    """A value in a few words: ``NoneType``, ``3.5 (float)``, ``a tensor of shape (2, 3)``."""
    if type(value) is torch.Tensor:
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Other):
        return value.type_name
    if type(value) in (bool, int, float, str):
        return f"{_clip(repr(value))} ({type(value).__name__})"
    return type(value).__name__


def outcomes(data: Any, n: int) -> list[tuple[Any, str | None]]:
    """The ``n`` ``(result, error)`` pairs of :func:`call` that a probe returned, in order."""
    if type(data) is not list or len(data) != n:
        raise BadData(f"expected {n} results")
    return [outcome(item) for item in data]


def outcome(item: Any) -> tuple[Any, str | None]:
    """One ``(result, error)`` pair of :func:`call`."""
    if type(item) is not tuple or len(item) != 2 or not (item[1] is None or type(item[1]) is str):
        raise BadData("expected a (result, error) pair")
    return item[0], item[1]


def field(data: Any, key: str, *kinds: type) -> Any:
    """``data[key]``, which must be one of ``kinds`` exactly (``type(None)`` for None)."""
    if type(data) is not dict or key not in data or type(data[key]) not in kinds:
        raise BadData(f"no {key}")
    return data[key]


def names(value: Any) -> list[str]:
    """A list of strings (parameter names) from a probe."""
    if type(value) is not list or not all(type(v) is str for v in value):
        raise BadData("expected names")
    return value


def report(problems: Sequence[str], success: str) -> bool:
    """Print the problems found (or ``success`` when there are none); return whether all is
    right."""
    if problems:
        print("Not yet:")
        for problem in problems:
            print(f"  - {problem}")
        return False
    print(f"Correct! {success}")
    return True


@dataclass(frozen=True)
class Check:
    """An exercise check: ``check(answer)`` prints what is right or wrong and returns a bool.

    ``probe(answer)`` runs the learner's code and returns plain data; ``judge(data)`` decides. The
    grader calls the two in different processes; see the module's docstring.
    """

    probe: Callable[[Any], Any]
    judge: Callable[[Any], Verdict]

    @classmethod
    def on_value(cls, judge: Callable[[Any], Verdict]) -> Check:
        """A check of a value (a prediction, a number) instead of code: its probe hands the value
        itself to :func:`encode`, so the judge sees plain data or an :class:`Other`."""
        return cls(given, judge)

    def verdict(self, data: str) -> Verdict:
        """The judge's verdict on a probe's encoded data (:class:`BadData` if malformed)."""
        return self.judge(decode(data))

    def __call__(self, answer: Any) -> bool:
        problems, success = self.verdict(encode(self.probe(answer)))
        return report(problems, success)
