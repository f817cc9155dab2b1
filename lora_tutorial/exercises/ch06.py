"""Checks for chapter 6 (adapters: store, swap, merge)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from lora_tutorial.classify import GPTClassifier
from lora_tutorial.exercises._feedback import (
    Check,
    Verdict,
    call,
    close,
    describe,
    integer,
    outcomes,
)
from lora_tutorial.gpt import GPTModel
from lora_tutorial.lora import merge_lora
from lora_tutorial.train import prepare_model


def _tiny_lora_classifier(seed: int = 0) -> nn.Module:
    """A tiny GPT classifier with rank-2 LoRA on every attention and feed-forward layer."""
    torch.manual_seed(seed)
    return prepare_model(GPTClassifier(GPTModel("tiny")), "lora", rank=2, alpha=4)


def _random_adapter(
    model: nn.Module, keep: Callable[[str], bool], seed: int
) -> dict[str, torch.Tensor]:
    """Random values for the trainable tensors whose names pass ``keep`` (an adapter, as
    ``read_adapter`` returns it)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: 0.2 * torch.randn(p.shape, generator=gen)
        for name, p in model.named_parameters()
        if p.requires_grad and keep(name)
    }


def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(tokens)


def _adapter_case() -> tuple[nn.Module, dict, dict, torch.Tensor]:
    """A model, its old adapter, a new one covering only query, value and head, and tokens."""
    base = _tiny_lora_classifier()
    old = _random_adapter(base, lambda name: True, seed=1)
    new = _random_adapter(
        base, lambda name: "W_query" in name or "W_value" in name or "out_head" in name, seed=2
    )
    tokens = torch.randint(0, 50257, (3, 9), generator=torch.Generator().manual_seed(3))
    return base, old, new, tokens


def _probe_use_adapter(use_adapter: Callable[[nn.Module, dict[str, torch.Tensor]], object]) -> list:
    base, old, new, tokens = _adapter_case()
    results = []
    for merged in (False, True):
        model = copy.deepcopy(base)
        model.load_state_dict(old, strict=False)
        if merged:
            merge_lora(model)

        def switch_and_run(model: nn.Module = model) -> torch.Tensor:
            use_adapter(model, {k: v.clone() for k, v in new.items()})
            return _logits(model, tokens)

        results.append(call(switch_and_run))
    return results


def _judge_use_adapter(data: object) -> Verdict:
    base, _, new, tokens = _adapter_case()
    base.load_state_dict(new, strict=False)  # B starts at zero: uncovered layers add nothing
    want = _logits(base, tokens)
    problems: list[str] = []
    for merged, (got, err) in zip((False, True), outcomes(data, 2)):
        if err:
            problems.append(
                f"with a{' merged' if merged else 'n unmerged'} model your function raised {err}"
            )
            break
        if not close(got, want):
            if merged:
                problems.append(
                    "on a merged model the old update stays folded into the weights: "
                    "unmerge (unmerge_lora) before switching"
                )
            else:
                problems.append(
                    "the layers the new adapter does not cover still apply the old adapter: "
                    "reset every LoRA layer (B to zero) before copying the new tensors"
                )
            break
    return (
        problems,
        "the model now computes the base plus the new adapter, and nothing of the old one.",
    )


check_use_adapter = Check(_probe_use_adapter, _judge_use_adapter)
"""Check ``use_adapter(model, adapter)`` puts exactly ``adapter`` on a model that has another.

Layers that the new adapter does not cover must compute the base model again (their LoRA update
reset to zero), and a merged model must be unmerged before the switch.
"""

_DTYPES = (torch.float32, torch.bfloat16)


def _probe_adapter_bytes(adapter_bytes: Callable[[nn.Module], int]) -> list:
    return [call(adapter_bytes, _tiny_lora_classifier().to(dtype)) for dtype in _DTYPES]


def _judge_adapter_bytes(data: object) -> Verdict:
    problems: list[str] = []
    for dtype, (out, err) in zip(_DTYPES, outcomes(data, len(_DTYPES))):
        if err:
            return [f"your function raised {err}"], ""
        model = _tiny_lora_classifier().to(dtype)
        want = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        got = integer(out)
        if got == want:
            continue
        if got is None:
            problems.append(f"for a {dtype} model you return {describe(out)}, not an int")
            continue
        everything = sum(p.numel() * p.element_size() for p in model.parameters())
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if got == everything:
            hint = "that counts every parameter; count only those with requires_grad"
        elif got == n_trainable:
            hint = "that is a count of numbers, not bytes: multiply by each tensor's element_size()"
        elif got == 4 * n_trainable:
            hint = (
                "that assumes 4 bytes per number; "
                "ask each tensor (element_size()), the model may be bf16"
            )
        else:
            hint = f"expected {want:,}"
        problems.append(f"for a {dtype} model you return {got:,}: {hint}")
    return problems, "numbers times bytes per number, over the trainable tensors only."


check_adapter_bytes = Check(_probe_adapter_bytes, _judge_adapter_bytes)
"""Check ``adapter_bytes(model)`` gives the bytes the trainable tensors take (what an adapter file
stores)."""
