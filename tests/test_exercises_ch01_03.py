"""The exercise checks of chapters 1-3 accept the solutions and reject the typical wrong answers."""

from __future__ import annotations

import torch

from lora_tutorial.exercises import ch01, ch02, ch03


def _verdict(capsys, check, answer) -> tuple[bool, str]:
    ok = check(answer)
    return ok, capsys.readouterr().out


# --------------------------------------------------------------------------- chapter 1


def _rank_r_approx(W, r):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r, :]


def test_ch01_rank_r_approx_accepts_the_solution(capsys):
    ok, out = _verdict(capsys, ch01.check_rank_r_approx, _rank_r_approx)
    assert ok and out.startswith("Correct!")


def test_ch01_rank_r_approx_rejects_typical_mistakes(capsys):
    def wrong_slice(W, r):  # columns of Vh instead of rows
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :r] @ torch.diag(S[:r]) @ Vh[:, :r].T

    def no_singular_values(W, r):
        U, _, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :r] @ Vh[:r, :]

    def smallest_values(W, r):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, -r:] @ torch.diag(S[-r:]) @ Vh[-r:, :]

    def returns_factors(W, r):
        U, S, _ = torch.linalg.svd(W, full_matrices=False)
        return U[:, :r] * S[:r]

    ok, out = _verdict(capsys, ch01.check_rank_r_approx, wrong_slice)
    assert not ok and "ROWS of Vh" in out
    ok, out = _verdict(capsys, ch01.check_rank_r_approx, no_singular_values)
    assert not ok and "multiply by the singular values" in out
    ok, out = _verdict(capsys, ch01.check_rank_r_approx, smallest_values)
    assert not ok and "LARGEST" in out
    ok, out = _verdict(capsys, ch01.check_rank_r_approx, returns_factors)
    assert not ok and "shape" in out
    ok, out = _verdict(capsys, ch01.check_rank_r_approx, lambda W, r: W)
    assert not ok and "rank" in out


