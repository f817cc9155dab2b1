"""train.wilson_interval and train.all_logits (chapters 5 and 6), and time_interleaved's cap."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_tutorial import serving, train
from lora_tutorial.runtime import config


@pytest.mark.parametrize(
    ("correct", "low", "high"),
    [(288, 0.9314, 0.9770), (290, 0.9397, 0.9818), (292, 0.9483, 0.9864), (294, 0.9571, 0.9908)],
)
def test_wilson_interval_matches_published_values(correct: int, low: float, high: float) -> None:
    assert train.wilson_interval(correct, 300) == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_at_the_edges_and_with_a_wider_z() -> None:
    low, high = train.wilson_interval(30, 30)
    assert high == 1.0 and 0.88 < low < 0.89  # not zero wide when every message is right
    assert train.wilson_interval(0, 30)[0] == 0.0
    narrow, wide = train.wilson_interval(45, 50), train.wilson_interval(45, 50, z=2.58)
    assert wide[0] < narrow[0] and wide[1] > narrow[1]


@pytest.mark.parametrize(
    ("correct", "n", "z", "error"),
    [
        (0.9, 10, 1.96, TypeError),
        (True, 10, 1.96, TypeError),
        (11, 10, 1.96, ValueError),
        (0, 0, 1.96, ValueError),
        (5, 10, 0.0, ValueError),
        (5, 10, float("nan"), ValueError),
    ],
)
def test_wilson_interval_refuses_bad_input(correct, n, z, error) -> None:
    with pytest.raises(error):
        train.wilson_interval(correct, n, z)


class Echo(nn.Module):
    """Logits = the first token and the length, so that order and lengths can be checked."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.9)
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.stack([input_ids[:, 0], lengths], 1).float() * self.w)


def _loader() -> DataLoader:
    ids = torch.arange(10)[:, None].repeat(1, 3)
    return DataLoader(TensorDataset(ids, torch.zeros(10, dtype=torch.long), ids[:, 0] + 1), 4)


def test_all_logits_covers_every_message_in_order_in_eval_mode() -> None:
    model = Echo().train()
    logits = train.all_logits(model, _loader())
    assert logits.dtype == torch.float32 and logits.shape == (10, 2)
    assert logits[:, 0].tolist() == list(range(10))  # no dropout: eval mode
    assert logits[:, 1].tolist() == list(range(1, 11))
    assert model.training and not logits.requires_grad  # the mode is restored


def test_predictions_pair_each_answer_with_its_label() -> None:
    predicted, labels = train.predictions(Echo(), _loader())
    assert predicted.tolist() == [1] * 10  # the length is always the larger logit
    assert labels.tolist() == [0] * 10


def test_all_logits_and_time_interleaved_are_capped_in_a_rehearsal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(config, "mode", lambda: "rehearsal")
    assert len(train.all_logits(Echo(), _loader())) == 8  # two batches of four
    assert [len(t) for t in train.predictions(Echo(), _loader())] == [8, 8]
    calls: list[int] = []
    serving.time_interleaved({"a": lambda: calls.append(1)}, rounds=50, warm_up=False)
    assert len(calls) == 2


def _result(method: str, seconds: float, memory: int, test: float | None) -> train.MethodResult:
    return train.MethodResult(method, 10, 100, seconds, memory, "cuda", 0.5, test)


def test_mean_over_seeds_keeps_the_order_and_averages() -> None:
    runs = [
        _result("lora", 2.0, 5, 0.9),
        _result("full", 4.0, 9, 0.8),
        _result("lora", 4.0, 7, 1.0),
    ]
    lora_row, full_row = train.mean_over_seeds(runs)
    assert (lora_row.method, full_row.method) == ("lora", "full")
    assert lora_row.seconds_per_epoch == 3.0 and lora_row.peak_memory_bytes == 7
    assert lora_row.test_accuracy == pytest.approx(0.95) and full_row.test_accuracy == 0.8
    assert train.mean_over_seeds([_result("lora", 1.0, 1, None)])[0].test_accuracy is None
