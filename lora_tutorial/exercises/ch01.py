"""Checks for chapter 1's coding exercises: the best rank-r approximation and its error."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_tutorial import lowrank
from lora_tutorial.exercises._feedback import call, report

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


def check_rank_r_approx(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> bool:
    """Check ``fn(W, r)``: the best rank-``r`` approximation of ``W``, with ``W``'s shape."""
    problems: list[str] = []
    for W, r in _matrices():
        where = f"for a {W.shape[0]}x{W.shape[1]} matrix and r={r}"
        out, err = call(fn, W.clone(), r)
        if err:
            problems.append(f"{where} your function raised {err}")
            break
        if not isinstance(out, torch.Tensor):
            problems.append(
                f"{where} your function returned {type(out).__name__}, not a torch.Tensor"
            )
            break
        if tuple(out.shape) != tuple(W.shape):
            problems.append(
                f"{where} the result has shape {tuple(out.shape)}, expected {tuple(W.shape)}: "
                "multiply U[:, :r], the r largest singular values and Vh[:r, :]"
            )
            break
        out = out.detach().to(torch.float64)
        rank = lowrank.numerical_rank(out, rtol=1e-5)
        if rank > r:
            problems.append(
                f"{where} the result has rank {rank}, more than r={r}: keep only r singular values"
            )
            break
        error = torch.linalg.matrix_norm(W.double() - out).item()
        best = lowrank.rank_r_error(W.double(), r)
        if error > best * (1 + 1e-4) + 1e-5:
            problems.append(
                f"{where} the error is {error:.4f}, but the best possible is {best:.4f}: "
                f"{_diagnose(W, r, out)}"
            )
            break
    return report(problems, "Your function gives the best rank-r approximation (Eckart-Young).")


def check_tail_error(fn: Callable[[torch.Tensor, int], float]) -> bool:
    """Check ``fn(s, r)``: the Frobenius error of the best rank-``r`` approximation, from the
    singular values ``s``."""
    problems: list[str] = []
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])
    for r in (0, 1, 2, 4):
        out, err = call(fn, s.clone(), r)
        if err:
            problems.append(f"for s={s.tolist()} and r={r} your function raised {err}")
            break
        expected = float(s[r:].square().sum().sqrt())
        try:
            value = float(out)
        except (TypeError, ValueError):
            problems.append(f"for r={r} your function returned {out!r}, which is not a number")
            break
        if abs(value - expected) > 1e-4:
            hint = ""
            if r < 4 and abs(value - float(s[r:].square().sum())) < 1e-4:
                hint = " (that is the squared error: take the square root)"
            elif r < 3 and abs(value - float(s[r + 1 :].square().sum().sqrt())) < 1e-4:
                hint = (
                    " (off by one: the first dropped singular value is s[r], Python counts from 0)"
                )
            elif r < 4 and abs(value - float(s[r])) < 1e-4:
                hint = (
                    " (that is the spectral-norm error; the Frobenius error adds up all dropped"
                    " values)"
                )
            elif abs(value - float(s[:r].square().sum().sqrt())) < 1e-4:
                hint = " (those are the kept values; the error comes from the dropped ones)"
            problems.append(
                f"for s={s.tolist()} and r={r} you returned {value:.4f}, "
                f"expected {expected:.4f}{hint}"
            )
            break
    return report(
        problems,
        "The error of the best rank-r approximation is the root of the sum of the dropped s_i^2.",
    )


__all__ = ["check_rank_r_approx", "check_tail_error"]
