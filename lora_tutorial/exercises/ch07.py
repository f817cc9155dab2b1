"""Checks for chapter 7's coding exercises: the DoRA weight, an NF4 round trip, PiSSA's start."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lora_tutorial.exercises._feedback import (
    Check,
    Verdict,
    call,
    close,
    describe,
    outcome,
    tensor,
)
from lora_tutorial.quantize import quantize_blockwise
from lora_tutorial.variants import LinearWithDoRA


def _close(a: object, b: torch.Tensor, tol: float = 1e-4) -> bool:
    return close(a, b, atol=tol, rtol=tol)


def _tensor_answer_problem(
    out: object, err: str | None, shape: torch.Size, *, err_hint: str = "", shape_hint: str = ""
) -> str | None:
    """Why a tensor answer cannot be compared value by value (it raised, is no tensor, has the
    wrong shape), or None."""
    if err:
        return f"your function raised {err}{err_hint}"
    if type(out) is not torch.Tensor:
        return f"your function returned {describe(out)}, not a torch.Tensor"
    if tuple(out.shape) != tuple(shape):
        return f"the result has shape {tuple(out.shape)}, expected {tuple(shape)}{shape_hint}"
    return None


# ----------------------------------------------------------------------------- DoRA


def _dora_case(
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """W0 (out=5, in=7), A (7, 2), B (2, 5), m (5,), a scaling: not square, so transposes show."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(5, 7, generator=g)
    A, B = torch.randn(7, 2, generator=g), torch.randn(2, 5, generator=g)
    m = 0.5 + torch.rand(5, generator=g)
    return W0, A, B, m, 2.0


def dora_reference(
    W0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, m: torch.Tensor, scaling: float
) -> torch.Tensor:
    """The merged DoRA weight, computed by the package's :class:`LinearWithDoRA`."""
    linear = nn.Linear(W0.shape[1], W0.shape[0], bias=False)
    layer = LinearWithDoRA(linear, A.shape[1], scaling * A.shape[1])
    with torch.no_grad():
        linear.weight.copy_(W0)
        layer.lora.A.copy_(A)
        layer.lora.B.copy_(B)
        layer.m.copy_(m)
    return layer.updated_weight().detach().clone()


def _probe_dora_weight(fn: Callable[..., torch.Tensor]) -> tuple:
    W0, A, B, m, scaling = _dora_case()
    return call(fn, W0.clone(), A.clone(), B.clone(), m.clone(), scaling)


def _judge_dora_weight(data: object) -> Verdict:
    problems: list[str] = []
    W0, A, B, m, scaling = _dora_case()
    out, err = outcome(data)
    expected = dora_reference(W0, A, B, m, scaling)
    V = W0 + scaling * (A @ B).T
    first = _tensor_answer_problem(out, err, W0.shape, shape_hint=" like W0 (out, in)")
    if first:
        problems.append(first)
    elif isinstance(out, torch.Tensor) and not _close(out, expected):
        if _close(out, m[:, None] * W0 / W0.norm(dim=1, keepdim=True) + scaling * (A @ B).T):
            problems.append(
                "you added the LoRA update after normalising W0: normalise V = W0 + scaling * (A "
                "@ B).T itself"
            )
        elif _close(
            out, m[:, None] * (W0 + (A @ B).T) / (W0 + (A @ B).T).norm(dim=1, keepdim=True)
        ):
            problems.append(
                "the LoRA update must be multiplied by `scaling` before it is added to W0"
            )
        elif _close(out, m[:, None] * V / V.norm(dim=0, keepdim=True)) or _close(
            out, m[:, None] * V / V.norm()
        ):
            problems.append(
                "take one norm per output unit: the norm of each row of V (dim=1), not of columns "
                "or of all of V"
            )
        elif _close(out.norm(dim=1), m):
            problems.append("each row has length m, but its direction is not that of V's row")
        else:
            problems.append(
                "the rows of your weight should have length m[i] and point like the rows of V"
            )
    return problems, "Each row of V is rescaled to length m: that is DoRA's merged weight."


check_dora_weight = Check(_probe_dora_weight, _judge_dora_weight)
"""Check ``fn(W0, A, B, m, scaling)``: DoRA's weight ``m * V / ||V||``.

Here ``V = W0 + scaling * (A @ B).T`` and the norms are taken per row (output unit).
"""


# ----------------------------------------------------------------------------- NF4


def _nf4_case() -> torch.Tensor:
    """A 5 x 30 weight (150 values: not a multiple of the block size) with one outlier."""
    g = torch.Generator().manual_seed(3)
    w = 0.02 * torch.randn(5, 30, generator=g)
    w[4, 29] = 0.4
    return w


