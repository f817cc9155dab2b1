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


# --------------------------------------------------------------------------- chapter 2


def test_ch02_qv_lora_params(capsys):
    ok, _ = _verdict(
        capsys,
        ch02.check_qv_lora_params,
        lambda cfg, r: cfg["n_layers"] * 2 * r * 2 * cfg["emb_dim"],
    )
    assert ok
    ok, out = _verdict(
        capsys, ch02.check_qv_lora_params, lambda cfg, r: cfg["n_layers"] * r * 2 * cfg["emb_dim"]
    )
    assert not ok and "two adapted matrices per block" in out
    ok, out = _verdict(capsys, ch02.check_qv_lora_params, lambda cfg, r: 2 * r * 2 * cfg["emb_dim"])
    assert not ok and "n_layers" in out
    ok, out = _verdict(
        capsys, ch02.check_qv_lora_params, lambda cfg, r: cfg["n_layers"] * 2 * cfg["emb_dim"] ** 2
    )
    assert not ok and "full weights" in out
    ok, out = _verdict(capsys, ch02.check_qv_lora_params, lambda cfg, r: cfg["missing"])
    assert not ok and "KeyError" in out


def test_ch02_training_bytes(capsys):
    ok, _ = _verdict(capsys, ch02.check_training_bytes, lambda n, t, b: (n + 3 * t) * b)
    assert ok
    ok, out = _verdict(capsys, ch02.check_training_bytes, lambda n, t, b: (n + t) * b)
    assert not ok and "AdamW" in out
    ok, out = _verdict(capsys, ch02.check_training_bytes, lambda n, t, b: 4 * n * b)
    assert not ok and "only for trained numbers" in out
    ok, out = _verdict(capsys, ch02.check_training_bytes, lambda n, t, b: n + 3 * t)
    assert not ok and "bytes_per_number" in out


# --------------------------------------------------------------------------- chapter 3


def test_ch03_freeze(capsys):
    def solution(model):
        for name, p in model.named_parameters():
            p.requires_grad = name.endswith(("lora.A", "lora.B"))

    ok, out = _verdict(capsys, ch03.check_freeze, solution)
    assert ok and "4 adapter matrices" in out

    def freezes_everything(model):
        model.requires_grad_(False)

    ok, out = _verdict(capsys, ch03.check_freeze, freezes_everything)
    assert not ok and "frozen but must train" in out

    def forgets_head(model):
        for name, p in model.named_parameters():
            if ".linear." in name:
                p.requires_grad = False

    ok, out = _verdict(capsys, ch03.check_freeze, forgets_head)
    assert not ok and "head.weight" in out and "norm.weight" in out
    ok, out = _verdict(capsys, ch03.check_freeze, lambda model: model.nonexistent())
    assert not ok and "AttributeError" in out
