"""Checks for chapter 8's coding exercises: which layers an adapter targets, the batched
multi-adapter update, and how the first training step grows with the rank under each rule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lora_tutorial.exercises._feedback import (
    Check,
    Other,
    Verdict,
    call,
    close,
    outcome,
    outcomes,
    type_name,
)
from lora_tutorial.gpt import GPTModel
from lora_tutorial.lora import LinearWithLoRA, replace_linear_with_lora
from lora_tutorial.serving import multi_lora_delta

# ----------------------------------------------------------------------------- adapter layout

_TINY = {
    "vocab_size": 40,
    "context_length": 8,
    "emb_dim": 16,
    "n_heads": 2,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
}


def _adapter_file() -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The trained tensors of a small adapted GPT (LoRA factors and a head), and its layout."""
    torch.manual_seed(0)
    model = GPTModel(_TINY)
    model.requires_grad_(False)
    replace_linear_with_lora(model, 3, 6.0, include=["W_query", "W_value"])
    replace_linear_with_lora(model, 5, 10.0, include=["ff.layers.0"])
    model.out_head.requires_grad_(True)  # a trained head, as a classifier's adapter file holds
    tensors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    factors_a = {n.removesuffix(".lora.A"): t for n, t in tensors.items() if n.endswith(".lora.A")}
    layout = {name: int(t.shape[1]) for name, t in factors_a.items()}
    return tensors, layout


def _layout_hint(out: dict, expected: dict[str, int]) -> str:
    if set(out) == {f"{name}.lora.A" for name in expected}:
        return "name each layer, not its factor: drop the '.lora.A' ending"
    extra = sorted(set(out) - set(expected))
    if extra:
        return f"{extra[0]!r} is not a LoRA layer: keep only names with LoRA factors (.lora.A)"
    missing = sorted(set(expected) - set(out))
    if missing:
        return f"the layer {missing[0]!r} is missing"
    wrong = next(name for name in expected if out[name] != expected[name])
    return (
        f"{wrong!r} got rank {out[wrong]!r}, expected {expected[wrong]}: A is stored as"
        " (in_dim, rank), B as (rank, out_dim)"
    )


def _probe_adapter_layout(fn: Callable[[dict[str, torch.Tensor]], dict[str, int]]) -> tuple:
    """The learner's layout of the small adapted GPT's trained tensors."""
    tensors, _ = _adapter_file()
    return call(fn, dict(tensors))


def _judge_adapter_layout(data: object) -> Verdict:
    out, err = outcome(data)
    _, expected = _adapter_file()
    problems: list[str] = []
    if err:
        problems.append(f"your function raised {err}")
    elif isinstance(out, Other) and out.type_name == "dict":
        problems.append("the dict's keys should be the layer names, as strings")
    elif type(out) is not dict:
        problems.append(f"your function returned {type_name(out)}, not a dict")
    elif any(type(v) is not int for v in out.values()):
        bad = next(v for v in out.values() if type(v) is not int)
        problems.append(f"the ranks must be Python ints; got {bad!r} ({type_name(bad)})")
    elif out != expected:
        problems.append(_layout_hint(out, expected))
    return (
        problems,
        f"{len(expected)} layers with LoRA; a server needs this to stack adapters layer by layer.",
    )


check_adapter_layout = Check(_probe_adapter_layout, _judge_adapter_layout)
"""Check ``fn(state_dict)``: ``{layer name: rank}`` for every layer with LoRA factors."""


# ----------------------------------------------------------------------------- multi-adapter update


def _multi_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (5, 3, 6), A (4, 6, 2), B (4, 2, 7), ids (5,): every shape different, so mix-ups show."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, 6, generator=g)
    A, B = torch.randn(4, 6, 2, generator=g), torch.randn(4, 2, 7, generator=g)
    return x, A, B, torch.tensor([3, 0, 0, 2, 1])


def _probe_multi_adapter_delta(fn: Callable[..., torch.Tensor]) -> tuple:
    """The learner's batched update on the fixed case."""
    x, A, B, ids = _multi_case()
    return call(fn, x, A, B, ids)


