"""Checks for chapter 6 (adapters: store, swap, merge)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from lora_tutorial.classify import GPTClassifier
from lora_tutorial.exercises._feedback import call, report
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


def check_use_adapter(use_adapter: Callable[[nn.Module, dict[str, torch.Tensor]], object]) -> bool:
    """Check ``use_adapter(model, adapter)`` puts exactly ``adapter`` on a model that has another.

    Layers that the new adapter does not cover must compute the base model again (their LoRA
    update reset to zero), and a merged model must be unmerged before the switch.
    """
    base = _tiny_lora_classifier()
    old = _random_adapter(base, lambda name: True, seed=1)
    # The new adapter covers only the attention's query and value layers (and the head).
    new = _random_adapter(
        base, lambda name: "W_query" in name or "W_value" in name or "out_head" in name, seed=2
    )
    tokens = torch.randint(0, 50257, (3, 9), generator=torch.Generator().manual_seed(3))

    want_model = copy.deepcopy(base)
    want_model.load_state_dict(new, strict=False)  # B starts at zero: uncovered layers add nothing
    want = _logits(want_model, tokens)

    problems: list[str] = []
    for merged in (False, True):
        model = copy.deepcopy(base)
        model.load_state_dict(old, strict=False)
        if merged:
            merge_lora(model)
        try:
            use_adapter(model, {k: v.clone() for k, v in new.items()})
            got = _logits(model, tokens)
        except Exception as exc:  # a learner's bug: say it in words instead of a traceback
            problems.append(
                f"with a{' merged' if merged else 'n unmerged'} model your function raised "
                f"{type(exc).__name__}: {exc}"
            )
            break
        if not torch.allclose(got, want, atol=1e-5):
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
    return report(
        problems,
        "the model now computes the base plus the new adapter, and nothing of the old one.",
    )


def check_adapter_bytes(adapter_bytes: Callable[[nn.Module], int]) -> bool:
    """Check ``adapter_bytes(model)`` gives the bytes the trainable tensors take (what an adapter
    file stores)."""
    problems: list[str] = []
    for dtype in (torch.float32, torch.bfloat16):
        model = _tiny_lora_classifier().to(dtype)
        want = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        got, err = call(adapter_bytes, model)
        if err:
            return report([f"your function raised {err}"], "")
        if got != want:
            everything = sum(p.numel() * p.element_size() for p in model.parameters())
            n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            if got == everything:
                hint = "that counts every parameter; count only those with requires_grad"
            elif got == n_trainable:
                hint = (
                    "that is a count of numbers, not bytes: "
                    "multiply by each tensor's element_size()"
                )
            elif got == 4 * n_trainable:
                hint = (
                    "that assumes 4 bytes per number; "
                    "ask each tensor (element_size()), the model may be bf16"
                )
            else:
                hint = f"expected {want:,}"
            problems.append(f"for a {dtype} model you return {got:,}: {hint}")
    return report(problems, "numbers times bytes per number, over the trainable tensors only.")
