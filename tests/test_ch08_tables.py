"""Chapter 8's table helpers in analysis and serving: what they compute, and their caps."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import SMALL_GPT

from lora_tutorial import analysis, lora, serving
from lora_tutorial.classify import GPTClassifier
from lora_tutorial.gpt import GPTModel
from lora_tutorial.runtime import config

CFG = SMALL_GPT
HEAD = "gpt.out_head"


def rehearse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.QUICK_ENV, raising=False)
    monkeypatch.setenv(config.REHEARSAL_ENV, "1")


def test_held_out_token_ids_encodes_every_text_and_a_rehearsal_two(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    texts = ["ab", "cde", "f", "gh"]
    encode = lambda text: [ord(c) for c in text]
    assert analysis.held_out_token_ids(texts, encode) == [encode(t) for t in texts]
    rehearse(monkeypatch)
    assert analysis.held_out_token_ids(iter(texts), encode) == [encode(t) for t in texts[:2]]


def adapted_gpt(seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    model = lora.replace_linear_with_lora(GPTModel(CFG), 2, 4, exclude="out_head")
    for layer in lora.adapter_layers(model).values():
        torch.nn.init.normal_(layer.lora.B)
    return model


def test_update_directions_gives_one_row_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    updates = analysis.weight_updates(adapted_gpt())
    rows = analysis.update_directions("LoRA", updates, 2)
    assert len(rows) == len(updates) == 2 * 6  # two blocks of six linear layers
    first = rows[0]
    amp = analysis.subspace_amplification(updates[0], 2)
    assert first["method"] == "LoRA" and first["layer"] == updates[0].name.split(".", 3)[-1]
    assert first["rank for 90% of ΔW"] <= 2  # a rank-2 update
    assert first["amplification"] == pytest.approx(amp.factor)
    rehearse(monkeypatch)
    assert len(analysis.update_directions("LoRA", updates, 2, rehearsal_layers=3)) == 3


def served_setup() -> tuple[serving.MultiAdapterModel, list[GPTClassifier], torch.Tensor, ...]:
    torch.manual_seed(0)
    base = GPTClassifier(GPTModel(CFG)).eval()
    adapted = []
    for seed, (rank, include) in enumerate([(2, ["W_query"]), (4, ["ff.layers.0"])]):
        model = copy.deepcopy(base)
        lora.replace_linear_with_lora(model, rank, 2 * rank, include=include, exclude=HEAD)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora.adapter_layers(model).values():
                layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=g))
        adapted.append(model.eval())
    served = serving.MultiAdapterModel(base, adapted, extra_modules=HEAD).eval()
    input_ids = torch.randint(0, CFG["vocab_size"], (4, 6))
    lengths = torch.tensor([6, 2, 5, 6])
    return served, adapted, input_ids, lengths


def test_compare_strategies_agrees_times_and_counts_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served, adapted, input_ids, lengths = served_setup()
    ids = torch.tensor([0, 1, 1, 0])
    calls = []
    real = serving.time_interleaved

    def spy(fns, **kwargs):
        calls.append(kwargs["rounds"])
        return real(fns, **kwargs)

    monkeypatch.setattr(serving, "time_interleaved", spy)
    table = serving.compare_strategies(
        served, adapted, input_ids, lengths, adapter_ids=ids, rounds=3
    )
    assert list(table) == [
        "batched multi-adapter",
        "merge per request",
        "one merged model per task",
    ]
    assert table["batched multi-adapter"]["time / batched"] == 1.0
    assert all(row["max diff to batched"] < 1e-5 for row in table.values())
    one = table["merge per request"]["weights held (MB)"]
    assert table["one merged model per task"]["weights held (MB)"] == pytest.approx(2 * one)
    rehearse(monkeypatch)
    serving.compare_strategies(served, adapted, input_ids, lengths, adapter_ids=ids, rounds=3)
    assert calls == [3, 2]  # a rehearsal times two rounds
