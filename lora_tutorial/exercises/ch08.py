"""Checks for chapter 8's coding exercises: NF4 bits per weight, the multi-adapter update, and
Hu et al.'s amplification factor."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_tutorial.analysis import WeightUpdate, subspace_amplification
from lora_tutorial.counting import NF4_DQ_BITS
from lora_tutorial.exercises._feedback import (
    Check,
    Verdict,
    call,
    close,
    describe,
    near,
    number,
    outcome,
    outcomes,
)
from lora_tutorial.serving import multi_lora_delta

# ----------------------------------------------------------------------------- bits per weight


def _bits(block: int, scale_block: int) -> float:
    return 4 + 8 / block + 32 / (block * scale_block)


_BLOCKS = ((64, 256), (32, 128), (128, 64))


def _probe_bits_per_weight(fn: Callable[[int, int], float]) -> list:
    return [call(fn, block, scale_block) for block, scale_block in _BLOCKS]


def _judge_bits_per_weight(data: object) -> Verdict:
    problems: list[str] = []
    for (block, scale_block), (out, err) in zip(_BLOCKS, outcomes(data, len(_BLOCKS))):
        if err:
            problems.append(f"bits_per_weight({block}, {scale_block}) raised {err}")
            break
        value = number(out) if type(out) is not torch.Tensor else None
        if value is None:
            problems.append(
                f"bits_per_weight({block}, {scale_block}) returned {describe(out)}, not a number"
            )
            break
        expected = _bits(block, scale_block)
        if near(value, expected, tol=0.0, rel=1e-9):
            continue
        if near(value, 4 + 32 / block, tol=0.0, rel=1e-9):
            hint = "that is NF4 with a float32 scale per block: the scales are 8-bit numbers here"
        elif near(value, 4 + 8 / block, tol=0.0, rel=1e-9):
            hint = "you left out the float32 constant kept per scale_block scales"
        elif near(value, expected / 8, tol=0.0, rel=1e-9):
            hint = "that is bytes per weight; the question asks for bits"
        else:
            hint = (
                "count 4 bits per weight, 8 bits per block of weights, 32 bits per block of scales"
            )
        problems.append(
            f"bits_per_weight({block}, {scale_block}) = {value!r}, expected {expected:.4f}: {hint}"
        )
        break
    return problems, f"QLoRA's base costs {NF4_DQ_BITS:.3f} bits per weight."


check_bits_per_weight = Check(_probe_bits_per_weight, _judge_bits_per_weight)
"""Check ``fn(block, scale_block)``: NF4 bits per weight with double-quantised scales."""


# ----------------------------------------------------------------------------- multi-adapter update


def _multi_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (5, 3, 6), A (4, 6, 2), B (4, 2, 7), ids (5,): every shape different, so mix-ups show."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, 6, generator=g)
    A, B = torch.randn(4, 6, 2, generator=g), torch.randn(4, 2, 7, generator=g)
    return x, A, B, torch.tensor([3, 0, 0, 2, 1])


def _probe_multi_adapter_delta(fn: Callable[..., torch.Tensor]) -> tuple:
    return call(fn, *(t.clone() for t in _multi_case()))


def _judge_multi_adapter_delta(data: object) -> Verdict:
    problems: list[str] = []
    x, A, B, ids = _multi_case()
    expected = multi_lora_delta(x, A, B, ids)
    out, err = outcome(data)
    if err:
        problems.append(f"your function raised {err}")
    elif type(out) is not torch.Tensor:
        problems.append(f"your function returned {describe(out)}, not a torch.Tensor")
    elif tuple(out.shape) != tuple(expected.shape):
        problems.append(
            f"the result has shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
        )
    elif not close(out, expected, atol=1e-5, rtol=1e-5):
        if close(out, x @ A[0] @ B[0], atol=1e-5, rtol=1e-5):
            problems.append("every row used adapter 0: pick row i's pair with A[ids], B[ids]")
        elif close(out, x @ A[ids[0]] @ B[ids[0]], atol=1e-5, rtol=1e-5):
            problems.append("every row used the first row's adapter: index A and B by all of ids")
        else:
            problems.append("the values differ from x[i] @ A[ids[i]] @ B[ids[i]] for some row i")
    return problems, "Each row now goes through its own adapter in one batched product."


check_multi_adapter_delta = Check(_probe_multi_adapter_delta, _judge_multi_adapter_delta)
"""Check ``fn(x, A, B, ids)``: row ``i`` of ``x`` times ``A[ids[i]] @ B[ids[i]]``."""


# ----------------------------------------------------------------------------- amplification


def _amp_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(12, 9, generator=g, dtype=torch.float64)
    delta = torch.randn(12, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 9, generator=g, dtype=torch.float64
    )
    return W0, delta, 3


def _probe_amplification_factor(fn: Callable[[torch.Tensor, torch.Tensor, int], float]) -> tuple:
    W0, delta, r = _amp_case()
    return call(fn, W0.clone(), delta.clone(), r)


def _judge_amplification_factor(data: object) -> Verdict:
    problems: list[str] = []
    W0, delta, r = _amp_case()
    expected = subspace_amplification(WeightUpdate("case", W0, delta), r).factor
    out, err = outcome(data)
    value = number(out)
    if err:
        hint = (
            " (torch.linalg.svd returns Vh = V transposed: V_r is Vh[:r].T)"
            if "shape" in err
            else ""
        )
        problems.append(f"your function raised {err}{hint}")
    elif value is None:
        problems.append(f"your function returned {describe(out)}, not a number")
    elif not near(value, expected, tol=0.0, rel=1e-4):
        own = subspace_amplification(WeightUpdate("case", W0, W0), r)
        delta_norm = float(torch.linalg.matrix_norm(delta))
        if near(value, delta_norm / own.w0_in_own_directions, tol=0.0, rel=1e-4):
            problems.append("you used W0's singular vectors: take them from delta (ΔW)")
        elif near(value, 1 / expected, tol=0.0, rel=1e-4):
            problems.append("the ratio is upside down: ‖ΔW‖ goes on top")
        else:
            problems.append(f"got {value:.4g}, expected {expected:.4g}")
    return problems, "This is the factor of Hu et al.'s Table 7, computed on your own matrices."


check_amplification_factor = Check(_probe_amplification_factor, _judge_amplification_factor)
"""Check ``fn(W0, delta, r)``: ``‖delta‖_F / ‖U_rᵀ W0 V_r‖_F`` (delta's top-r directions)."""
