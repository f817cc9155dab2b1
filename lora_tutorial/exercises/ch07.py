"""Checks for chapter 7's coding exercises: DoRA's forward, an NF4 round trip, PiSSA to LoRA."""

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


def _dora_case(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """x (3, 7), W0 (out=5, in=7), bias (5,), A (7, 2), B (2, 5), m (5,): not square, so
    transposes show; the bias is large, so a bias inside the rescaling shows too."""
    g = torch.Generator().manual_seed(seed)
    x, W0 = torch.randn(3, 7, generator=g), torch.randn(5, 7, generator=g)
    bias = 2.0 + torch.rand(5, generator=g)
    A, B = torch.randn(7, 2, generator=g), torch.randn(2, 5, generator=g)
    m = 0.5 + torch.rand(5, generator=g)
    return x, W0, bias, A, B, m


SCALING = 2.0


def dora_layer(
    W0: torch.Tensor, bias: torch.Tensor, A: torch.Tensor, B: torch.Tensor, m: torch.Tensor
) -> LinearWithDoRA:
    """The package's :class:`LinearWithDoRA` holding exactly these tensors (scaling 2)."""
    linear = nn.Linear(W0.shape[1], W0.shape[0])
    layer = LinearWithDoRA(linear, A.shape[1], SCALING * A.shape[1])
    with torch.no_grad():
        linear.weight.copy_(W0)
        linear.bias.copy_(bias)
        layer.lora.A.copy_(A)
        layer.lora.B.copy_(B)
        layer.m.copy_(m)
    return layer


def _probe_dora_forward(fn: Callable[..., torch.Tensor]) -> tuple:
    return call(fn, *(t.clone() for t in _dora_case()), SCALING)


def _dora_mistakes(
    x: torch.Tensor,
    W0: torch.Tensor,
    bias: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    m: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """What typical slips compute, each with the hint it deserves."""
    s = SCALING
    V = W0 + s * (A @ B).T
    unscaled = W0 + (A @ B).T
    rows = m / V.norm(dim=1)
    return {
        "the bias was rescaled too: m / ||V|| rescales the weight's rows, so add the bias after "
        "rescaling": rows * (x @ V.T + bias),
        "the bias is missing: the layer adds its bias, as nn.Linear does": rows * (x @ V.T),
        "take one norm per output unit: the norm of each row of V, shape (out,), not the norm "
        "of all of V": m / V.norm() * (x @ V.T) + bias,
        "the LoRA update must be multiplied by `scaling` before it joins W0": (
            m / unscaled.norm(dim=1) * (x @ unscaled.T) + bias
        ),
        "you added the LoRA update after normalising W0: normalise V = W0 + scaling (AB)^T "
        "itself": m / W0.norm(dim=1) * (x @ W0.T) + s * x @ A @ B + bias,
        "that is the plain LoRA layer: the rows must also be rescaled to length m": x @ V.T + bias,
    }


def _judge_dora_forward(data: object) -> Verdict:
    x, W0, bias, A, B, m = _dora_case()
    out, err = outcome(data)
    expected = dora_layer(W0, bias, A, B, m)(x).detach()
    first = _tensor_answer_problem(
        out, err, expected.shape, shape_hint=": one row of d_out outputs per input row"
    )
    if first:
        return [first], ""
    if isinstance(out, torch.Tensor) and not _close(out, expected):
        for hint, wrong in _dora_mistakes(x, W0, bias, A, B, m).items():
            if _close(out, wrong):
                return [hint], ""
        return ["your outputs differ from LinearWithDoRA's on the same tensors"], ""
    return [], (
        "Your forward pass gives LinearWithDoRA's outputs: DoRA rescales each output unit by "
        "m / ||V|| and never needs the merged weight."
    )


check_dora_forward = Check(_probe_dora_forward, _judge_dora_forward)
"""Check ``fn(x, W0, bias, A, B, m, scaling)``: DoRA's output for a batch ``x``.

The answer must equal :class:`~lora_tutorial.variants.LinearWithDoRA` holding ``W0`` (out, in),
``bias`` (out,), ``A`` (in, r), ``B`` (r, out) and ``m`` (out,) with that ``scaling``.
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