def _probe_nf4_roundtrip(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> tuple:
    return call(fn, _nf4_case(), 64)


def _judge_nf4_roundtrip(data: object) -> Verdict:
    problems: list[str] = []
    w, blocksize = _nf4_case(), 64
    out, err = outcome(data)
    expected = quantize_blockwise(w, blocksize=blocksize).dequantize()
    first = _tensor_answer_problem(
        out,
        err,
        w.shape,
        err_hint=" (hint: pad the flattened values to a multiple of blocksize)",
        shape_hint=": give back the input's shape",
    )
    if first:
        problems.append(first)
    elif isinstance(out, torch.Tensor) and not _close(out, expected, 1e-6):
        whole = quantize_blockwise(w, blocksize=w.numel()).dequantize()
        uniform = quantize_blockwise(w, torch.linspace(-1, 1, 16), blocksize=blocksize).dequantize()
        if _close(out, whole, 1e-6):
            problems.append(
                "you scaled by the absmax of the whole tensor; use one absmax per block of "
                "`blocksize` values"
            )
        elif _close(out, uniform, 1e-6):
            problems.append("those are 16 evenly spaced levels; use the NF4 levels (nf4_levels())")
        elif torch.unique(out).numel() > 16 * ((w.numel() + blocksize - 1) // blocksize):
            problems.append(
                "there are more distinct values than 16 per block: did you round every value to a "
                "level?"
            )
        else:
            bad = int((out - expected).abs().argmax())
            problems.append(
                f"value {bad} (flat index) became {out.flatten()[bad].item():.5f}, expected "
                f"{expected.flatten()[bad].item():.5f}: "
                "each value should become the nearest level times its block's absmax"
            )
    return problems, "Your round trip matches the package's NF4 quantizer value for value."


check_nf4_roundtrip = Check(_probe_nf4_roundtrip, _judge_nf4_roundtrip)
"""Check ``fn(w, blocksize)``: quantize ``w`` block-wise to NF4, then dequantize it."""


# ----------------------------------------------------------------------------- PiSSA


def _linear(W: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(W)
    return linear


def _pissa_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    d_in, d_out, r = 10, 7, 3
    A, B = torch.randn(d_in, r, generator=g), torch.randn(r, d_out, generator=g)
    A0, B0 = torch.randn(d_in, r, generator=g), torch.randn(r, d_out, generator=g)
    return A, B, A0, B0


def _probe_pissa_to_lora(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> tuple:
    return call(fn, *(t.clone() for t in _pissa_case()))


def _judge_pissa_to_lora(data: object) -> Verdict:
    A, B, A0, B0 = _pissa_case()
    (d_in, r), d_out = A.shape, B.shape[1]
    out, err = outcome(data)
    if err:
        return [f"your function raised {err}"], ""
    if not (type(out) is tuple and len(out) == 2):
        return [f"return a pair (A2, B2), not {describe(out)}"], ""
    A2, B2 = tensor(out[0]), tensor(out[1])
    if A2 is None or B2 is None:
        return [f"A2 and B2 must be tensors, not {describe(out[0])} and {describe(out[1])}"], ""
    problems: list[str] = []
    if tuple(A2.shape) != (d_in, 2 * r) or tuple(B2.shape) != (2 * r, d_out):
        problems.append(
            f"A2 is {tuple(A2.shape)} and B2 {tuple(B2.shape)}; expected {(d_in, 2 * r)} and "
            f"{(2 * r, d_out)}: the difference of two rank-{r} products needs rank {2 * r}"
        )
    elif not close(A2.double() @ B2.double(), A @ B - A0 @ B0):
        hint = ""
        if close(A2.double() @ B2.double(), A @ B + A0 @ B0):
            hint = " (a sign: the initial product must be subtracted)"
        problems.append(f"A2 @ B2 is not A @ B - A0 @ B0{hint}")
    return (
        problems,
        "The PiSSA adapter now loads as an ordinary LoRA adapter on the original weights, at twice "
        "the rank; PEFT offers the same conversion when it saves a PiSSA model.",
    )


check_pissa_to_lora = Check(_probe_pissa_to_lora, _judge_pissa_to_lora)
"""Check ``fn(A, B, A0, B0)``: a plain LoRA pair for the *original* base from a PiSSA pair.

PiSSA trains ``A, B`` from ``A0, B0`` on the residual ``W - s (A0 B0)^T``, so its update to the
original ``W`` is ``s (A B - A0 B0)^T``: rank up to ``2 r``. The answer ``(A2, B2)`` has shapes
``(in, 2r)`` and ``(2r, out)`` with ``A2 @ B2 == A @ B - A0 @ B0``.
"""
