"""Checks for chapter 2's coding exercises: counting LoRA parameters, and the bytes training
keeps."""

from __future__ import annotations

from collections.abc import Callable

from lora_tutorial import counting, gpt
from lora_tutorial.exercises._feedback import Check, Verdict, call, describe, integer, outcomes

# GPT-2 small's and a small made-up model's shapes: enough to tell the common slips apart.
_CONFIGS = [
    gpt.GPT_CONFIGS["gpt2-small"],
    {
        "vocab_size": 1000,
        "context_length": 64,
        "emb_dim": 96,
        "n_heads": 4,
        "n_layers": 3,
        "drop_rate": 0.0,
        "qkv_bias": False,
    },
]


def _qv_params(cfg: dict, rank: int) -> int:
    shapes = counting.gpt_linear_shapes(cfg)
    return counting.lora_params_for(
        shapes, rank, select=lambda name: name.endswith(("W_query", "W_value"))
    )


_RANKS = (1, 8)


def _probe_qv_lora_params(fn: Callable[[dict, int], int]) -> list:
    return [call(fn, dict(cfg), rank) for cfg in _CONFIGS for rank in _RANKS]


def _judge_qv_lora_params(data: object) -> Verdict:
    cases = [(cfg, rank) for cfg in _CONFIGS for rank in _RANKS]
    for (cfg, rank), (out, err) in zip(cases, outcomes(data, len(cases))):
        d, layers = cfg["emb_dim"], cfg["n_layers"]
        where = f"for emb_dim={d}, n_layers={layers}, rank={rank}"
        if err:
            return [f"{where} your function raised {err}"], ""
        expected, got = _qv_params(cfg, rank), integer(out)
        if got == expected:
            continue
        if got is None:
            return [f"{where} you returned {describe(out)}, expected the int {expected:,}"], ""
        half, one_block, full_weights = expected // 2, expected // layers, 2 * layers * d * d
        hints = {
            half: "half the answer: there are two adapted matrices per block "
            "(query and value), and each adapter has A (d_in x r) and B (r x d_out), "
            "r*(d_in + d_out) numbers",
            one_block: "that is one block; multiply by n_layers",
            full_weights: "that counts the full weights d*d, not the adapters r*(d_in + d_out)",
        }
        hint = f" ({hints[got]})" if got in hints else ""
        return [f"{where} you returned {got!r}, expected {expected:,}{hint}"], ""
    return (
        [],
        "That is 2 * n_layers * rank * (emb_dim + emb_dim), the count of the LoRA paper's setup.",
    )


check_qv_lora_params = Check(_probe_qv_lora_params, _judge_qv_lora_params)
"""Check ``fn(cfg, rank)``: LoRA parameters when adapting ``W_query`` and ``W_value`` of every
block."""

_BYTES_CASES = [(1000, 1000, 4), (1000, 10, 4), (5000, 40, 2)]


def _probe_training_bytes(fn: Callable[[int, int, int], int]) -> list:
    return [call(fn, *case) for case in _BYTES_CASES]


def _judge_training_bytes(data: object) -> Verdict:
    problems: list[str] = []
    for (n_total, n_trainable, size), (out, err) in zip(
        _BYTES_CASES, outcomes(data, len(_BYTES_CASES))
    ):
        where = f"for n_total={n_total}, n_trainable={n_trainable}, bytes_per_number={size}"
        if err:
            problems.append(f"{where} your function raised {err}")
            break
        expected = counting.training_state_bytes(
            n_total, n_trainable, {4: "float32", 2: "bfloat16"}[size]
        ).total
        got = integer(out)
        if got == expected:
            continue
        if got is None:
            problems.append(f"{where} you returned {describe(out)}, expected the int {expected:,}")
            break
        no_moments, no_gradients = (
            (n_total + n_trainable) * size,
            (n_total + 3 * n_trainable) * size,
        )
        one_missing, all_trained = (n_total + 2 * n_trainable) * size, 4 * n_total * size
        hints = {
            no_moments: "AdamW's two moments per trained number are missing",
            no_gradients: "gradients are missing: every trained number has one",
            one_missing: "one of: gradients, or AdamW's second moment, is missing",
            all_trained: "gradients and AdamW state exist only for trained numbers, "
            "not frozen ones",
            n_total + 3 * n_trainable: "that counts numbers; multiply by bytes_per_number",
            n_total + 4 * n_trainable: "that counts numbers; multiply by bytes_per_number",
        }
        problems.append(
            f"{where} you returned {got!r}, expected {expected:,}"
            + (f" ({hints[got]})" if got in hints else "")
        )
        break
    return (
        problems,
        "Weights for every number; a gradient and two AdamW moments for each trained one.",
    )


check_training_bytes = Check(_probe_training_bytes, _judge_training_bytes)
"""Check ``fn(n_total, n_trainable, bytes_per_number)``: weights + gradients + AdamW state, in
bytes."""


__all__ = ["check_qv_lora_params", "check_training_bytes"]
