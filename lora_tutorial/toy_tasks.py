"""Chapter 7's one-layer playground: a frozen layer, a target weight, and an adapter fitted to it.

:func:`low_rank_task` draws a frozen "pretrained" layer and a target for it; :func:`fit_target`
trains any adapter layer to imitate the target; :func:`fit_random_update` is the rank sweep of the
rsLoRA experiment. Small enough to run in seconds on a CPU, so every variant can be compared
on the same task with the same data.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_tutorial.lora import AdapterLayer, LinearWithLoRA

__all__ = ["fit_random_update", "fit_target", "low_rank_task"]


def low_rank_task(dim: int = 128, decay: float = 0.97, seed: int = 0) -> tuple[nn.Linear, Tensor]:
    """A frozen "pretrained" layer and a target weight for it to learn, both drawn from ``seed``.

    The base weight ``W0`` is a random ``dim x dim`` matrix; the target is
    ``W0 + U diag(decay**i) V^T`` with random orthogonal U and V: a full-rank change whose singular
    values fall off geometrically, so every extra rank captures a little more of it.
    """
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
    u, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    v, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    base = nn.Linear(dim, dim, bias=False)
    with torch.no_grad():
        base.weight.copy_(w0)
    base.requires_grad_(False)
    return base, w0 + (u * decay ** torch.arange(dim, dtype=torch.float32)) @ v.T


def fit_target(
    layer: AdapterLayer,
    target: Tensor,
    *,
    steps: int = 150,
    lr: float = 2e-3,
    batch_size: int = 64,
    optimizer: torch.optim.Optimizer | None = None,
    seed: int = 0,
) -> list[float]:
    """Train ``layer``'s adapter so that ``layer(x)`` imitates ``x @ target.T``; return the losses.

    Inputs are standard normal, drawn from ``seed`` on the CPU (so runs that differ only in the
    layer see the same data, on any device) and moved to ``target``'s device. The optimizer
    defaults to Adam over ``layer.adapter_parameters()`` with ``lr``.
    """
    g = torch.Generator().manual_seed(seed)
    if optimizer is None:
        optimizer = torch.optim.Adam(layer.adapter_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        x = torch.randn(batch_size, target.shape[1], generator=g).to(target.device)
        loss = F.mse_loss(layer(x), x @ target.T)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def fit_random_update(
    rank: int,
    *,
    use_rslora: bool,
    alpha: float = 8.0,
    dim: int = 128,
    steps: int = 150,
    lr: float = 2e-3,
    seed: int = 0,
) -> list[float]:
    """The rsLoRA experiment: a LoRA layer of ``rank`` fits :func:`low_rank_task`; returns losses.

    Everything is seeded by ``seed``; only the rank and the scaling rule change between runs. With
    ``alpha / rank`` the update learns more slowly as the rank grows; with ``alpha / sqrt(rank)``
    (rsLoRA) it does not.
    """
    base, target = low_rank_task(dim, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = LinearWithLoRA(base, rank, alpha, use_rslora=use_rslora)
    return fit_target(layer, target, steps=steps, lr=lr, seed=seed)
