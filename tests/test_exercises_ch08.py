"""Chapter 8's exercise checks accept the solutions and reject typical mistakes, saying why."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora_tutorial import lora
from lora_tutorial.exercises.ch08 import (
    check_adapter_layout,
    check_first_step_drop,
    check_multi_adapter_delta,
)


def stub(*args):
    raise NotImplementedError("replace this line with your code")


@pytest.mark.parametrize(
    "check", [check_adapter_layout, check_multi_adapter_delta, check_first_step_drop]
)
def test_every_check_rejects_the_stub(check, capsys: pytest.CaptureFixture) -> None:
    assert check(stub) is False
    out = capsys.readouterr().out
    assert "Not yet:" in out and "NotImplementedError" in out


# ----------------------------------------------------------------------------- adapter layout


def layout_solution(state_dict):
    return {
        name.removesuffix(".lora.A"): int(tensor.shape[1])
        for name, tensor in state_dict.items()
        if name.endswith(".lora.A")
    }


def test_layout_check_accepts_the_solution(capsys: pytest.CaptureFixture) -> None:
    assert check_adapter_layout(layout_solution) is True
    assert "Correct!" in capsys.readouterr().out


def _factor_names(sd):
    return {n: int(t.shape[1]) for n, t in sd.items() if n.endswith(".lora.A")}


def _with_head(sd):
    return {n.removesuffix(".lora.A").removesuffix(".lora.B"): 1 for n in sd}


def _first_dim(sd):
    return {n.removesuffix(".lora.A"): int(t.shape[0]) for n, t in sd.items() if "lora.A" in n}


def _float_ranks(sd):
    return {k: float(v) for k, v in layout_solution(sd).items()}


def _bool_ranks(sd):
    return {k: True for k in layout_solution(sd)}


def _missing_one(sd):
    return dict(list(layout_solution(sd).items())[1:])


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (_factor_names, "drop the '.lora.A'"),
        (_with_head, "is not a LoRA layer"),
        (_first_dim, "(in_dim, rank)"),
        (_float_ranks, "Python ints"),
        (_bool_ranks, "Python ints"),
        (_missing_one, "is missing"),
        (lambda sd: list(layout_solution(sd).items()), "not a dict"),
    ],
)
def test_layout_check_rejects_typical_mistakes(wrong, hint, capsys: pytest.CaptureFixture) -> None:
    assert check_adapter_layout(wrong) is False
    out = capsys.readouterr().out
    assert "Not yet:" in out and hint in out


# ----------------------------------------------------------------------------- multi-adapter update


def delta_solution(x, A, B, ids):
    return torch.bmm(torch.bmm(x, A[ids]), B[ids])


def test_multi_adapter_check_accepts_the_solution(capsys: pytest.CaptureFixture) -> None:
    assert check_multi_adapter_delta(delta_solution) is True
    assert "Correct!" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda x, A, B, ids: x @ A[0] @ B[0], "adapter 0"),
        (lambda x, A, B, ids: x @ A[ids[0]] @ B[ids[0]], "first row's adapter"),
        (lambda x, A, B, ids: delta_solution(x, A, B, ids)[:, 0], "shape"),
        (lambda x, A, B, ids: 2 * delta_solution(x, A, B, ids), "differ"),
        (lambda x, A, B, ids: delta_solution(x, A, B, ids) * float("nan"), "differ"),
        (lambda x, A, B, ids: x @ A @ B, "RuntimeError"),
        (lambda x, A, B, ids: delta_solution(x, A, B, ids).tolist(), "not a torch.Tensor"),
    ],
)
def test_multi_adapter_check_rejects_typical_mistakes(
    wrong, hint, capsys: pytest.CaptureFixture
) -> None:
    assert check_multi_adapter_delta(wrong) is False
    out = capsys.readouterr().out
    assert "Not yet:" in out and hint in out


# ----------------------------------------------------------------------------- first step


def first_step(rank, alpha, use_rslora, *, optimizer=torch.optim.Adam, seed=0, frozen=True):
    torch.manual_seed(seed)
    linear = nn.Linear(256, 256).requires_grad_(not frozen)
    layer = lora.LinearWithLoRA(linear, rank=rank, alpha=alpha, use_rslora=use_rslora)
    x, g = torch.randn(32, 256), torch.randn(32, 256)
    opt = optimizer([p for p in layer.parameters() if p.requires_grad], lr=1e-3)
    loss = (layer(x) * g).sum()
    loss.backward()
    opt.step()
    with torch.no_grad():
        return loss.item() - (layer(x) * g).sum().item()


def test_first_step_check_accepts_the_solution_whatever_its_seed(
    capsys: pytest.CaptureFixture,
) -> None:
    for seed in (0, 7):
        assert check_first_step_drop(lambda r, a, rs, s=seed: first_step(r, a, rs, seed=s)) is True
        out = capsys.readouterr().out
        assert "Correct!" in out and "alpha = 2r x" in out


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda r, a, rs: -first_step(r, a, rs), "loss should fall"),
        (lambda r, a, rs: float("nan"), "loss should fall"),
        (lambda r, a, rs: torch.tensor(first_step(r, a, rs)), "Python float"),
        (lambda r, a, rs: True, "Python float"),
        (lambda r, a, rs: first_step(r, a, rs, optimizer=torch.optim.SGD), "the check's"),
        (lambda r, a, rs: first_step(r, a, rs, frozen=False), "freeze"),
        (lambda r, a, rs: first_step(r, 16.0, rs), "'alpha = 2r'"),  # ignores the alpha given
        (lambda r, a, rs: first_step(r, a, False), "'rsLoRA'"),  # ignores use_rslora
    ],
)
def test_first_step_check_rejects_typical_mistakes(
    wrong, hint, capsys: pytest.CaptureFixture
) -> None:
    assert check_first_step_drop(wrong) is False
    out = capsys.readouterr().out
    assert "Not yet:" in out and hint in out


def test_the_measured_growth_follows_s_times_r() -> None:
    # the account of chapter 8, section 2: the first step moves the loss by about s * r * lr
    growth = {
        rule: first_step(32, alpha(32), rs) / first_step(2, alpha(2), rs)
        for rule, alpha, rs in (
            ("fixed", lambda r: 16.0, False),
            ("2r", lambda r: 2.0 * r, False),
            ("rs", lambda r: 16.0, True),
        )
    }
    assert math.isclose(growth["fixed"], 1, rel_tol=0.2)
    assert math.isclose(growth["2r"], 16, rel_tol=0.2)
    assert math.isclose(growth["rs"], 4, rel_tol=0.2)
