"""What fine-tuning changed in a model: what it forgot, and what its weight update looks like.

- :func:`language_model_loss`: the next-token loss of a GPT backbone on held-out text, read through
  a given vocabulary head (the pretrained one), so that a classifier's backbone can be asked how
  much of its language modelling survived fine-tuning ("LoRA learns less and forgets less",
  Biderman et al., 2024, arXiv:2405.09673).
- :func:`weight_updates`: each adapted layer's ``ΔW`` and ``W0``, from a LoRA model or from a
  fully fine-tuned copy and its base.
- :func:`subspace_amplification`: how strongly ``ΔW`` amplifies directions that ``W0`` hardly uses
  (Hu et al., 2021, §7): ``‖ΔW‖_F / ‖U_rᵀ W0 V_r‖_F`` with ``U_r, V_r`` the top ``r`` singular
  directions of ``ΔW``, beside the same projection for ``W0``'s own top directions and random ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_tutorial import lowrank
from lora_tutorial.gpt import GPTModel
from lora_tutorial.lora import AdapterLayer, adapter_layers
from lora_tutorial.runtime import rehearsal


@torch.no_grad()
def language_model_loss(
    backbone: GPTModel,
    head_weight: Tensor,
    token_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
) -> float:
    """Mean next-token cross-entropy (nats per token) of ``backbone`` on ``token_ids``.

    ``backbone`` is a :class:`~lora_tutorial.gpt.GPTModel` (a classifier's is ``classifier.gpt``);
    its logits are ``hidden_states @ head_weight.T``, so a classifier's backbone can be scored with
    the pretrained vocabulary head (``head_weight``: ``(vocab, emb_dim)``). Each text is cut to
    ``max_length`` tokens (default: the model's context length); padding is not scored.
    """
    texts = [list(ids) for ids in token_ids if len(ids) >= 2]
    if not texts:
        raise ValueError("no text with at least two tokens to score; give longer texts")
    limit = int(max_length or backbone.pos_emb.num_embeddings)
    device = head_weight.device
    was_training = backbone.training
    backbone.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(texts), batch_size):
            chunk = [ids[:limit] for ids in texts[start : start + batch_size]]
            width = max(len(ids) for ids in chunk)
            batch = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.bool)
            for row, ids in enumerate(chunk):
                batch[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = True
            batch, mask = batch.to(device), mask.to(device)
            logits = backbone.hidden_states(batch).float() @ head_weight.float().T
            losses = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                batch[:, 1:].reshape(-1),
                reduction="none",
            )
            scored = mask[:, 1:].reshape(-1)
            total += losses[scored].sum().item()
            count += int(scored.sum())
    finally:
        backbone.train(was_training)
    return total / count


@dataclass
class WeightUpdate:
    """One layer's base weight ``W0`` and the update ``delta`` fine-tuning added, ``(out, in)``."""

    name: str
    W0: Tensor
    delta: Tensor


def _strip(name: str, prefixes: Iterable[str]) -> str:
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


@torch.no_grad()
def weight_updates(
    model: nn.Module, base: nn.Module | None = None, *, include: Iterable[str] = ()
) -> list[WeightUpdate]:
    """``ΔW`` and ``W0`` of every adapted layer of ``model``, or of every changed linear layer.

    With LoRA layers in ``model`` (and ``base`` None) each layer's ``delta_weight()`` and frozen
    weight are returned. With ``base`` given, ``model`` is a fully fine-tuned copy of ``base``:
    every ``nn.Linear`` whose name ends with one of ``include`` (all when empty) gives
    ``model weight - base weight``.
    """
    patterns = tuple(include)

    def chosen(name: str) -> bool:
        return not patterns or any(name == p or name.endswith("." + p) for p in patterns)

    if base is None:
        layers = adapter_layers(model)
        if not layers:
            raise ValueError(
                "model has no adapter layers; pass its base model too (full fine-tuning)"
            )
        return [
            WeightUpdate(
                name,
                layer.linear.weight.detach().float().cpu(),
                layer.delta_weight().detach().float().cpu(),
            )
            for name, layer in layers.items()
            if chosen(name)
        ]
    base_linears = {n: m for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    updates = []
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            raise ValueError(f"{name} is an adapter layer: call weight_updates(model) without base")
        if isinstance(module, nn.Linear) and chosen(name) and name in base_linears:
            W0 = base_linears[name].weight.detach().float().cpu()
            updates.append(WeightUpdate(name, W0, module.weight.detach().float().cpu() - W0))
    if not updates:
        raise ValueError(f"no linear layer of model matched include={patterns!r}")
    return updates


@dataclass
class Amplification:
    """Hu et al.'s §7 numbers for one layer (all Frobenius norms)."""

    name: str
    rank: int
    delta_norm: float  # ‖ΔW‖
    w0_in_delta_directions: float  # ‖U_rᵀ W0 V_r‖, U_r, V_r: ΔW's top-r singular vectors
    w0_in_own_directions: float  # ‖U_rᵀ W0 V_r‖ with W0's own top-r singular vectors
    w0_in_random_directions: float  # the same with random orthonormal directions

    @property
    def factor(self) -> float:
        """``‖ΔW‖ / ‖U_rᵀ W0 V_r‖``: how much ΔW amplifies the directions it chose."""
        return self.delta_norm / self.w0_in_delta_directions


def _projected_norm(W: Tensor, U: Tensor, V: Tensor) -> float:
    return float(torch.linalg.matrix_norm(U.T @ W @ V))


def subspace_amplification(update: WeightUpdate, rank: int, *, seed: int = 0) -> Amplification:
    """Compare ``ΔW``'s top-``rank`` directions with ``W0``'s (see the module docstring)."""
    W0, delta = update.W0.double(), update.delta.double()
    rank = min(rank, *W0.shape)
    U_d, _, Vh_d = torch.linalg.svd(delta, full_matrices=False)
    U_w, _, Vh_w = torch.linalg.svd(W0, full_matrices=False)
    g = torch.Generator().manual_seed(seed)
    U_r = torch.linalg.qr(torch.randn(W0.shape[0], rank, generator=g, dtype=W0.dtype))[0]
    V_r = torch.linalg.qr(torch.randn(W0.shape[1], rank, generator=g, dtype=W0.dtype))[0]
    return Amplification(
        name=update.name,
        rank=rank,
        delta_norm=float(torch.linalg.matrix_norm(delta)),
        w0_in_delta_directions=_projected_norm(W0, U_d[:, :rank], Vh_d[:rank].T),
        w0_in_own_directions=_projected_norm(W0, U_w[:, :rank], Vh_w[:rank].T),
        w0_in_random_directions=_projected_norm(W0, U_r, V_r),
    )


# --------------------------------------------------------------------------- chapter 8's tables


def held_out_token_ids(texts: Iterable[str], encode: Callable[[str], list[int]]) -> list[list[int]]:
    """``encode(text)`` of every text, to score with :func:`language_model_loss`.

    A rehearsal, which only proves the code runs, keeps the first two texts.
    """
    return [encode(text) for text in rehearsal.capped(texts)]


def update_directions(
    method: str, updates: Iterable[WeightUpdate], rank: int, *, rehearsal_layers: int = 6
) -> list[dict[str, object]]:
    """One row per layer: how many directions hold 90 % of ``ΔW`` and Hu et al.'s §7 numbers.

    A rehearsal keeps the first ``rehearsal_layers`` layers (a GPT block has six linear ones).
    """
    rows: list[dict[str, object]] = []
    for update in rehearsal.capped(updates, rehearsal_layers):
        amp = subspace_amplification(update, rank)
        rows.append(
            {
                "method": method,
                "layer": update.name.split(".", 3)[-1],
                "rank for 90% of ΔW": lowrank.rank_for_energy(
                    lowrank.singular_values(update.delta), 0.9
                ),
                "‖W0‖ on ΔW's directions": amp.w0_in_delta_directions,
                "on W0's own": amp.w0_in_own_directions,
                "on random": amp.w0_in_random_directions,
                "amplification": amp.factor,
            }
        )
    return rows


__all__ = [
    "Amplification",
    "WeightUpdate",
    "held_out_token_ids",
    "language_model_loss",
    "subspace_amplification",
    "update_directions",
    "weight_updates",
]
