"""Checks for chapter 9's coding exercises: mean pooling, intruder dimensions, LoRA's size."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_tutorial.analysis import intruder_dimensions
from lora_tutorial.encoder import LORA_TARGETS, MINILM_L6, pool
from lora_tutorial.exercises._feedback import (
    Check,
    Verdict,
    call,
    close,
    describe,
    integer,
    outcome,
    outcomes,
)

# ----------------------------------------------------------------------------- mean pooling


def _pool_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 5 tokens, 4 dimensions: 5, 2 and 3 real tokens (padding holds big values)."""
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    hidden[mask == 0] += 50.0  # padding states far from the real ones: mixing them in shows
    return hidden, mask


def _probe_mean_pool(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple:
    hidden, mask = _pool_case()
    return call(fn, hidden.clone(), mask.clone())


def _judge_mean_pool(data: object) -> Verdict:
    hidden, mask = _pool_case()
    out, err = outcome(data)
    expected = pool(hidden, mask, "mean")
    problems: list[str] = []
    if err:
        problems.append(f"your function raised {err}")
    elif type(out) is not torch.Tensor:
        problems.append(f"your function returned {describe(out)}, not a torch.Tensor")
    elif tuple(out.shape) != tuple(expected.shape):
        problems.append(
            f"the result has shape {tuple(out.shape)}, expected {tuple(expected.shape)}: one "
            "vector per row (average over the tokens, dim=1)"
        )
    elif not close(out, expected, atol=1e-5, rtol=1e-5):
        weights = mask[..., None].float()
        if close(out, hidden.mean(dim=1), atol=1e-5, rtol=1e-5):
            problems.append("you averaged over padding too: count only the tokens where mask is 1")
        elif close(out, (hidden * weights).sum(dim=1), atol=1e-4, rtol=1e-5):
            problems.append("that is the sum of the real tokens' states: divide by their number")
        elif close(out, (hidden * weights).sum(dim=1) / 5, atol=1e-5, rtol=1e-5):
            problems.append("divide by each row's number of real tokens, not by all tokens")
        else:
            problems.append("each row should be the mean of the states where mask is 1")
    return problems, "Padding no longer changes a message's embedding: that is mean pooling."


check_mean_pool = Check(_probe_mean_pool, _judge_mean_pool)
"""Check ``fn(hidden, mask)``: the mean of each row's real tokens' states, ``(batch, dim)``."""


# ----------------------------------------------------------------------------- intruder dimensions


def _intruder_cases() -> list[tuple[torch.Tensor, torch.Tensor, int, float]]:
    """Pairs (W0, W, k, eps): no change, a large new direction, a flipped sign, a small change."""
    g = torch.Generator().manual_seed(4)
    W0 = torch.diag(torch.tensor([6.0, 5.0, 4.0, 3.0, 0.0, 0.0]))[:, :4].double()  # (6, 4)
    W0 = W0 + 0.01 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    new = torch.zeros(6, 4, dtype=torch.float64)
    new[4, 0], new[5, 1] = 20.0, 9.0  # two large directions in outputs W0 hardly uses
    return [
        (W0, W0.clone(), 3, 0.5),
        (W0, W0 + new, 3, 0.5),  # two intruders among the top 3
        (W0, -W0, 2, 0.5),  # same directions, opposite signs: no intruder
        (W0, W0 + 0.05 * new, 4, 0.5),
        (W0.T.contiguous(), (W0 + new).T.contiguous(), 3, 0.9),  # (4, 6): left = 4-d outputs
    ]


def _probe_intruder_count(fn: Callable[..., int]) -> list:
    return [call(fn, W0.clone(), W.clone(), k, eps) for W0, W, k, eps in _intruder_cases()]


def _judge_intruder_count(data: object) -> Verdict:
    cases = _intruder_cases()
    problems: list[str] = []
    for (W0, W, k, eps), (out, err) in zip(cases, outcomes(data, len(cases)), strict=True):
        expected = intruder_dimensions(W0, W, k, eps)
        where = f"for W0 of shape {tuple(W0.shape)}, k={k}, eps={eps}"
        if err:
            problems.append(f"{where} your function raised {err}")
        elif integer(out) is None:
            problems.append(f"{where} your function returned {describe(out)}, not an int")
            break
        elif out != expected:
            hint = ""
            if W0.shape[0] != W0.shape[1]:
                hint = " (use the left singular vectors, U: the columns, in output space)"
            problems.append(f"{where} the count is {out}, expected {expected}{hint}")
            break
    return problems, "You count intruder dimensions as Shuttleworth et al. define them."


check_intruder_count = Check(_probe_intruder_count, _judge_intruder_count)
"""Check ``fn(W0, W, k, eps)``: how many of W's top-k left singular vectors are intruders."""


# ----------------------------------------------------------------------------- LoRA's size


CASES = [
    (8, LORA_TARGETS),
    (8, ("query", "key", "value", "attn_out")),
    (4, ("query", "value")),
    (16, ("ff_in", "ff_out")),
    (1, ("attn_out",)),
]


def minilm_lora_reference(rank: int, targets: tuple[str, ...]) -> int:
    """What ``prepare_classifier(model, "lora", rank=rank, targets=targets)`` trains in MiniLM."""
    d, ff = MINILM_L6.hidden, MINILM_L6.intermediate
    sizes = {"ff_in": (d, ff), "ff_out": (ff, d)}
    per_layer = sum(rank * sum(sizes.get(t, (d, d))) for t in targets)
    return MINILM_L6.layers * per_layer + d * 2 + 2


def _probe_minilm_lora_params(fn: Callable[[int, tuple[str, ...]], int]) -> list:
    return [call(fn, rank, tuple(targets)) for rank, targets in CASES]


def _judge_minilm_lora_params(data: object) -> Verdict:
    problems: list[str] = []
    for (rank, targets), (out, err) in zip(CASES, outcomes(data, len(CASES)), strict=True):
        expected = minilm_lora_reference(rank, targets)
        where = f"rank {rank} on {', '.join(targets)}:"
        value = integer(out)
        if err:
            problems.append(f"{where} your function raised {err}")
        elif value is None:
            problems.append(f"{where} your function returned {describe(out)}, not an int")
        elif value != expected:
            head = 2 * MINILM_L6.hidden + 2
            if value == expected - head:
                hint = " (the head, 384 -> 2 with a bias, trains too)"
            elif (value - head) * MINILM_L6.layers == expected - head:
                hint = " (there are six encoder layers)"
            else:
                hint = " (A is d_in x rank, B is rank x d_out, per adapted layer)"
            problems.append(f"{where} {value:,}, expected {expected:,}{hint}")
    return problems, "Your count matches what prepare_classifier trains."


check_minilm_lora_params = Check(_probe_minilm_lora_params, _judge_minilm_lora_params)
"""Check ``fn(rank, targets)``: the parameters LoRA (and the head) trains in all-MiniLM-L6-v2."""
