"""Evaluation: scores on a loader, rehearsal mode's cap, bf16 autocast, and eval mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_tutorial import train
from lora_tutorial.runtime import config
from lora_tutorial.runtime.rehearsal import EVAL_BATCHES


class FixedPredictions(nn.Module):
    """A stand-in classifier that predicts the class written in the first token."""

    num_classes = 2

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(4.0))

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(input_ids[:, 0], 2).float() * self.scale


def test_evaluate_reports_confusion_precision_recall() -> None:
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    predictions = torch.tensor([0, 0, 1, 0, 1, 0])
    dataset = TensorDataset(predictions[:, None], labels, torch.ones(6, dtype=torch.long))
    result = train.evaluate(FixedPredictions(), DataLoader(dataset, batch_size=4))
    assert result.confusion == [[3, 1], [1, 1]]
    assert result.accuracy == pytest.approx(4 / 6)
    assert result.precision == pytest.approx([3 / 4, 1 / 2])
    assert result.recall == pytest.approx([3 / 4, 1 / 2])
    assert result.examples == 6
    assert (
        train.evaluate(
            FixedPredictions(), DataLoader(dataset, batch_size=4), num_batches=1
        ).examples
        == 4
    )


@pytest.mark.parametrize(("capability", "bf16"), [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_autocast_only_on_gpus_with_native_bf16(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], bf16: bool
) -> None:
    """A T4 (7.5) only emulates bf16, so it trains in float32; A100 (8.0) and H100 (9.0) in bf16."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(
        torch, "autocast", lambda device_type, dtype, enabled: calls.append((device_type, enabled))
    )
    train.autocast(torch.device("cuda"))
    train.autocast(torch.device("cpu"))
    assert calls == [("cuda", bf16), ("cpu", False)]


def test_rehearsal_mode_evaluates_only_the_first_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    labels = torch.arange(40) % 2
    dataset = TensorDataset(labels[:, None], labels, torch.ones(40, dtype=torch.long))
    loader = DataLoader(dataset, batch_size=4)
    assert train.evaluate(FixedPredictions(), loader).examples == 40
    monkeypatch.setenv(config.REHEARSAL_ENV, "1")
    assert train.evaluate(FixedPredictions(), loader).examples == 4 * EVAL_BATCHES
    one = train.evaluate(FixedPredictions(), loader, num_batches=1)
    assert one.examples == 4


def test_evaluation_runs_in_eval_mode_and_restores_training_mode() -> None:
    model = FixedPredictions()
    seen: list[tuple[bool, bool]] = []
    model.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    zeros = torch.zeros(4, dtype=torch.long)
    loader = DataLoader(TensorDataset(zeros[:, None], zeros, zeros + 1), batch_size=2)
    model.train()
    train.evaluate(model, loader)
    assert seen == [(False, False), (False, False)] and model.training
