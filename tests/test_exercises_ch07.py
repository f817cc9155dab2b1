"""Chapter 7's exercise checks accept the solutions and reject typical mistakes, saying why."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn.functional as F

from lora_tutorial.exercises.ch07 import (
    check_dora_forward,
    check_nf4_roundtrip,
    check_pissa_to_lora,
)
from lora_tutorial.quantize import nf4_levels

# ----------------------------------------------------------------------------- DoRA


def dora_solution(x, W0, bias, A, B, m, scaling):
    V = W0 + scaling * (A @ B).T
    return m / V.norm(dim=1) * (x @ W0.T + scaling * x @ A @ B) + bias


def dora_merged_solution(x, W0, bias, A, B, m, scaling):  # builds W' first: also right
    V = W0 + scaling * (A @ B).T
    return x @ (m[:, None] * V / V.norm(dim=1, keepdim=True)).T + bias


def dora_bias_inside(x, W0, bias, A, B, m, scaling):
    V = W0 + scaling * (A @ B).T
    return m / V.norm(dim=1) * (x @ V.T + bias)


def dora_whole_norm(x, W0, bias, A, B, m, scaling):
    V = W0 + scaling * (A @ B).T
    return m / V.norm() * (x @ V.T) + bias


def dora_no_scaling(x, W0, bias, A, B, m, scaling):
    V = W0 + (A @ B).T
    return m / V.norm(dim=1) * (x @ V.T) + bias


def dora_update_outside(x, W0, bias, A, B, m, scaling):
    return m / W0.norm(dim=1) * (x @ W0.T) + scaling * x @ A @ B + bias


@pytest.mark.parametrize("solution", [dora_solution, dora_merged_solution])
def test_dora_check_accepts_the_solutions(solution, capsys: pytest.CaptureFixture) -> None:
    assert check_dora_forward(solution)
    assert "Correct!" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (dora_bias_inside, "bias was rescaled"),
        (lambda x, W0, bias, *rest: dora_solution(x, W0, 0 * bias, *rest), "bias is missing"),
        (dora_whole_norm, "each row"),
        (dora_no_scaling, "multiplied by `scaling`"),
        (dora_update_outside, "normalising W0"),
        (lambda x, W0, bias, A, B, m, s: x @ W0.T + s * x @ A @ B + bias, "plain LoRA"),
        (lambda x, W0, bias, A, B, m, s: x @ W0.T, "differ"),
        (lambda *args: dora_solution(*args).T, "shape"),
        (lambda *args: 1 / 0, "ZeroDivisionError"),
        (lambda *args: None, "not a torch.Tensor"),
    ],
)
def test_dora_check_rejects_typical_mistakes(
    wrong, hint: str, capsys: pytest.CaptureFixture
) -> None:
    assert not check_dora_forward(wrong)
    assert hint in capsys.readouterr().out


def test_the_exercise_stubs_fail_their_checks(capsys: pytest.CaptureFixture) -> None:
    def stub(*args):  # what a learner has before writing anything
        return None

    assert not check_dora_forward(stub)
    assert not check_nf4_roundtrip(stub)
    assert not check_pissa_to_lora(stub)
    assert "Not yet" in capsys.readouterr().out


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


def pissa_to_lora_solution(A, B, A0, B0):
    return torch.cat([A, A0], dim=1), torch.cat([B, -B0], dim=0)


def test_pissa_to_lora_check_accepts_the_solution(capsys: pytest.CaptureFixture) -> None:
    assert check_pissa_to_lora(pissa_to_lora_solution)
    assert "Correct!" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda A, B, A0, B0: (torch.cat([A, A0], 1), torch.cat([B, B0], 0)), "a sign"),
        (lambda A, B, A0, B0: (A, B), "rank"),
        (lambda A, B, A0, B0: A @ B - A0 @ B0, "pair"),
    ],
)
def test_pissa_to_lora_check_rejects_typical_mistakes(
    wrong, hint: str, capsys: pytest.CaptureFixture
) -> None:
    assert not check_pissa_to_lora(wrong)
    assert hint in capsys.readouterr().out


# ----------------------------------------------------------------------------- the chapter


def test_chapter_7_solutions_pass_their_checks_and_labels_match(
    capsys: pytest.CaptureFixture,
) -> None:
    """The classroom kit fills each answer cell with the chapter's own solution: each must pass."""
    from lora_tutorial import classroom
    from lora_tutorial.classroom.notebooks import answer_cell_source

    chapter = Path(__file__).parents[1] / "chapters" / "07_lora_improvements.ipynb"
    found = classroom.exercises(chapter)
    labels = [ex.label for ex in found]
    assert len(labels) == len(set(labels))
    text = "\n".join(c.source for c in nbformat.read(chapter, 4).cells if c.cell_type == "markdown")
    assert sorted(re.findall(r"```\{solution\} (\S+)", text)) == sorted(labels)
    checked = [ex for ex in found if ex.check]
    assert len(checked) >= 3
    for ex in checked:
        *body, last = answer_cell_source(ex, ex.solution_code).rstrip().splitlines()
        namespace: dict[str, object] = {}
        exec("\n".join(body), namespace)
        assert eval(last, namespace) is True, ex.label
        assert "Correct!" in capsys.readouterr().out
