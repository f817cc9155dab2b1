"""Low-rank arithmetic for chapter 1: SVD helpers, the best rank-r approximation and its error.

:mod:`lora_tutorial.counting` counts the numbers and bytes LoRA saves (chapter 2).

Conventions, shared with :mod:`lora_tutorial.lora`: a weight matrix ``W`` has shape
``(out_dim, in_dim)`` as in ``nn.Linear.weight``; its low-rank factors are stored as appendix E of
LLMs-from-scratch and ``lora.LoRALayer`` store them, ``A`` of shape ``(in_dim, rank)`` and ``B`` of
shape ``(rank, out_dim)``, so that the update of a batch of rows ``x`` is ``x @ A @ B`` and
``W`` is approximated by ``(A @ B).T``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator

import torch
from torch import Tensor

from lora_tutorial.runtime import rehearsal

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


# --------------------------------------------------------------- chapter 1's training loop


def training_steps(steps: int, *, desc: str, device: torch.device | str = "cpu") -> Iterator[int]:
    """``range(steps)`` with a progress bar, for chapter 1's small training loop.

    It times the steps; a rehearsal stops after two (see :mod:`lora_tutorial.runtime.rehearsal`).
    """
    return rehearsal.timed_steps(steps, desc=desc, device=device)
