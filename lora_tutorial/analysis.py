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
- :func:`intruder_dimensions` and :func:`intruder_counts`: singular vectors of a fine-tuned weight
  that resemble none of the pretrained weight's ("LoRA vs full fine-tuning: an illusion of
  equivalence", Shuttleworth et al., 2024, arXiv:2410.21228).
- :func:`similarity_structure`: how well two sets of sentence embeddings agree on which sentences
  are alike (Spearman correlation of their pairwise cosine similarities).
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


# --------------------------------------------------------------------------- intruder dimensions


def max_cosines(W0: Tensor, W: Tensor, k: int = 10) -> Tensor:
    """For each of the top ``k`` left singular vectors of ``W``, its largest ``|cos|`` with W0's.

    Singular vectors are unit vectors, so the cosine of two of them is their dot product; its sign
    is arbitrary (``u`` and ``-u`` are the same direction), hence the absolute value. Returns
    ``(k,)`` values in ``[0, 1]``, in order of ``W``'s singular values (largest first).
    """
    if W0.dim() != 2 or W0.shape != W.shape:
        raise ValueError(
            f"W0 has shape {tuple(W0.shape)} and W {tuple(W.shape)}: give two matrices of one "
            "shape (a layer's weight before and after fine-tuning)"
        )
    if type(k) is not int or not 1 <= k <= min(W.shape):
        raise ValueError(f"k={k!r}: give a whole number from 1 to {min(W.shape)}")
    U0 = torch.linalg.svd(W0.double(), full_matrices=False)[0]  # (out, min(out, in))
    U = torch.linalg.svd(W.double(), full_matrices=False)[0][:, :k]  # the top k, by σ
    return (U.T @ U0).abs().max(dim=1).values.float()


def intruder_dimensions(W0: Tensor, W: Tensor, k: int = 10, eps: float = 0.5) -> int:
    """How many of ``W``'s top ``k`` singular vectors have ``|cosine| < eps`` with all of W0's.

    Shuttleworth et al. (2024) call such a direction an *intruder dimension*: fine-tuning put a
    large singular value on a direction the pretrained weight did not have. They found them after
    LoRA and hardly ever after full fine-tuning (their defaults here: ``k`` = 10, ``eps`` = 0.5).
    """
    if not 0 < eps <= 1:
        raise ValueError(f"eps={eps!r}: give a cosine threshold in (0, 1], e.g. 0.5")
    return int((max_cosines(W0, W, k) < eps).sum())


def intruder_counts(
    updates: Iterable[WeightUpdate], k: int = 10, eps: float = 0.5
) -> dict[str, int]:
    """:func:`intruder_dimensions` of every layer in ``updates`` (``W = W0 + delta``), by name."""
    return {u.name: intruder_dimensions(u.W0, u.W0 + u.delta, k, eps) for u in updates}


# --------------------------------------------------------------------------- similarity structure


def _ranks(x: Tensor) -> Tensor:
    """The rank of each value of a 1-d tensor (ties share their mean rank), from 0."""
    order = x.argsort()
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    values, counts = x.unique(return_counts=True)
    for value in values[counts > 1]:
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's rank correlation of two 1-d tensors: Pearson's correlation of their ranks."""
    if x.dim() != 1 or x.shape != y.shape or len(x) < 2:
        raise ValueError("give two 1-d tensors of one length, at least 2")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float(rx.norm() * ry.norm())
    if denominator == 0:
        raise ValueError("one input is constant: its ranks carry no order to correlate")
    return float(rx @ ry) / denominator


def similarity_structure(before: Tensor, after: Tensor) -> float:
    """Spearman correlation of the pairwise cosine similarities of two embeddings of the same texts.

    ``before`` and ``after`` are ``(n, dim)`` (one row per text). 1 means that the model after
    fine-tuning still orders every pair of texts by similarity exactly as before.
    """
    if before.dim() != 2 or before.shape[0] != after.shape[0] or before.shape[0] < 3:
        raise ValueError(
            f"shapes {tuple(before.shape)} and {tuple(after.shape)}: give (n, dim) embeddings of "
            "the same n >= 3 texts"
        )

    def pairs(e: Tensor) -> Tensor:
        e = F.normalize(e.double(), dim=-1)
        i, j = torch.triu_indices(len(e), len(e), offset=1)
        return (e @ e.T)[i, j]

    return spearman(pairs(before), pairs(after))


__all__ = [
    "Amplification",
    "WeightUpdate",
    "held_out_token_ids",
    "intruder_counts",
    "intruder_dimensions",
    "language_model_loss",
    "max_cosines",
    "similarity_structure",
    "spearman",
    "subspace_amplification",
    "update_directions",
    "weight_updates",
]