def _judge_multi_adapter_delta(data: object) -> Verdict:
    out, err = outcome(data)
    x, A, B, ids = _multi_case()
    expected = multi_lora_delta(x, A, B, ids)
    problems: list[str] = []
    if err:
        problems.append(f"your function raised {err}")
    elif type(out) is not torch.Tensor:
        problems.append(f"your function returned {type_name(out)}, not a torch.Tensor")
    elif tuple(out.shape) != tuple(expected.shape):
        problems.append(
            f"the result has shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
        )
    elif not close(out, expected):
        if close(out, x @ A[0] @ B[0]):
            problems.append("every row used adapter 0: pick row i's pair with A[ids], B[ids]")
        elif close(out, x @ A[ids[0]] @ B[ids[0]]):
            problems.append("every row used the first row's adapter: index A and B by all of ids")
        else:
            problems.append("the values differ from x[i] @ A[ids[i]] @ B[ids[i]] for some row i")
    return problems, "This is the product inside serving.MultiLoRALinear, which section 5 runs."


check_multi_adapter_delta = Check(_probe_multi_adapter_delta, _judge_multi_adapter_delta)
"""Check ``fn(x, A, B, ids)``: row ``i`` of ``x`` times ``A[ids[i]] @ B[ids[i]]``."""


# ----------------------------------------------------------------------------- first step

RULES = {"fixed alpha": False, "alpha = 2r": False, "rsLoRA": True}
RANKS = (2, 32)
ALPHA = 16.0


def _alpha(rule: str, rank: int) -> float:
    return 2.0 * rank if rule == "alpha = 2r" else ALPHA


def reference_first_step_drop(rank: int, alpha: float, use_rslora: bool, seed: int = 0) -> float:
    """The exercise's measurement: how much one Adam step lowers a linear loss of a LoRA layer."""
    torch.manual_seed(seed)
    linear = nn.Linear(256, 256).requires_grad_(False)  # frozen, as LoRA's base always is
    layer = LinearWithLoRA(linear, rank=rank, alpha=alpha, use_rslora=use_rslora)
    x, g = torch.randn(32, 256), torch.randn(32, 256)
    optimizer = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=1e-3)
    loss = (layer(x) * g).sum()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        return loss.item() - (layer(x) * g).sum().item()


_CALLS = [(rule, rank) for rule in RULES for rank in RANKS]  # the probe's calls, in order


def _probe_first_step_drop(fn: Callable[[int, float, bool], float]) -> list:
    """The learner's drop at ranks 2 and 32 under each rule."""
    return [call(fn, rank, _alpha(rule, rank), RULES[rule]) for rule, rank in _CALLS]


def _as_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an int too large for a float
        return math.inf


def _growth(
    results: dict[tuple[str, int], tuple[Any, str | None]], rule: str
) -> tuple[float | None, str]:
    """The factor by which the learner's drop grows from rank 2 to 32 under ``rule``, or a
    problem."""
    drops = []
    for rank in RANKS:
        out, err = results[rule, rank]
        where = f"first_step_drop({rank}, {_alpha(rule, rank):g}, {RULES[rule]})"
        if err:
            return None, f"{where} raised {err}"
        if type(out) not in (int, float):
            return None, f"{where} returned {type_name(out)}; return a Python float (.item())"
        if not out > 0:  # also catches NaN
            return None, (
                f"{where} = {out!r}: the loss should fall, so return loss before minus loss after"
            )
        drops.append(_as_float(out))
    return drops[1] / drops[0], ""


def _judge_first_step_drop(data: object) -> Verdict:
    results = dict(zip(_CALLS, outcomes(data, len(_CALLS))))
    problems: list[str] = []
    measured: dict[str, float] = {}
    for rule in RULES:
        growth, problem = _growth(results, rule)
        if growth is None:
            problems.append(problem)
            break
        drops = [reference_first_step_drop(r, _alpha(rule, r), RULES[rule]) for r in RANKS]
        expected = drops[1] / drops[0]
        if not abs(growth / expected - 1) <= 0.3:  # NaN and infinity fail too
            problems.append(
                f"under {rule!r} your drop grew {growth:.3g}x from rank 2 to 32, the check's "
                f"measurement {expected:.3g}x: freeze the nn.Linear (only A and B train), make one "
                "torch.optim.Adam step at lr 1e-3, and use a loss linear in the output"
            )
            break
        measured[rule] = growth
    summary = ", ".join(f"{rule} x{g:.3g}" for rule, g in measured.items())
    return problems, f"From rank 2 to 32 the first step grew: {summary}. As predicted?"


check_first_step_drop = Check(_probe_first_step_drop, _judge_first_step_drop)
"""Check ``fn(rank, alpha, use_rslora)``: one Adam step's loss drop, as the exercise builds it.

Run at ranks 2 and 32 under each rule, its growth must match the check's own measurement within
30 %.
"""
