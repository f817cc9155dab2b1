"""Low-rank arithmetic: SVD helpers, the best rank-r approximation, and parameter and memory counts.

Chapter 1 uses the first half (singular values, Eckart-Young truncation and its error), chapter 2
the second half (how many numbers LoRA trains and stores, how many bytes training keeps);
:mod:`lora_tutorial.memory` measures a training step to hold those predictions against.

Conventions, shared with :mod:`lora_tutorial.lora`: a weight matrix ``W`` has shape
``(out_dim, in_dim)`` as in ``nn.Linear.weight``; its low-rank factors are stored as appendix E of
LLMs-from-scratch and ``lora.LoRALayer`` store them, ``A`` of shape ``(in_dim, rank)`` and ``B`` of
shape ``(rank, out_dim)``, so that the update of a batch of rows ``x`` is ``x @ A @ B`` and
``W`` is approximated by ``(A @ B).T``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

# --------------------------------------------------------------------------- SVD helpers


def _as_matrix(W: Tensor) -> Tensor:
    if not isinstance(W, Tensor):
        raise TypeError(
            f"expected a torch.Tensor, got {type(W).__name__}; wrap it with torch.as_tensor(...)"
        )
    if W.ndim != 2:
        raise ValueError(
            f"expected a 2-D matrix, got a tensor of shape {tuple(W.shape)}; "
            "reshape it to (rows, cols)"
        )
    return W.detach().to(torch.float64 if W.dtype == torch.float64 else torch.float32)


def _check_kept(r: int, max_rank: int) -> None:
    """``r`` singular values kept: a whole number from 0 (keep none) to ``max_rank``.

    Unlike a LoRA rank (at least 1), 0 is allowed here: the rank-0 approximation is the zero matrix.
    """
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 0:
        raise ValueError(
            f"r (singular values kept) must be a non-negative integer, got {r!r}; "
            f"use a whole number from 0 to {max_rank}"
        )
    if r > max_rank:
        raise ValueError(
            f"r={r} is larger than min(rows, cols) = {max_rank}; keep at most {max_rank} values"
        )


def singular_values(W: Tensor) -> Tensor:
    """The singular values of ``W``, largest first (a 1-D tensor of length ``min(W.shape)``)."""
    return torch.linalg.svdvals(_as_matrix(W))


def numerical_rank(W: Tensor, rtol: float | None = None) -> int:
    """The number of singular values above ``rtol * largest`` (NumPy's default ``rtol`` if None)."""
    s = singular_values(W)
    if s.numel() == 0 or s[0] == 0:
        return 0
    if rtol is None:
        rtol = max(W.shape) * torch.finfo(s.dtype).eps
    return int((s > rtol * s[0]).sum())


def low_rank_factors(W: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Factors ``A (in_dim, r)`` and ``B (r, out_dim)`` of the best rank-``r`` approximation of W.

    ``W`` is ``(out_dim, in_dim)`` like ``nn.Linear.weight``; the approximation is ``(A @ B).T``,
    the layout of a LoRA adapter (``x @ A @ B``). The singular values are split evenly:
    ``A = V_r sqrt(S_r)`` and ``B = sqrt(S_r) U_r^T``.
    """
    M = _as_matrix(W)
    _check_kept(r, min(M.shape))
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = S[:r].sqrt()
    return Vh[:r].T * root, root[:, None] * U[:, :r].T


def best_rank_r(W: Tensor, r: int) -> Tensor:
    """The best rank-``r`` approximation of ``W`` (Eckart-Young): r largest singular values."""
    A, B = low_rank_factors(W, r)
    return (A @ B).T


def rank_r_error(W: Tensor, r: int, norm: str = "fro") -> float:
    """The error ``||W - best_rank_r(W, r)||``, predicted by Eckart-Young from the singular values.

    Frobenius norm: ``sqrt(s_{r+1}^2 + s_{r+2}^2 + ...)``; spectral norm (``"2"``): ``s_{r+1}``.
    """
    s = singular_values(W)
    _check_kept(r, s.numel())
    tail = s[r:]
    if norm == "fro":
        return float(tail.square().sum().sqrt())
    if norm == "2":
        return float(tail[0]) if tail.numel() else 0.0
    raise ValueError(f"norm must be 'fro' or '2', got {norm!r}")


def _energy_shares(s: Tensor) -> Tensor:
    """``shares[k]``: the share of ``sum(s**2)`` held by the ``k + 1`` largest singular values."""
    energy = torch.as_tensor(s, dtype=torch.float64).square()
    total = energy.sum()
    if total == 0:
        raise ValueError(
            "all singular values are zero: a zero matrix has no energy to share; "
            "pass the singular values of a nonzero matrix"
        )
    return energy.cumsum(0) / total


def energy_captured(s: Tensor, r: int) -> float:
    """The share of ``sum(s**2)`` (the squared Frobenius norm) held by the ``r`` largest values."""
    s = torch.as_tensor(s, dtype=torch.float64)
    _check_kept(r, s.numel())
    shares = _energy_shares(s)
    return float(shares[r - 1]) if r else 0.0


def rank_for_energy(s: Tensor, fraction: float) -> int:
    """The smallest rank whose singular values hold ``fraction`` of the energy (0 < fraction <= 1).

    The energy is ``sum(s**2)``, as in :func:`energy_captured`.
    """
    if not 0 < fraction <= 1:
        raise ValueError(
            f"fraction must be in (0, 1], got {fraction!r}; e.g. 0.9 for 90% of the energy"
        )
    return int((_energy_shares(s) < fraction - 1e-12).sum()) + 1


def random_like(W: Tensor, *, seed: int = 0) -> Tensor:
    """A Gaussian matrix of ``W``'s shape and Frobenius norm: the baseline without structure."""
    M = _as_matrix(W)
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(M.shape, generator=g, dtype=M.dtype).to(M.device)
    return R * (torch.linalg.matrix_norm(M) / torch.linalg.matrix_norm(R))


# --------------------------------------------------------------------------- parameter counts


def _check_dims(**dims: int) -> None:
    for name, value in dims.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(
                f"{name} must be a positive integer, got {value!r}; "
                "pass a whole number of at least 1"
            )


def full_param_count(in_dim: int, out_dim: int) -> int:
    """Numbers in a dense ``(out_dim, in_dim)`` weight: what full fine-tuning trains."""
    _check_dims(in_dim=in_dim, out_dim=out_dim)
    return in_dim * out_dim


def lora_param_count(in_dim: int, out_dim: int, rank: int) -> int:
    """Numbers in a LoRA adapter for that weight: ``rank * (in_dim + out_dim)`` (A plus B)."""
    _check_dims(in_dim=in_dim, out_dim=out_dim, rank=rank)
    return rank * (in_dim + out_dim)


@dataclass(frozen=True)
class LinearShape:
    """One ``nn.Linear`` of a model: name (as in ``named_modules``), sizes, whether it has bias."""

    name: str
    in_dim: int
    out_dim: int
    bias: bool


def gpt_linear_shapes(cfg: Mapping, num_classes: int | None = None) -> list[LinearShape]:
    """Every linear layer of ``gpt.GPTModel(cfg)``, named as in the model, without building it.

    ``num_classes`` replaces the vocabulary output head by a classification head (with a bias,
    as ``nn.Linear`` has by default), as the spam classifier does.
    """
    d, n_layers, qkv_bias = cfg["emb_dim"], cfg["n_layers"], bool(cfg["qkv_bias"])
    shapes = []
    for i in range(n_layers):
        block = f"trf_blocks.{i}"
        for proj in ("W_query", "W_key", "W_value"):
            shapes.append(LinearShape(f"{block}.att.{proj}", d, d, qkv_bias))
        shapes.append(LinearShape(f"{block}.att.out_proj", d, d, True))
        shapes.append(LinearShape(f"{block}.ff.layers.0", d, 4 * d, True))
        shapes.append(LinearShape(f"{block}.ff.layers.2", 4 * d, d, True))
    if num_classes is None:
        shapes.append(LinearShape("out_head", d, cfg["vocab_size"], False))
    else:
        shapes.append(LinearShape("out_head", d, num_classes, True))
    return shapes


def gpt_param_count(cfg: Mapping, num_classes: int | None = None, *, tied_head: bool = True) -> int:
    """All parameters of ``gpt.GPTModel(cfg)`` (embeddings, blocks, norms, head), unbuilt.

    GPT-2's vocabulary head shares its weight with the token embedding (``tied_head=True``, as
    ``GPTModel`` does), so it adds nothing; ``tied_head=False`` counts it separately, as untied
    implementations do. A classification head (``num_classes``) is always a separate layer.
    """
    d = cfg["emb_dim"]
    embeddings = (cfg["vocab_size"] + cfg["context_length"]) * d
    norms = (
        (2 * cfg["n_layers"] + 1) * 2 * d
    )  # two LayerNorms per block plus the final one; scale and shift
    shapes = gpt_linear_shapes(cfg, num_classes)
    if num_classes is None and tied_head:
        shapes = [s for s in shapes if s.name != "out_head"]
    linears = sum(s.in_dim * s.out_dim + (s.out_dim if s.bias else 0) for s in shapes)
    return embeddings + norms + linears


def lora_params_for(
    shapes: Iterable[LinearShape], rank: int, select: Callable[[str], bool] | None = None
) -> int:
    """LoRA parameters for the layers in ``shapes`` whose name passes ``select`` (all when None)."""
    return sum(
        lora_param_count(s.in_dim, s.out_dim, rank)
        for s in shapes
        if select is None or select(s.name)
    )


# --------------------------------------------------------------------------- bytes

_NAMED_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
}


def bytes_per_param(dtype: torch.dtype | str) -> int:
    """Bytes one number takes in ``dtype`` (a torch dtype or a name such as ``"bfloat16"``)."""
    if isinstance(dtype, str):
        if dtype not in _NAMED_DTYPES:
            raise ValueError(
                f"unknown dtype name {dtype!r}; use one of {sorted(_NAMED_DTYPES)} or a torch.dtype"
            )
        dtype = _NAMED_DTYPES[dtype]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or a name, got {type(dtype).__name__}")
    return torch.empty((), dtype=dtype).element_size()


def adapter_bytes(n_params: int, dtype: torch.dtype | str = torch.float32) -> int:
    """Bytes of ``n_params`` adapter weights on disk or in memory (file headers not included)."""
    return n_params * bytes_per_param(dtype)


def adamw_state_bytes(n_trainable: int, dtype: torch.dtype | str = torch.float32) -> int:
    """Bytes of AdamW's state: two running averages (first and second moment) per trained number."""
    return 2 * n_trainable * bytes_per_param(dtype)


@dataclass(frozen=True)
class TrainingStateBytes:
    """Bytes that training keeps for the whole run, apart from activations."""

    weights: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def training_state_bytes(
    n_total: int, n_trainable: int, dtype: torch.dtype | str = torch.float32
) -> TrainingStateBytes:
    """Predicted bytes of weights (all), gradients (trained only) and AdamW state (trained only)."""
    if not 0 <= n_trainable <= n_total:
        raise ValueError(
            f"need 0 <= n_trainable <= n_total, got n_trainable={n_trainable}, n_total={n_total}"
        )
    size = bytes_per_param(dtype)
    return TrainingStateBytes(
        n_total * size, n_trainable * size, adamw_state_bytes(n_trainable, dtype)
    )


def megabytes(n_bytes: float) -> float:
    """Bytes as megabytes (10**6 bytes, the unit papers and file browsers use), for tables."""
    return n_bytes / 1e6


def gigabytes(n_bytes: float) -> float:
    """Bytes as gigabytes (10**9 bytes), for tables."""
    return n_bytes / 1e9


__all__ = [
    "LinearShape",
    "TrainingStateBytes",
    "adamw_state_bytes",
    "adapter_bytes",
    "best_rank_r",
    "bytes_per_param",
    "energy_captured",
    "full_param_count",
    "gigabytes",
    "gpt_linear_shapes",
    "gpt_param_count",
    "lora_param_count",
    "lora_params_for",
    "low_rank_factors",
    "megabytes",
    "numerical_rank",
    "random_like",
    "rank_for_energy",
    "rank_r_error",
    "singular_values",
    "training_state_bytes",
]
