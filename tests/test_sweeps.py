"""Layer presets at a fixed budget; a sweep that trains each setting once and counts its steps."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader

from lora_tutorial import sweeps, train
from lora_tutorial.classify import GPTClassifier
from lora_tutorial.gpt import GPT_CONFIGS, GPTModel
from lora_tutorial.lora import adapter_layers
from lora_tutorial.runtime import config
from lora_tutorial.runtime.rehearsal import TRAIN_STEPS

CFG = {
    "vocab_size": 40,
    "context_length": 8,
    "emb_dim": 16,
    "n_heads": 2,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
}


def test_presets_cost_what_the_chapter_says_per_block() -> None:
    cfg = GPT_CONFIGS["gpt2-small"]
    d, blocks = cfg["emb_dim"], cfg["n_layers"]
    expected = {"query+value": 4, "all attention": 8, "feed-forward": 10, "all linear": 18}
    for preset, per_block in expected.items():
        assert sweeps.lora_params_per_rank(cfg, preset) == per_block * d * blocks
    budget = 16 * sweeps.lora_params_per_rank(cfg, "all linear")
    ranks = {p: sweeps.rank_for_budget(cfg, p, budget) for p in sweeps.LAYER_PRESETS}
    assert ranks == {"query+value": 72, "all attention": 36, "feed-forward": 29, "all linear": 16}
    tiny = GPT_CONFIGS["tiny"]  # a small model's few layers cannot take the whole budget
    tiny_budget = 16 * sweeps.lora_params_per_rank(tiny, "all linear")
    assert sweeps.rank_for_budget(tiny, "query+value", tiny_budget) == tiny["emb_dim"]
    with pytest.raises(ValueError, match="unknown layer preset"):
        sweeps.rank_for_budget(cfg, "mlp", budget)
    with pytest.raises(ValueError, match="budget"):
        sweeps.rank_for_budget(cfg, "all linear", 0)


def make_base() -> GPTClassifier:
    torch.manual_seed(0)
    return GPTClassifier(GPTModel(CFG))


def loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CFG["vocab_size"], (24, 6), generator=g)
    labels = (ids[:, 0] > CFG["vocab_size"] // 2).long()
    rows = [(ids[i], labels[i], torch.tensor(6)) for i in range(24)]
    train_loader = DataLoader(rows, batch_size=4, shuffle=True, drop_last=True, generator=g)
    return train_loader, DataLoader(rows[:8], batch_size=4)


def test_sweep_trains_each_setting_once_and_counts_steps() -> None:
    train_loader, val_loader = loaders()
    sweep = sweeps.Sweep(make_base, train_loader, val_loader, epochs=2, eval_every=3)
    first = sweep.run("query+value", 2, 4.0, 1e-2)
    assert first.steps == 2 * len(train_loader)
    assert first.lora_params == 2 * 2 * 2 * (16 + 16)  # blocks x layers x rank x (in + out)
    assert sweep.run("query+value", 2, 4.0, 1e-2) is first
    # rank 1: alpha / rank and alpha / sqrt(rank) are the same scaling, so the same run
    plain = sweep.run("feed-forward", 1, 2.0, 1e-2)
    assert sweep.run("feed-forward", 1, 2.0, 1e-2, use_rslora=True) is plain
    rs = sweep.run("feed-forward", 4, 2.0, 1e-2, use_rslora=True)
    assert rs.scaling == pytest.approx(1.0)
    assert len(sweep.runs) == 3
    assert sweep.total_steps == 3 * first.steps


def test_a_rebuilt_model_is_the_trained_one() -> None:
    train_loader, val_loader = loaders()
    sweep = sweeps.Sweep(make_base, train_loader, val_loader, epochs=1, eval_every=3)
    run = sweep.run("all attention", 4, 2.0, 5e-2, use_rslora=True)
    model = sweep.model(run)
    layers = adapter_layers(model)
    assert all(layer.lora.scaling == pytest.approx(2.0 / math.sqrt(4)) for layer in layers.values())
    assert any(layer.lora.B.abs().sum() > 0 for layer in layers.values())  # trained, not fresh
    assert train.evaluate(model, val_loader).accuracy == pytest.approx(run.val_accuracy)


def test_an_rslora_run_saves_and_reloads_with_identical_outputs(tmp_path) -> None:
    from lora_tutorial import adapters

    train_loader, val_loader = loaders()
    sweep = sweeps.Sweep(make_base, train_loader, val_loader, epochs=1, eval_every=3)
    model = sweep.model(sweep.run("query+value", 4, 2.0, 5e-2, use_rslora=True)).eval()
    path = adapters.save_adapter(model, tmp_path / "rs.safetensors", extra_modules="gpt.out_head")
    info = adapters.read_adapter(path)[1]
    assert all(record["config"]["use_rslora"] is True for record in info["layers"].values())
    assert info["scaling"] == "alpha/sqrt(rank)"
    fresh = adapters.load_adapter(make_base().eval(), path)
    ids = next(iter(val_loader))[0]
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_a_rehearsal_trains_each_shape_once_and_records_the_repeats(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = tmp_path / "runs.jsonl"
    monkeypatch.delenv(config.QUICK_ENV, raising=False)
    monkeypatch.setenv(config.REHEARSAL_ENV, "1")
    monkeypatch.setenv(config.RECORD_ENV, str(records))
    train_loader, val_loader = loaders()
    sweep = sweeps.Sweep(make_base, train_loader, val_loader, epochs=2, eval_every=3)
    trained = sweep.run("query+value", 2, 4.0, 1e-2)
    other_lr = sweep.run("query+value", 2, 4.0, 4e-2)
    rslora = sweep.run("query+value", 2, 4.0, 1e-2, use_rslora=True)
    other_rank = sweep.run("query+value", 4, 4.0, 1e-2)
    assert trained.steps == other_rank.steps == TRAIN_STEPS
    assert other_lr.steps == rslora.steps == 0 and other_lr.seconds == 0.0
    assert (other_lr.lr, rslora.use_rslora, rslora.scaling) == (4e-2, True, 4.0 / math.sqrt(2))
    assert sweep.total_steps == 2 * TRAIN_STEPS
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert [line["steps_done"] for line in lines] == [2, 0, 0, 2]
    assert lines[1]["repeat"] and lines[1]["elapsed_seconds"] == 0.0
    assert lines[1]["projected_full_seconds"] == lines[0]["projected_full_seconds"] > 0
    model = sweep.model(rslora)  # the trained tensors, with the repeat's own scaling
    layer = next(iter(adapter_layers(model).values()))
    assert layer.lora.scaling == pytest.approx(rslora.scaling)
