"""Checks for chapter 1's coding exercises: the best rank-r approximation and its error, the
subspace similarity of two adapters, and the rank up to which two factors save numbers."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_tutorial import lowrank
from lora_tutorial.exercises._feedback import (
    Check,
    Verdict,
    call,
    outcomes,
    tensor,
    type_name,
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
    for (W, r), (out, err) in zip(_matrices(), outcomes(data, len(_CASES))):
        where = f"for a {W.shape[0]}x{W.shape[1]} matrix and r={r}"
        if err:
            problems.append(f"{where} your function raised {err}")
            break
        got = tensor(out)
        if got is None:
            problems.append(f"{where} your function returned {type_name(out)}, not a torch.Tensor")
            break
        if tuple(got.shape) != tuple(W.shape):
            problems.append(
                f"{where} the result has shape {tuple(got.shape)}, expected {tuple(W.shape)}: "
                "multiply U[:, :r], the r largest singular values and Vh[:r, :]"
            )
            break
        got = got.to(torch.float64)
        if not bool(torch.isfinite(got).all()):
            problems.append(f"{where} the result holds NaN or inf values")
            break
        rank = lowrank.numerical_rank(got, rtol=1e-5)
        if rank > r:
            problems.append(
                f"{where} the result has rank {rank}, more than r={r}: keep only r singular values"
            )
            break
        error = torch.linalg.matrix_norm(W.double() - got).item()
        best = lowrank.rank_r_error(W.double(), r)
        if not error <= best * (1 + 1e-4) + 1e-5:  # NaN fails too
            problems.append(
                f"{where} the error is {error:.4f}, but the best possible is {best:.4f}: "
                f"{_diagnose(W, r, got)}"
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


def _probe_subspace_similarity(
    fn: Callable[[torch.Tensor, torch.Tensor, int, int], float],
) -> list:
    return [call(fn, a.clone(), b.clone(), i, j) for _, a, b, i, j in _similarity_cases()]


def _judge_subspace_similarity(data: object) -> Verdict:
    problems: list[str] = []
    cases = _similarity_cases()
    for (what, first, second, i, j), (out, err) in zip(cases, outcomes(data, len(cases))):
        if err:
            return [f"for {what} your function raised {err}"], ""
        if type(out) is not float:
            return [
                f"for {what} your function returned {type_name(out)}, not a float: "
                "turn a one-element tensor into a Python number with .item()"
            ], ""
        u1, u2 = _column_basis(first, i), _column_basis(second, j)
        expected = float((u1.T @ u2).square().sum() / min(i, j))
        if not abs(out - expected) <= 1e-4:  # NaN fails too
            hint = ""
            if abs(out - expected * min(i, j)) <= 1e-4:
                hint = " (divide by min(i, j) so that the result lies in [0, 1])"
            elif out > 1 + 1e-4:
                hint = " (use the singular vectors, which are orthonormal, not the columns of A)"
            problems.append(
                f"for {what} your function gave {out:.4f}, expected {expected:.4f}{hint}"
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


_SIZES = [(600, 512), (768, 768), (4, 3), (10, 10), (768, 3072)]


def _probe_break_even_rank(fn: Callable[[int, int], int]) -> list:
    return [call(fn, m, n) for m, n in _SIZES]


def _judge_break_even_rank(data: object) -> Verdict:
    problems: list[str] = []
    for (m, n), (got, err) in zip(_SIZES, outcomes(data, len(_SIZES))):
        expected = max(0, -(-m * n // (m + n)) - 1)  # largest r with r * (m + n) < m * n
        where = f"for a {m} x {n} matrix"
        if err:
            problems.append(f"{where} your function raised {err}")
            break
        if type(got) is not int:
            problems.append(
                f"{where} your function returned {type_name(got)}, not an int: a rank is a "
                "whole number (use // or int(...), and return a plain int, not a bool or tensor)"
            )
            break
        if got == expected:
            continue
        hint = ""
        if got * (m + n) == m * n:
            hint = ": at that rank the factors store exactly as many numbers, not fewer"
        elif got == expected + 1:
            hint = ": at that rank the factors store at least as many numbers as the matrix"
        elif got < expected:
            hint = (
                f": rank {expected} still stores fewer numbers ({expected * (m + n):,} < {m * n:,})"
            )
        problems.append(f"{where} you returned {got}, expected {expected}{hint}")
        break
    return (
        problems,
        "Below that rank the factors are smaller than the matrix; LoRA's ranks are far below it.",
    )


check_break_even_rank = Check(_probe_break_even_rank, _judge_break_even_rank)
"""Check ``fn(m, n)``: the largest rank ``r`` at which the factors of an ``m x n`` matrix
(``r * (m + n)`` numbers) store fewer numbers than the matrix (``m * n``)."""


__all__ = ["check_break_even_rank", "check_rank_r_approx", "check_subspace_similarity"]
