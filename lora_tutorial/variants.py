"""Improvements of LoRA, each a few lines on top of :mod:`lora_tutorial.lora`.

- **rsLoRA** (Kalajdzievski, 2023): ``scaling = alpha / sqrt(rank)``; it is the ``use_rslora=True``
  option of every LoRA layer.
- **DoRA** (Liu et al., 2024): :class:`LinearWithDoRA` learns a magnitude per output unit and lets
  LoRA change only the direction of the weight rows.
- **LoRA+** (Hayou et al., 2024): :func:`create_loraplus_optimizer` gives B a larger learning rate.
- **PiSSA** (Meng et al., 2024): :class:`LinearWithPiSSA` starts A and B at the top singular
  vectors of the weight and freezes the rest.
- **VeRA** (Kopiczko et al., 2024): :class:`LinearWithVeRA` shares frozen random A and B between
  layers and trains two vectors per layer.
- **OLoRA** (Büyükakyüz, 2024) and **MiLoRA** (Wang et al., 2025): :func:`olora_init` and
  :func:`milora_init` start A and B from a QR decomposition or the smallest singular directions
  of the weight; :func:`linear_with_init` builds the layer.

QLoRA's layer is :class:`lora_tutorial.quantize.LinearWithQLoRA`. Every layer class is an
:class:`~lora_tutorial.lora.AdapterLayer`, so ``replace_linear_with_lora(model, rank, alpha,
wrapper=LinearWithDoRA)`` applies it. Chapter 7's one-layer experiments are in
:mod:`lora_tutorial.variants`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_tutorial.lora import (
    AdapterLayer,
    LinearWithLoRA,
    LoRALayer,
    Selector,
    adapter_layers,
    base_digest,
    check_alpha,
    check_rank_and_dropout,
    replace_linear_with_lora,
)
from lora_tutorial.runtime.checks import check_number, is_number

# --------------------------------------------------------------------------- a one-layer playground
# Chapter 7 compares every variant on one small task: a frozen layer, a target weight, and an
# adapter fitted to it, in seconds on a CPU.


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


__all__ = [
    "LinearWithDoRA",
    "LinearWithPiSSA",
    "LinearWithVeRA",
    "VeRAProjections",
    "create_loraplus_optimizer",
    "linear_with_init",
    "loraplus_param_groups",
    "milora_init",
    "olora_init",
    "replace_linear_with_vera",
    "share_vera_projections",
]

# ----------------------------------------------------------------------------- DoRA


class LinearWithDoRA(LinearWithLoRA):
    """DoRA: ``W' = m * V / ||V||`` with ``V = W0 + scaling * (A @ B)^T``, norms per output unit.

    Every row of the weight ``(out, in)`` is split into a length (``.m``, trainable, one entry per
    output unit, initialised to the row norms of ``W0``) and a direction (``V / ||V||``), which
    LoRA changes through ``.lora.A`` and ``.lora.B``. At initialisation B = 0, so ``V = W0``,
    ``m = ||W0||`` and the layer computes exactly what the base layer computed.

    As the paper suggests (section 4.3) and PEFT does, the forward pass treats ``||V||`` as a
    constant (``.detach()``): the output is still ``x W'^T + b``, but no gradient flows through the
    norm, which saves the memory of its backward pass. Our outputs and gradients therefore equal
    PEFT's ``use_dora=True``. One difference: with dropout, PEFT applies dropout to the input of the
    whole rescaled term; here dropout acts only on the LoRA branch, as in plain LoRA.
    """

    def __init__(
        self,
        linear: nn.Linear,
        rank: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(linear, rank, alpha, use_rslora=use_rslora, dropout=dropout)
        self.m = nn.Parameter(linear.weight.detach().norm(dim=1).clone())

    def weight_norm(self) -> Tensor:
        """``||V||`` per output unit, shape ``(out,)``, without gradient (1 for an all-zero row)."""
        with torch.no_grad():
            weight = self.linear.weight
            norm = (weight + self.delta_weight().to(weight.dtype)).norm(dim=1)
        return norm.masked_fill(norm == 0, 1.0)  # an all-zero row stays zero instead of NaN

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.merged_forward(x)
        scale = self.m / self.weight_norm()  # (out,): new length over current length
        out = scale * (F.linear(x, self.linear.weight) + self.lora(x))
        return out if self.linear.bias is None else out + self.linear.bias

    def updated_weight(self) -> Tensor:
        """DoRA's weight ``m * V / ||V||``: what ``merge`` computes."""
        weight = self.linear.weight
        direction = (weight + self.delta_weight().to(weight.dtype)) / self.weight_norm()[:, None]
        return self.m[:, None] * direction


