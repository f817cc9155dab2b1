"""Chapter 7's exercise checks accept the solutions and reject typical mistakes, saying why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_tutorial.exercises.ch07 import check_dora_weight, check_nf4_roundtrip
from lora_tutorial.quantize import nf4_levels

# ----------------------------------------------------------------------------- DoRA


def dora_solution(W0, A, B, m, scaling):
    V = W0 + scaling * (A @ B).T
    return m[:, None] * V / V.norm(dim=1, keepdim=True)


def dora_column_norm(W0, A, B, m, scaling):
    V = W0 + scaling * (A @ B).T
    return m[:, None] * V / V.norm(dim=0, keepdim=True)


def dora_no_scaling(W0, A, B, m, scaling):
    V = W0 + (A @ B).T
    return m[:, None] * V / V.norm(dim=1, keepdim=True)


def dora_update_outside(W0, A, B, m, scaling):
    return m[:, None] * W0 / W0.norm(dim=1, keepdim=True) + scaling * (A @ B).T


def test_dora_check_accepts_the_solution(capsys: pytest.CaptureFixture) -> None:
    assert check_dora_weight(dora_solution)
    assert "Correct!" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (dora_column_norm, "each row"),
        (dora_no_scaling, "multiplied by `scaling`"),
        (dora_update_outside, "normalising W0"),
        (lambda *args: torch.zeros(3), "shape"),
        (lambda *args: 1 / 0, "ZeroDivisionError"),
    ],
)
def test_dora_check_rejects_typical_mistakes(
    wrong, hint: str, capsys: pytest.CaptureFixture
) -> None:
    assert not check_dora_weight(wrong)
    assert hint in capsys.readouterr().out


# ----------------------------------------------------------------------------- NF4


def nf4_solution(w, blocksize, levels=None):
    levels = nf4_levels() if levels is None else levels
    flat = w.flatten()
    blocks = F.pad(flat, (0, (-flat.numel()) % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    codes = (blocks / absmax).unsqueeze(-1).sub(levels).abs().argmin(dim=-1)
    return (levels[codes] * absmax).flatten()[: flat.numel()].view(w.shape)


def test_nf4_check_accepts_the_solution(capsys: pytest.CaptureFixture) -> None:
    assert check_nf4_roundtrip(nf4_solution)
    assert "Correct!" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong, hint",
    [(lambda w, bs: nf4_solution(w, w.numel()), "whole tensor"),
     (lambda w, bs: nf4_solution(w, bs, torch.linspace(-1, 1, 16)), "evenly spaced"),
     (lambda w, bs: w.clone(), "round every value"),
     (lambda w, bs: nf4_solution(w, bs).flatten(), "shape"),
     (lambda w, bs: w.view(-1, bs), "pad")],
)  # fmt: skip
def test_nf4_check_rejects_typical_mistakes(
    wrong, hint: str, capsys: pytest.CaptureFixture
) -> None:
    assert not check_nf4_roundtrip(wrong)
    assert hint in capsys.readouterr().out


# ----------------------------------------------------------------------------- PiSSA
