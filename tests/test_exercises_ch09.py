"""Chapter 9's exercise checks accept the solutions and reject typical mistakes, saying why."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_tutorial import encoder, lora
from lora_tutorial.exercises.ch09 import (
    check_intruder_count,
    check_mean_pool,
    check_minilm_lora_params,
    minilm_lora_reference,
)

# ----------------------------------------------------------------------------- mean pooling


def mean_pool(hidden, mask):
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1)


def test_mean_pool_check_accepts_the_solution(capsys: pytest.CaptureFixture) -> None:
    assert check_mean_pool(mean_pool)
    assert "Correct!" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda hidden, mask: hidden.mean(dim=1), "padding"),
        (lambda hidden, mask: (hidden * mask[..., None]).sum(dim=1), "sum"),
        (lambda hidden, mask: (hidden * mask[..., None]).sum(dim=1) / 5, "number of real"),
        (lambda hidden, mask: hidden[:, 0], "mean of the states"),
        (lambda hidden, mask: hidden, "shape"),
        (lambda hidden, mask: 1 / 0, "ZeroDivisionError"),
        (lambda hidden, mask: None, "not a torch.Tensor"),
        (None, "stub"),
    ],
)
def test_mean_pool_check_rejects_mistakes(wrong, hint: str, capsys) -> None:
    if wrong is None:  # the notebook's stub: a function that does nothing yet

        def wrong(hidden, mask):
            pass

        hint = "not a torch.Tensor"
    assert not check_mean_pool(wrong)
    assert hint in capsys.readouterr().out


# ----------------------------------------------------------------------------- intruder dimensions


def intruder_count(W0, W, k, eps):
    U0 = torch.linalg.svd(W0, full_matrices=False)[0]
    U = torch.linalg.svd(W, full_matrices=False)[0][:, :k]
    return int(((U.T @ U0).abs().max(dim=1).values < eps).sum())


def matches(W0, W, k, eps):  # counts the top vectors that do resemble one of W0's
    return k - intruder_count(W0, W, k, eps)


def right_vectors(W0, W, k, eps):
    V0 = torch.linalg.svd(W0, full_matrices=False)[2]
    V = torch.linalg.svd(W, full_matrices=False)[2][:k]
    return int(((V @ V0.T).abs().max(dim=1).values < eps).sum())


def test_intruder_check_accepts_the_solution(capsys: pytest.CaptureFixture) -> None:
    assert check_intruder_count(intruder_count)
    assert "Correct!" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (matches, "expected"),
        (right_vectors, "expected"),
        (lambda W0, W, k, eps: float(intruder_count(W0, W, k, eps)), "not an int"),
        (lambda W0, W, k, eps: True, "not an int"),
        (lambda W0, W, k, eps: 0, "expected"),
        (lambda W0, W, k, eps: None, "not an int"),
    ],
)
def test_intruder_check_rejects_mistakes(wrong, hint: str, capsys) -> None:
    assert not check_intruder_count(wrong)
    assert hint in capsys.readouterr().out


# ----------------------------------------------------------------------------- LoRA's size


def minilm_lora_params(rank, targets):
    sizes = {
        "query": (384, 384),
        "key": (384, 384),
        "value": (384, 384),
        "attn_out": (384, 384),
        "ff_in": (384, 1536),
        "ff_out": (1536, 384),
    }
    per_layer = sum(rank * (d_in + d_out) for d_in, d_out in (sizes[t] for t in targets))
    return 6 * per_layer + 384 * 2 + 2


def test_lora_size_check_accepts_the_solution(capsys: pytest.CaptureFixture) -> None:
    assert check_minilm_lora_params(minilm_lora_params)
    assert "Correct!" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda rank, targets: minilm_lora_params(rank, targets) - 770, "the head"),
        (lambda rank, targets: (minilm_lora_params(rank, targets) - 770) // 6 + 770, "six"),
        (lambda rank, targets: rank * 768 * len(targets) * 6 + 770, "A is d_in"),
        (lambda rank, targets: float(minilm_lora_params(rank, targets)), "not an int"),
        (lambda rank, targets: None, "not an int"),
    ],
)
def test_lora_size_check_rejects_mistakes(wrong, hint: str, capsys) -> None:
    assert not check_minilm_lora_params(wrong)
    assert hint in capsys.readouterr().out


def test_the_reference_count_is_what_prepare_classifier_trains() -> None:
    model = encoder.EncoderClassifier(encoder.BertEncoder(encoder.MINILM_L6))
    for rank, targets in [(8, encoder.LORA_TARGETS), (4, ("query", "ff_out"))]:
        adapted = encoder.prepare_classifier(
            copy.deepcopy(model), "lora", rank=rank, targets=targets
        )
        assert lora.count_parameters(adapted).trainable == minilm_lora_reference(rank, targets)