# ----------------------------------------------------------------------------- PiSSA


class LinearWithPiSSA(LinearWithLoRA):
    """PiSSA: A and B start at the top ``rank`` singular directions of ``W0``; the rest is the base.

    With ``W0 = U S V^T`` (``W0`` of shape ``(out, in)``), ``sqrt(S_r / scaling)`` goes to each
    side, as PEFT's ``init_lora_weights="pissa"`` does::

        A = V_r sqrt(S_r / scaling)          (in, rank)
        B = sqrt(S_r / scaling) U_r^T        (rank, out)
        residual = W0 - scaling * (A @ B)^T  (the frozen base; the principal part now trains)

    so ``residual + scaling * (A @ B)^T == W0`` and the model is unchanged at initialisation (up
    to float rounding). The given ``linear`` is not modified: ``.linear`` becomes a new layer with
    the residual. Rebuilding from the same ``W0`` (as ``load_adapter`` does) gives the same
    residual, because ``U_r S_r V_r^T`` does not depend on the signs the SVD picks (up to rounding,
    which may differ between devices: so ``.source_digest`` records ``W0`` for adapter files).
    The rank cannot exceed ``min(in, out)``: there are no more singular directions.
    """

    def __init__(
        self,
        linear: nn.Linear,
        rank: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        dropout: float = 0.0,
    ) -> None:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if is_number(rank, integer=True) and rank > min(linear.in_features, linear.out_features):
            raise ValueError(
                f"rank must be at most min(in_dim, out_dim) = "
                f"{min(linear.in_features, linear.out_features)} for PiSSA, got {rank}: W0 has "
                "no more singular directions"
            )
        digest = base_digest(linear.state_dict())
        residual = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        residual = residual.to(device=linear.weight.device, dtype=linear.weight.dtype)
        super().__init__(residual, rank, alpha, use_rslora=use_rslora, dropout=dropout)  # checks
        weight = linear.weight.detach().float()
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        root = (S[:rank] / self.lora.scaling).sqrt()
        with torch.no_grad():
            self.lora.A.copy_(Vh[:rank].T * root)
            self.lora.B.copy_(root[:, None] * U[:, :rank].T)
            residual.weight.copy_(weight - self.delta_weight().float())
            if linear.bias is not None:
                residual.bias.copy_(linear.bias)
        residual.requires_grad_(linear.weight.requires_grad)
        self.source_digest = digest  # of W0 and bias: the base this adapter belongs to


# ----------------------------------------------------------------------------- VeRA


def vera_projections(in_dim: int, out_dim: int, rank: int, seed: int) -> tuple[Tensor, Tensor]:
    """The frozen random A ``(in_dim, rank)`` and B ``(rank, out_dim)`` that ``seed`` stands for.

    Kaiming-uniform like PEFT's VeRA: from one generator seeded with ``seed``, first A laid out as
    ``(rank, in_dim)``, then B as ``(out_dim, rank)``, each bounded by ``sqrt(6 / fan_in)``. So the
    matrices never need saving: the seed regenerates them.
    """
    generator = torch.Generator().manual_seed(seed)

    def draw(rows: int, cols: int) -> Tensor:
        bound = math.sqrt(6.0 / cols)
        return torch.empty(rows, cols).uniform_(-bound, bound, generator=generator)

    a = draw(rank, in_dim)
    b = draw(out_dim, rank)
    return a.T.contiguous(), b.T.contiguous()


class VeRAProjections(nn.Module):
    """Frozen random ``A (in, r)`` and ``B (r, out)`` as buffers, one module shared per shape.

    The buffers are not saved (``persistent=False``): the seed regenerates them. Because layers
    share the *module*, ``model.to(device)`` moves the one copy they all use.
    """

    A: Tensor
    B: Tensor

    def __init__(self, in_dim: int, out_dim: int, rank: int, seed: int) -> None:
        super().__init__()
        self.seed = seed
        a, b = vera_projections(in_dim, out_dim, rank, seed)
        self.register_buffer("A", a, persistent=False)
        self.register_buffer("B", b, persistent=False)


