"""Checks for chapter 5 (fine-tuning GPT-2 with LoRA)."""

from __future__ import annotations

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
    names,
    outcome,
    tensor,
)
from lora_tutorial.gpt import GPTModel

# The configurations the parameter-count check tries: GPT-2 small, and odd shapes that catch
# shortcuts.
_CONFIGS = [
    {"emb_dim": 768, "n_layers": 12, "n_heads": 12},
    {"emb_dim": 64, "n_layers": 2, "n_heads": 4},
    {"emb_dim": 96, "n_layers": 3, "n_heads": 2},
]


def expected_lora_parameters(cfg: dict, rank: int) -> int:
    """LoRA parameters for rank ``rank`` on every attention and feed-forward linear layer.

    Each adapted ``d_in -> d_out`` layer adds ``rank * (d_in + d_out)`` numbers. A block has
    four ``d -> d`` attention layers (query, key, value, output) and the ``d -> 4d -> d``
    feed-forward pair, so ``4 * 2rd + 2 * 5rd = 18 r d`` per block.
    """
    d = cfg["emb_dim"]
    return 18 * rank * d * cfg["n_layers"]


def _trainable(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _probe_last_block(freeze_fn: Callable[[nn.Module], None]) -> tuple:
    model = _tiny_classifier()
    _, err = call(freeze_fn, model)
    return _trainable(model), err


def _judge_last_block(data: object) -> Verdict:
    listed, err = outcome(data)
    if err:
        return [f"your function raised {err}"], ""
    trainable = names(listed)
    model = _tiny_classifier()
    last = len(GPTModel("tiny").trf_blocks) - 1
    wanted_prefixes = (f"gpt.trf_blocks.{last}.", "gpt.final_norm.", "gpt.out_head.")
    every = [name for name, _ in model.named_parameters()]
    wrong_frozen = [n for n in every if n.startswith(wanted_prefixes) and n not in trainable]
    wrong_trainable = [n for n in trainable if not n.startswith(wanted_prefixes) or n not in every]
    problems: list[str] = []
    if wrong_frozen:
        problems.append(f"these should be trainable but are frozen: {_few(wrong_frozen)}")
    if wrong_trainable:
        problems.append(f"these should be frozen but are trainable: {_few(wrong_trainable)}")
    return problems, "only the last block, the final LayerNorm and the new head will learn."


check_last_block = Check(_probe_last_block, _judge_last_block)
"""Check ``freeze_fn(model)`` leaves exactly the last block, final norm and head trainable.

``model`` is a :class:`~lora_tutorial.classify.GPTClassifier`; the backbone is ``model.gpt``.
"""


def _few(names: list[str], k: int = 4) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def _tiny_classifier() -> nn.Module:
    """A tiny GPT with a two-class head, shaped like the chapter's model."""
    return GPTClassifier(GPTModel("tiny"))


def _forward_case() -> tuple[nn.Linear, list, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    linear = nn.Linear(8, 5)
    adapters = [
        (torch.randn(8, r, generator=g), torch.randn(r, 5, generator=g), s)
        for r, s in ((2, 1.0), (2, 0.5), (2, 2.0))
    ]
    return linear, adapters, torch.randn(4, 3, 8, generator=g), torch.tensor([2, 0, 2, 1])


def _probe_multi_adapter_forward(fn: Callable[..., torch.Tensor]) -> tuple:
    linear, adapters, x, ids = _forward_case()
    return call(fn, linear, adapters, x.clone(), ids.clone())


def _judge_multi_adapter_forward(data: object) -> Verdict:
    linear, adapters, x, ids = _forward_case()
    with torch.no_grad():
        expected = torch.stack(
            [
                linear(x[b]) + adapters[k][2] * x[b] @ adapters[k][0] @ adapters[k][1]
                for b, k in enumerate(ids.tolist())
            ]
        )
    out, err = outcome(data)
    if err:
        return [f"your function raised {err}"], ""
    problems: list[str] = []
    got = tensor(out)
    if got is None or got.shape != expected.shape:
        shape = tuple(got.shape) if got is not None else describe(out)
        problems.append(f"expected a tensor of shape {tuple(expected.shape)}, got {shape}")
    elif not close(got, expected):
        wrong = [b for b in range(4) if not close(got[b], expected[b])]
        problems.append(f"rows {wrong} do not match their own adapter's output")
    return (
        problems,
        "One frozen base, many adapters, one batch: the idea behind serving systems such as "
        "S-LoRA and Punica (chapter 8 builds it into the package).",
    )


check_multi_adapter_forward = Check(_probe_multi_adapter_forward, _judge_multi_adapter_forward)
"""Check ``fn(linear, adapters, x, adapter_ids)``: one batch, each row with its own adapter.

``adapters`` is a list of ``(A, B, scaling)``, ``A`` ``(in, rank)`` and ``B`` ``(rank, out)``; ``x``
is ``(batch, tokens, in)`` and row ``b`` uses ``adapters[adapter_ids[b]]``. The result equals
running each row through its own ``LinearWithLoRA``.
"""
