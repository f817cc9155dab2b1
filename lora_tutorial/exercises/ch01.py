"""Checks for chapter 1's coding exercises: the best rank-r approximation and its error."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_tutorial import lowrank
from lora_tutorial.exercises._feedback import (
    Check,
    Verdict,
    call,
    describe,
    near,
    number,
    outcomes,
    tensor,
)

# (rows, cols, rank) cases: square, tall and wide matrices, the extremes r = 1 and r = full.
_CASES = [(6, 6, 2), (8, 5, 1), (4, 7, 3), (5, 3, 3)]


def _matrices() -> list[tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(m, n, generator=g), r) for m, n, r in _CASES]


def _diagnose(W: torch.Tensor, r: int, out: torch.Tensor) -> str:
    """Name the slip behind a wrong rank-r approximation, when it is one of the common ones."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # W's dtype: the signs a learner gets
    no_values = U[:, :r] @ Vh[:r, :]
    columns_of_vh = U[:, :r] @ torch.diag(S[:r]) @ Vh[:, :r].T
    smallest = U[:, -r:] @ torch.diag(S[-r:]) @ Vh[-r:, :]
    slips = {
        "multiply by the singular values: U[:, :r] @ diag(S[:r]) @ Vh[:r, :]": no_values,
        "take the first r ROWS of Vh (Vh[:r, :]), not its first r columns": columns_of_vh,
        "keep the r LARGEST singular values; svd sorts them largest first": smallest,
    }
    for hint, wrong in slips.items():
        if wrong.shape == out.shape and torch.allclose(out, wrong.to(out.dtype), atol=1e-4):
            return hint
    return "keep the first r columns of U, the first r singular values and the first r rows of Vh"


def _probe_rank_r_approx(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> list:
    return [call(fn, W.clone(), r) for W, r in _matrices()]


def _judge_rank_r_approx(data: object) -> Verdict:
    problems: list[str] = []
    cases = _matrices()
    for (W, r), (got, err) in zip(cases, outcomes(data, len(cases))):
        where = f"for a {W.shape[0]}x{W.shape[1]} matrix and r={r}"
        out = tensor(got)
        if err:
            problems.append(f"{where} your function raised {err}")
            break
        if out is None:
            problems.append(f"{where} your function returned {describe(got)}, not a torch.Tensor")
            break
        if tuple(out.shape) != tuple(W.shape):
            problems.append(
                f"{where} the result has shape {tuple(out.shape)}, expected {tuple(W.shape)}: "
                "multiply U[:, :r], the r largest singular values and Vh[:r, :]"
            )
            break
        out = out.to(torch.float64)
        if not bool(torch.isfinite(out).all()):
            problems.append(f"{where} the result holds NaN or infinite values")
            break
        rank = lowrank.numerical_rank(out, rtol=1e-5)
        if rank > r:
            problems.append(
                f"{where} the result has rank {rank}, more than r={r}: keep only r singular values"
            )
            break
        error = torch.linalg.matrix_norm(W.double() - out).item()
        best = lowrank.rank_r_error(W.double(), r)
        if not error <= best * (1 + 1e-4) + 1e-5:
            problems.append(
                f"{where} the error is {error:.4f}, but the best possible is {best:.4f}: "
                f"{_diagnose(W, r, out)}"
            )
            break
    return problems, "Your function gives the best rank-r approximation (Eckart-Young)."


check_rank_r_approx = Check(_probe_rank_r_approx, _judge_rank_r_approx)
"""Check ``fn(W, r)``: the best rank-``r`` approximation of ``W``, with ``W``'s shape."""


def _column_basis(A: torch.Tensor, k: int) -> torch.Tensor:
    """An orthonormal basis of the span of A's top-``k`` left singular vectors."""
    return torch.linalg.svd(A, full_matrices=False).U[:, :k]


def _similarity_cases() -> list[tuple[str, torch.Tensor, torch.Tensor, int, int]]:
    g = torch.Generator().manual_seed(0)
    A1, A2 = torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g)
    mixed = A1 @ torch.randn(8, 8, generator=g)
    return [
        ("the same matrix, i = j = 4", A1, A1.clone(), 4, 4),
        ("a matrix and the same columns scaled and mixed", A1, mixed, 8, 8),
        ("two random matrices, i = 2, j = 6", A1, A2, 2, 6),
        ("orthogonal column spaces", torch.eye(32)[:, :4], torch.eye(32)[:, 4:8], 4, 4),
    ]


def _probe_subspace_similarity(fn: Callable[..., float]) -> list:
    return [call(fn, a.clone(), b.clone(), i, j) for _, a, b, i, j in _similarity_cases()]


def _judge_subspace_similarity(data: object) -> Verdict:
    problems: list[str] = []
    cases = _similarity_cases()
    for (what, first, second, i, j), (out, err) in zip(cases, outcomes(data, len(cases))):
        if err:
            return [f"for {what} your function raised {err}"], ""
        u1, u2 = _column_basis(first, i), _column_basis(second, j)
        expected = float((u1.T @ u2).square().sum() / min(i, j))
        value = number(out)
        if value is None:
            return [f"for {what} your function returned {describe(out)}, not a number"], ""
        if not near(value, expected):
            hint = ""
            if near(value, expected * min(i, j)):
                hint = " (divide by min(i, j) so that the result lies in [0, 1])"
            elif value > 1 + 1e-4:
                hint = " (use the singular vectors, which are orthonormal, not the columns of A)"
            problems.append(
                f"for {what} your function gave {value:.4f}, expected {expected:.4f}{hint}"
            )
    return (
        problems,
        "Two adapters trained from different seeds can now be compared the way Hu et al. do "
        "(Section 7).",
    )


check_subspace_similarity = Check(_probe_subspace_similarity, _judge_subspace_similarity)
"""Check ``fn(A1, A2, i, j)``: Hu et al.'s normalised subspace similarity, a number in [0, 1].

``A1`` and ``A2`` are adapters' ``A`` matrices in the package's layout ``(in_dim, rank)``; the
similarity compares the spans of their top-``i`` and top-``j`` left singular vectors:
``||U1[:, :i].T @ U2[:, :j]||_F**2 / min(i, j)``.
"""


__all__ = ["check_rank_r_approx", "check_subspace_similarity"]