def test_ch01_break_even_rank(capsys):
    def solution(m, n):
        return (m * n - 1) // (m + n)

    ok, out = _verdict(capsys, ch01.check_break_even_rank, solution)
    assert ok and out.startswith("Correct!")
    ok, out = _verdict(capsys, ch01.check_break_even_rank, lambda m, n: m * n / (m + n))
    assert not ok and "not an int" in out
    ok, out = _verdict(capsys, ch01.check_break_even_rank, lambda m, n: m * n // (m + n))
    assert not ok and "not fewer" in out  # 768 x 768 at rank 384: exactly as many numbers
    ok, out = _verdict(capsys, ch01.check_break_even_rank, lambda m, n: True)
    assert not ok and "bool" in out
    ok, out = _verdict(capsys, ch01.check_break_even_rank, lambda m, n: 1)
    assert not ok and "still stores fewer" in out


def test_ch01_subspace_similarity_wants_a_python_float(capsys):
    def as_tensor(A1, A2, i, j):
        U1 = torch.linalg.svd(A1, full_matrices=False).U[:, :i]
        U2 = torch.linalg.svd(A2, full_matrices=False).U[:, :j]
        return (U1.T @ U2).square().sum() / min(i, j)

    ok, out = _verdict(capsys, ch01.check_subspace_similarity, as_tensor)
    assert not ok and ".item()" in out
    ok, out = _verdict(capsys, ch01.check_subspace_similarity, lambda *a: float("nan"))
    assert not ok and "nan" in out


def test_ch01_rank_r_approx_rejects_nan(capsys):
    ok, out = _verdict(capsys, ch01.check_rank_r_approx, lambda W, r: torch.full_like(W, torch.nan))
    assert not ok and out.startswith("Not yet")


# --------------------------------------------------------------------------- chapter 2


def test_ch02_trainable_prediction(capsys):
    d, layers, r = 64, 2, ch02.RANK  # gpt.GPT_CONFIGS["tiny"]
    right = layers * r * (4 * 2 * d + 2 * 5 * d) + 2 * d + 2
    ok, out = _verdict(capsys, ch02.check_trainable_prediction, right)
    assert ok and f"{right:,}" in out
    ok, out = _verdict(capsys, ch02.check_trainable_prediction, right - 2 * d - 2)
    assert not ok and "head trains fully" in out
    ok, out = _verdict(capsys, ch02.check_trainable_prediction, layers * r * 4 * d + 2 * d + 2)
    assert not ok and "not only query and value" in out
    ok, out = _verdict(capsys, ch02.check_trainable_prediction, float(right))
    assert not ok and "int" in out
    ok, out = _verdict(capsys, ch02.check_trainable_prediction, True)
    assert not ok and "bool" in out


def test_ch02_sgd_state_prediction(capsys):
    from lora_tutorial import lora

    n_total, n_trained = lora.count_parameters(ch02.sgd_exercise_model())
    right = 4 * (n_total + 2 * n_trained)
    ok, out = _verdict(capsys, ch02.check_sgd_state_prediction, right)
    assert ok and out.startswith("Correct!")
    ok, out = _verdict(capsys, ch02.check_sgd_state_prediction, 4 * (n_total + 3 * n_trained))
    assert not ok and "AdamW" in out
    ok, out = _verdict(capsys, ch02.check_sgd_state_prediction, n_total + 2 * n_trained)
    assert not ok and "4 bytes" in out
    ok, out = _verdict(capsys, ch02.check_sgd_state_prediction, float("nan"))
    assert not ok
    ok, out = _verdict(capsys, ch02.check_sgd_state_prediction, "324656")
    assert not ok and "str" in out


def test_ch02_activation_growth(capsys):
    ok, out = _verdict(capsys, ch02.check_activation_growth, 2)
    assert ok and out.startswith("Correct!")
    ok, out = _verdict(capsys, ch02.check_activation_growth, 1.0)
    assert not ok and "does not grow" in out
    ok, out = _verdict(capsys, ch02.check_activation_growth, float("nan"))
    assert not ok
    ok, out = _verdict(capsys, ch02.check_activation_growth, torch.tensor(2.0))
    assert not ok and "Tensor" in out


# --------------------------------------------------------------------------- chapter 3


def _merge_to_linear(layer):
    base = layer.linear
    out = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
    with torch.no_grad():
        out.weight.copy_(base.weight + layer.lora.scaling * (layer.lora.A @ layer.lora.B).T)
        if base.bias is not None:
            out.bias.copy_(base.bias)
    return out


def test_ch03_merge_to_linear(capsys):
    ok, out = _verdict(capsys, ch03.check_merge_to_linear, _merge_to_linear)
    assert ok and out.startswith("Correct!")

    def no_transpose(layer):
        base = layer.linear
        out = torch.nn.Linear(base.out_features, base.in_features)
        return out

    ok, out = _verdict(capsys, ch03.check_merge_to_linear, no_transpose)
    assert not ok and "transposed" in out

    def no_scaling(layer):
        out = _merge_to_linear(layer)
        with torch.no_grad():
            out.weight.copy_(layer.linear.weight + (layer.lora.A @ layer.lora.B).T)
        return out

    ok, out = _verdict(capsys, ch03.check_merge_to_linear, no_scaling)
    assert not ok and "scaling" in out

    def in_place(layer):
        with torch.no_grad():
            layer.linear.weight += layer.lora.scaling * (layer.lora.A @ layer.lora.B).T
        return layer.linear

    ok, out = _verdict(capsys, ch03.check_merge_to_linear, in_place)
    assert not ok and "changed" in out
    ok, out = _verdict(capsys, ch03.check_merge_to_linear, lambda layer: layer)
    assert not ok and "not a plain nn.Linear" in out


def test_ch03_rslora_alpha(capsys):
    ok, out = _verdict(capsys, ch03.check_rslora_alpha, lambda a, r: a / r**0.5)
    assert ok and out.startswith("Correct!")
    ok, out = _verdict(capsys, ch03.check_rslora_alpha, lambda a, r: a * r**0.5)
    assert not ok and "sqrt(r)" in out
    ok, out = _verdict(capsys, ch03.check_rslora_alpha, lambda a, r: a / r)
    assert not ok and "s itself" in out
    ok, out = _verdict(capsys, ch03.check_rslora_alpha, lambda a, r: float("nan"))
    assert not ok
    ok, out = _verdict(capsys, ch03.check_rslora_alpha, lambda a, r: torch.tensor(a / r**0.5))
    assert not ok and "not a number" in out
