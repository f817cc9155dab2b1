"""The three fine-tuning methods: what each one trains, and their default settings.

- :func:`prepare_model` freezes and adapts a :class:`~lora_tutorial.classify.GPTClassifier`
  for one of ``METHODS``: ``"lora"``, ``"full"`` or ``"last-block"``.
- :func:`default_lr` (``DEFAULT_LR``, ``QUICK_LR``), ``LORA_RANK``, :func:`default_alpha` and
  ``LORA_TARGETS``: the default settings that the chapters and the command line share.
- :func:`trainable_state_dict` and :func:`weights_digest`: what a run changed, and whether two
  runs ended with the same weights.

:mod:`lora_tutorial.train` re-exports these names (``train.prepare_model`` and so on).
"""

from __future__ import annotations

import hashlib
from typing import cast

import torch
from torch import nn

from lora_tutorial import lora
from lora_tutorial.classify import GPTClassifier
from lora_tutorial.gpt import GPTModel

METHODS = ("lora", "full", "last-block")

# Default AdamW learning rates in full mode (GPT-2), shared by the chapters and the command line.
# LoRA gets ten times the rate of the other methods, as is usual: full and last-block fine-tuning
# move pretrained weights, which large steps would damage (5e-5, as chapter 6 of LLMs-from-scratch
# uses), while LoRA's update starts at zero (B = 0) and grows as the product of two small matrices,
# so at that rate it changes the model far more slowly. Hu et al. (2021) trained LoRA with 2e-4 on
# GPT-2 and 4e-4 to 5e-4 on RoBERTa.
DEFAULT_LR = {"lora": 5e-4, "full": 5e-5, "last-block": 5e-5}
# Quick mode, every method: a tiny random model needs large steps to move in a few batches.
QUICK_LR = 1e-3

# LoRA's default rank and alpha in full mode (scaling alpha / rank = 2). Under AdamW the scaling,
# like the learning rate, sets how fast the update grows. Appendix E of LLMs-from-scratch multiplied
# its rank-16 update by alpha = 16 itself and drew A about 7x larger than our PEFT-style init, so
# its update started out much faster than ours even at a tenth of our rate. alpha = 2 * rank narrows
# that gap for a 5-epoch budget and stays within the LoRA authors' settings (their scripts:
# RoBERTa-base rank 8, alpha 16; GPT-2 rank 4, alpha 32). Quick mode keeps alpha = rank: its tiny
# random model already trains at QUICK_LR, and with a doubled scaling chapter 7's quick LoRA+ run
# ended at chance accuracy.
LORA_RANK, LORA_ALPHA, QUICK_LORA_ALPHA = 16, 32, 16

# The linear layers of a transformer block: attention projections and the feed-forward pair.
LORA_TARGETS = ("W_query", "W_key", "W_value", "out_proj", "ff.layers.0", "ff.layers.2")
HEAD = "gpt.out_head"  # the classification head's name in a GPTClassifier


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}; pick one of those names")


def default_lr(method: str, *, quick: bool) -> float:
    """The default learning rate of ``method``: ``DEFAULT_LR[method]``, or ``QUICK_LR`` if quick."""
    _check_method(method)
    return QUICK_LR if quick else DEFAULT_LR[method]


def default_alpha(*, quick: bool) -> float:
    """LoRA's default alpha: ``LORA_ALPHA``, or ``QUICK_LORA_ALPHA`` when ``quick``."""
    return QUICK_LORA_ALPHA if quick else LORA_ALPHA


# --- choosing what to train --------------------------------------------------------------------


def prepare_model(
    model: GPTClassifier,
    method: str,
    *,
    rank: int = LORA_RANK,
    alpha: float = LORA_ALPHA,
    targets: tuple[str, ...] = LORA_TARGETS,
    dropout: float = 0.0,
) -> GPTClassifier:
    """Freeze and adapt ``model`` in place for ``method``; returns it.

    - ``"lora"``: the linear layers whose names end with one of ``targets`` (patterns as in
      :func:`~lora_tutorial.lora.replace_linear_with_lora`) become
      :class:`~lora_tutorial.lora.LinearWithLoRA` (rank, alpha); only the LoRA matrices and the
      new classification head are trained.
    - ``"full"``: every weight is trained.
    - ``"last-block"``: the last transformer block, the final norm and the head are trained.

    The head is always trained: it is new and starts from random weights.
    """
    _check_method(method)
    if method == "full":
        model.requires_grad_(True)
        return model
    if method == "last-block":
        model.requires_grad_(False)
        backbone = cast(GPTModel, model.gpt)
        for module in (backbone.trf_blocks[-1], backbone.final_norm, backbone.out_head):
            module.requires_grad_(True)
        return model
    if not targets:
        raise ValueError(
            "targets is empty: name at least one linear layer for LoRA, e.g. ('W_query', 'W_value')"
        )
    lora.replace_linear_with_lora(
        model, rank, alpha, include=list(targets), exclude=HEAD, dropout=dropout
    )
    lora.mark_only_lora_as_trainable(model, extra_modules=HEAD)
    return model


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that are trained, by name (what a run of a method changes)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer, by name: equal digests mean equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()
