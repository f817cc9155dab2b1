"""Checks for chapter 5 (fine-tuning GPT-2 with LoRA)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lora_tutorial.classify import GPTClassifier
from lora_tutorial.exercises._feedback import call, report
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


def check_last_block(freeze_fn: Callable[[nn.Module], None]) -> bool:
    """Check ``freeze_fn(model)`` leaves exactly the last block, final norm and head trainable.

    ``model`` is a :class:`~lora_tutorial.classify.GPTClassifier`; the backbone is ``model.gpt``.
    """
    backbone = GPTModel("tiny")
    model = GPTClassifier(backbone)  # a tiny GPT with a two-class head, like the chapter's model
    _, err = call(freeze_fn, model)
    if err:
        return report([f"your function raised {err}"], "")
    problems: list[str] = []
    last = len(backbone.trf_blocks) - 1
    wanted_prefixes = (f"gpt.trf_blocks.{last}.", "gpt.final_norm.", "gpt.out_head.")
    wrong_frozen = [
        n
        for n, p in model.named_parameters()
        if n.startswith(wanted_prefixes) and not p.requires_grad
    ]
    wrong_trainable = [
        n
        for n, p in model.named_parameters()
        if not n.startswith(wanted_prefixes) and p.requires_grad
    ]
    if wrong_frozen:
        problems.append(f"these should be trainable but are frozen: {_few(wrong_frozen)}")
    if wrong_trainable:
        problems.append(f"these should be frozen but are trainable: {_few(wrong_trainable)}")
    return report(problems, "only the last block, the final LayerNorm and the new head will learn.")


def _few(names: list[str], k: int = 4) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def _tiny_classifier() -> nn.Module:
    """A tiny GPT with a two-class head, shaped like the chapter's model."""
    return GPTClassifier(GPTModel("tiny"))


def check_multi_adapter_forward(
    fn: Callable[[nn.Linear, list, torch.Tensor, torch.Tensor], torch.Tensor],
) -> bool:
    """Check ``fn(linear, adapters, x, adapter_ids)``: one batch, each row with its own adapter.

    ``adapters`` is a list of ``(A, B, scaling)``, ``A`` ``(in, rank)`` and ``B`` ``(rank, out)``;
    ``x`` is ``(batch, tokens, in)`` and row ``b`` uses ``adapters[adapter_ids[b]]``. The result
    equals running each row through its own ``LinearWithLoRA``.
    """
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(8, 5)
    adapters = [
        (torch.randn(8, r, generator=g), torch.randn(r, 5, generator=g), s)
        for r, s in ((2, 1.0), (2, 0.5), (2, 2.0))
    ]
    x = torch.randn(4, 3, 8, generator=g)
    ids = torch.tensor([2, 0, 2, 1])
    with torch.no_grad():
        expected = torch.stack(
            [
                linear(x[b]) + adapters[k][2] * x[b] @ adapters[k][0] @ adapters[k][1]
                for b, k in enumerate(ids.tolist())
            ]
        )
    out, err = call(fn, linear, adapters, x.clone(), ids.clone())
    if err:
        return report([f"your function raised {err}"], "")
    problems: list[str] = []
    if not isinstance(out, torch.Tensor) or out.shape != expected.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        problems.append(f"expected a tensor of shape {tuple(expected.shape)}, got {shape}")
    elif not torch.allclose(out, expected, atol=1e-5):
        wrong = [b for b in range(4) if not torch.allclose(out[b], expected[b], atol=1e-5)]
        problems.append(f"rows {wrong} do not match their own adapter's output")
    return report(
        problems,
        "One frozen base, many adapters, one batch: the idea behind serving systems such as "
        "S-LoRA and Punica (chapter 8 builds it into the package).",
    )