class LinearWithVeRA(AdapterLayer):
    """VeRA: ``linear(x) + b * ((x @ A * d) @ B)``; A, B frozen random; ``d``, ``b`` vectors train.

    ``b`` starts at zero (the layer equals the base at initialisation) and ``d`` at ``d_initial``,
    as in PEFT. One layer trains ``rank + out`` numbers where LoRA trains ``rank * (in + out)``.
    ``.projections`` holds A and B; :func:`share_vera_projections` makes layers of one shape use a
    single copy (PEFT instead slices one pair sized for the largest layer).
    """

    def __init__(
        self,
        linear: nn.Linear,
        rank: int,
        *,
        d_initial: float = 0.1,
        seed: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(linear, rank=rank, d_initial=d_initial, seed=seed, dropout=dropout)
        check_rank_and_dropout(rank, dropout)
        check_number("d_initial", d_initial, hint="PEFT uses 0.1")
        check_number("seed", seed, integer=True)
        self.rank = rank
        self.seed = seed
        in_dim, out_dim, weight = linear.in_features, linear.out_features, linear.weight
        projections = VeRAProjections(in_dim, out_dim, rank, seed)
        self.projections = projections.to(weight.device, weight.dtype)
        self.d = nn.Parameter(torch.full((rank,), float(d_initial)).to(weight.device, weight.dtype))
        self.b = nn.Parameter(torch.zeros(out_dim, device=weight.device, dtype=weight.dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.merged_forward(x)
        p = self.projections
        return self.linear(x) + self.b * ((self.dropout(x) @ p.A * self.d) @ p.B)

    def delta_weight(self) -> Tensor:
        p = self.projections
        return ((p.A * self.d) @ p.B * self.b).T


def share_vera_projections(model: nn.Module) -> int:
    """Make VeRA layers with equal shape, rank, seed, device and dtype use one projections module.

    Returns the number of distinct projection modules left. (Layers built one at a time, as
    ``load_adapter`` builds them, hold equal but separate copies until this is called.)
    """
    shared: dict[tuple, VeRAProjections] = {}
    for layer in adapter_layers(model).values():
        if isinstance(layer, LinearWithVeRA):
            A, B = layer.projections.A, layer.projections.B
            key = (tuple(A.shape), tuple(B.shape), layer.seed, A.device, A.dtype)
            layer.projections = shared.setdefault(key, layer.projections)
    return len(shared)


def replace_linear_with_vera(
    model: nn.Module,
    rank: int,
    *,
    include: Selector = None,
    exclude: Selector = None,
    d_initial: float = 0.1,
    seed: int = 0,
    dropout: float = 0.0,
) -> nn.Module:
    """Wrap the chosen linear layers with :class:`LinearWithVeRA`, one A, B per shape; return model.

    ``include`` / ``exclude`` work as in :func:`~lora_tutorial.lora.replace_linear_with_lora`.
    VeRA has no ``alpha``: the trainable vectors set the scale.
    """

    def wrap(
        linear: nn.Linear, rank: int, alpha: float, *, use_rslora: bool, dropout: float
    ) -> LinearWithVeRA:
        return LinearWithVeRA(linear, rank, d_initial=d_initial, seed=seed, dropout=dropout)

    replace_linear_with_lora(
        model, rank, 1.0, include=include, exclude=exclude, dropout=dropout, wrapper=wrap
    )
    share_vera_projections(model)
    return model


# ----------------------------------------------------------------------------- LoRA+


def loraplus_param_groups(
    model: nn.Module, lr: float, lr_ratio: float = 16.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Parameter groups for LoRA+: every LoRA ``B`` learns ``lr_ratio`` times faster than the rest.

    The paper's scaling argument concerns B, whose learning rate should exceed A's in wide models.
    Like PEFT's ``create_loraplus_optimizer`` (adapted from the authors' code), trainable
    vectors (biases, norms, DoRA magnitudes, VeRA's d and b) also get ``lr * lr_ratio``; they get no
    weight decay. Everything else trainable (A, a new head's weight) gets ``lr``. Frozen parameters
    are left out; empty groups are dropped.
    """
    for name, value in (("lr", lr), ("lr_ratio", lr_ratio)):
        check_number(name, value, above=0, hint="LoRA+ suggests lr_ratio=16")
    b_ids = {id(m.B) for m in model.modules() if isinstance(m, LoRALayer)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    bs = [p for p in trainable if id(p) in b_ids]
    vectors = [p for p in trainable if id(p) not in b_ids and p.ndim == 1]
    matrices = [p for p in trainable if id(p) not in b_ids and p.ndim != 1]
    groups = [
        {"params": matrices, "lr": lr, "weight_decay": weight_decay},
        {"params": bs, "lr": lr * lr_ratio, "weight_decay": weight_decay},
        {"params": vectors, "lr": lr * lr_ratio, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(
            "no parameter requires a gradient; call mark_only_lora_as_trainable(model) first"
        )
    return groups


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    lr: float,
    lr_ratio: float = 16.0,
    weight_decay: float = 0.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer (AdamW by default) over :func:`loraplus_param_groups`; ``kwargs`` go to it."""
    return optimizer_cls(loraplus_param_groups(model, lr, lr_ratio, weight_decay), lr=lr, **kwargs)


# ----------------------------------------------------------------------------- OLoRA and MiLoRA
# Two initialisations from 2024 that, like PiSSA, move part of W0 into A and B and freeze the rest.
# Each is a function returning (A, B, residual); :func:`linear_with_init` builds the layer.

Init = Callable[..., tuple[Tensor, Tensor, Tensor]]


def _init_scaling(linear: nn.Linear, rank: int, alpha: float, use_rslora: bool) -> float:
    """Check the arguments of an initialisation and return its ``scaling`` (as ``LoRALayer``)."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    check_rank_and_dropout(rank, 0.0)
    check_alpha(alpha)
    if rank > min(linear.in_features, linear.out_features):
        raise ValueError(
            f"rank={rank} exceeds min(in, out) = {min(linear.in_features, linear.out_features)}: "
            "a decomposition of W0 has no more directions to give; choose a smaller rank"
        )
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank  # s, as in LoRALayer


def olora_init(
    linear: nn.Linear, rank: int, alpha: float, *, use_rslora: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """OLoRA's start: ``A (in, rank)``, ``B (rank, out)`` and the frozen residual ``(out, in)``.

    With the QR decomposition ``W0 = Q R`` (Q orthonormal columns, R upper triangular), B is the
    first ``rank`` columns of Q (transposed: its rows are orthonormal) and A the first ``rank`` rows
    of R (transposed). Neither is rescaled, so the adapter starts at ``scaling * Q_r R_r`` and the
    residual ``W0 - scaling * (A @ B)^T`` makes the layer equal the base at the start, as PEFT's
    ``init_lora_weights="olora"`` does (``Q_r R_r`` is W0's first ``rank`` columns' part, not the
    best rank-r approximation that PiSSA takes).
    """
    scaling = _init_scaling(linear, rank, alpha, use_rslora)
    weight = linear.weight.detach().float()
    Q, R = torch.linalg.qr(weight)  # Q (out, k), R (k, in), k = min(out, in)
    A, B = R[:rank].T.contiguous(), Q[:, :rank].T.contiguous()
    return A, B, weight - scaling * (A @ B).T


def milora_init(
    linear: nn.Linear, rank: int, alpha: float, *, use_rslora: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """MiLoRA's start: PiSSA with the ``rank`` *smallest* singular directions of ``W0``.

    With ``W0 = U S V^T``, the minor part ``U_r S_r V_r^T`` (the last ``rank`` singular triplets)
    goes into the adapter, ``sqrt(S_r / scaling)`` to each side, and the principal part stays
    frozen in the residual; ``residual + scaling * (A @ B)^T == W0``. The adapter starts small, in
    the directions the pretrained weight uses least.
    """
    scaling = _init_scaling(linear, rank, alpha, use_rslora)
    weight = linear.weight.detach().float()
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    root = (S[-rank:] / scaling).sqrt()
    A = Vh[-rank:].T * root  # (in, rank)
    B = root[:, None] * U[:, -rank:].T  # (rank, out)
    return A, B, weight - scaling * (A @ B).T


def linear_with_init(
    linear: nn.Linear, rank: int, alpha: float, init: Init, *, use_rslora: bool = False
) -> LinearWithLoRA:
    """A ``LinearWithLoRA`` started by ``init`` (:func:`olora_init`, :func:`milora_init`).

    As in :class:`LinearWithPiSSA`, ``linear`` is not modified: ``.linear`` becomes a new layer
    holding the residual (and ``linear``'s bias). The result is a plain LoRA layer on that residual
    base, so it trains, merges and saves as one; a saved adapter loads only onto the residual base.
    """
    A, B, residual_weight = init(linear, rank, alpha, use_rslora=use_rslora)
    weight = linear.weight
    residual = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    residual = residual.to(device=weight.device, dtype=weight.dtype)
    layer = LinearWithLoRA(residual, rank, alpha, use_rslora=use_rslora)
    with torch.no_grad():
        residual.weight.copy_(residual_weight)
        if linear.bias is not None:
            residual.bias.copy_(linear.bias)
        layer.lora.A.copy_(A)
        layer.lora.B.copy_(B)
    residual.requires_grad_(weight.requires_grad)
    return layer
