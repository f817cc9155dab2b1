"""Chapter 8's exercise checks accept the solutions and reject typical mistakes, saying why."""

from __future__ import annotations

import pytest
import torch

from lora_tutorial.exercises.ch08 import (
    check_amplification_factor,
    check_bits_per_weight,
    check_multi_adapter_delta,
)


def bits_solution(block, scale_block):
    return 4 + 8 / block + 32 / (block * scale_block)


def test_bits_check_accepts_the_solution(capsys: pytest.CaptureFixture) -> None:
    assert check_bits_per_weight(bits_solution)
    assert "4.127" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong, hint",
    [(lambda b, s: 4 + 32 / b, "float32 scale per block"),
     (lambda b, s: 4 + 8 / b, "float32 constant"),
     (lambda b, s: bits_solution(b, s) / 8, "bytes"), (lambda b, s: 4.127, "expected"),
     (lambda b, s: "4.127", "not a number"), (lambda b, s: 1 / 0, "ZeroDivisionError")],
)  # fmt: skip
def test_bits_check_rejects_typical_mistakes(wrong, hint, capsys: pytest.CaptureFixture) -> None:
    assert not check_bits_per_weight(wrong)
    assert hint in capsys.readouterr().out


def delta_solution(x, A, B, ids):
    return torch.bmm(torch.bmm(x, A[ids]), B[ids])


def test_multi_adapter_check_accepts_the_solution(capsys: pytest.CaptureFixture) -> None:
    assert check_multi_adapter_delta(delta_solution)
    assert "Correct!" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong, hint",
    [(lambda x, A, B, ids: x @ A[0] @ B[0], "adapter 0"),
     (lambda x, A, B, ids: x @ A[ids[0]] @ B[ids[0]], "first row's adapter"),
     (lambda x, A, B, ids: delta_solution(x, A, B, ids)[:, 0], "shape"),
     (lambda x, A, B, ids: 2 * delta_solution(x, A, B, ids), "differ"),
     (lambda x, A, B, ids: x @ A @ B, "RuntimeError")],
)  # fmt: skip
def test_multi_adapter_check_rejects_typical_mistakes(
    wrong, hint, capsys: pytest.CaptureFixture
) -> None:
    assert not check_multi_adapter_delta(wrong)
    assert hint in capsys.readouterr().out


def amp_solution(W0, delta, r):
    U, _, Vh = torch.linalg.svd(delta, full_matrices=False)
    U_r, V_r = U[:, :r], Vh[:r].T
    return (torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(U_r.T @ W0 @ V_r)).item()


def amp_own_directions(W0, delta, r):
    U, _, Vh = torch.linalg.svd(W0, full_matrices=False)
    return (
        torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(U[:, :r].T @ W0 @ Vh[:r].T)
    ).item()


def amp_vh_not_transposed(W0, delta, r):
    U, _, Vh = torch.linalg.svd(delta, full_matrices=False)
    return (
        torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(U[:, :r].T @ W0 @ Vh[:r])
    ).item()


def test_amplification_check_accepts_the_solution(capsys: pytest.CaptureFixture) -> None:
    assert check_amplification_factor(amp_solution)
    assert "Correct!" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong, hint",
    [(amp_own_directions, "W0's singular vectors"),
     (lambda *a: 1 / amp_solution(*a), "upside down"),
     (amp_vh_not_transposed, "Vh[:r].T"), (lambda *a: "big", "not a number"),
     (lambda *a: amp_solution(*a) + 1, "expected")],
)  # fmt: skip
def test_amplification_check_rejects_typical_mistakes(
    wrong, hint, capsys: pytest.CaptureFixture
) -> None:
    assert not check_amplification_factor(wrong)
    assert hint in capsys.readouterr().out
