"""One memory model: training recipes give 16 or 12 bytes per trained parameter, and both the
GPT-2 predictions (chapter 2) and the LLaMA estimates (chapter 8) derive from them; the measured
helpers cap themselves in a rehearsal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_tutorial import counting
from lora_tutorial.runtime import config


def test_the_three_recipes_cost_16_16_and_12_bytes_per_trained_parameter() -> None:
    per_trained = {name: r.per_trained for name, r in counting.RECIPES.items()}
    assert per_trained == {"fp32": 16, "bf16-mixed": 16, "bf16": 12}
    assert counting.RECIPES["bf16-mixed"].master == 4 and counting.RECIPES["bf16"].master == 0
    frozen = {name: r.frozen for name, r in counting.RECIPES.items()}
    assert frozen == {"fp32": 4, "bf16-mixed": 2, "bf16": 2}


def test_training_state_bytes_follow_the_recipe() -> None:
    n_total, n_trained = 1000, 10
    for name, recipe in counting.RECIPES.items():
        state = counting.training_state_bytes(n_total, n_trained, name)
        assert state.total == n_trained * recipe.per_trained + (n_total - n_trained) * recipe.frozen
        assert state == counting.training_state_bytes(n_total, n_trained, recipe)
    mixed = counting.training_state_bytes(100, 100, "bf16-mixed")
    assert (mixed.weights, mixed.grads, mixed.optimizer, mixed.master) == (200, 200, 800, 400)
    assert counting.training_state_bytes(100, 10) == counting.training_state_bytes(100, 10, "fp32")


def test_an_unknown_recipe_is_named() -> None:
    with pytest.raises(ValueError, match="unknown training recipe 'fp8'"):
        counting.training_state_bytes(10, 1, "fp8")
    with pytest.raises(ValueError, match="unknown training recipe"):
        counting.finetuning_memory(counting.LLAMA_CONFIGS["llama-7b"], "full", recipe="float32")


def test_finetuning_memory_derives_from_the_recipe() -> None:
    cfg = counting.LLAMA_CONFIGS["llama-7b"]
    total, _ = counting.llama_param_count(cfg)
    assert counting.finetuning_memory(cfg, "full").total == 12 * total  # default: "bf16"
    assert counting.finetuning_memory(cfg, "full", recipe="bf16-mixed").total == 16 * total
    assert counting.finetuning_memory(cfg, "full", recipe="fp32").total == 16 * total
    lora = counting.finetuning_memory(cfg, "lora", recipe="bf16")
    assert lora.total == 2 * total + 12 * lora.trainable
    full = counting.finetuning_memory(cfg, "full")
    state = counting.training_state_bytes(total, total, "bf16")
    assert (full.weights, full.grads, full.optimizer) == (
        state.weights,
        state.grads,
        state.optimizer,
    )


def _model_and_step() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), torch.randn(4, 8)


def test_measure_training_step_caps_its_repeats_in_a_rehearsal(monkeypatch) -> None:
    model, opt, x = _model_and_step()
    calls = []

    def loss(net: nn.Module) -> torch.Tensor:
        calls.append(1)
        return net(x).square().mean()

    monkeypatch.setenv(config.REHEARSAL_ENV, "1")
    counting.measure_training_step(model, loss, opt, repeats=5)
    assert len(calls) == 2  # one warm-up step, one timed
    with pytest.raises(ValueError, match="at least 2"):
        counting.measure_training_step(model, loss, opt, repeats=1)


def test_time_forward_passes_times_every_form_and_caps_in_a_rehearsal(monkeypatch) -> None:
    counts = {"a": 0, "b": 0}

    def form(name: str):
        def call() -> None:
            counts[name] += 1

        return call

    timings = counting.time_forward_passes({"a": form("a"), "b": form("b")}, rounds=5)
    assert timings.rounds == 5 and counts == {"a": 6, "b": 6}  # one warm-up each
    assert set(timings.seconds) == {"a", "b"} and all(v >= 0 for v in timings.seconds.values())
    monkeypatch.setenv(config.REHEARSAL_ENV, "1")
    assert counting.time_forward_passes({"a": form("a")}, rounds=5).rounds == 2
    with pytest.raises(ValueError, match="rounds"):
        counting.time_forward_passes({"a": form("a")}, rounds=0)
    with pytest.raises(ValueError, match="empty"):
        counting.time_forward_passes({}, rounds=3)
