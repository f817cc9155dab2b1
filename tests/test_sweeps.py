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


def test_each_scaling_rule_sets_alpha_and_the_scaling_it_names() -> None:
    assert sweeps.rule_setting("fixed alpha", 8, 32) == (32.0, False)
    assert sweeps.rule_setting("alpha = 2r", 8, 32) == (16.0, False)
    assert sweeps.rule_setting("rsLoRA", 8, 32) == (32.0, True)
    for rank in (2, 8, 32):  # alpha = 2r keeps s = 2 at every rank
        assert sweeps.scaling(rank, *sweeps.rule_setting("alpha = 2r", rank, 32)) == 2.0
    with pytest.raises(ValueError, match="unknown scaling rule"):
        sweeps.rule_setting("alpha = r", 8, 32)


def test_the_shared_learning_rate_is_the_one_whose_worst_rank_loses_least() -> None:
    accuracy = {
        (2, 1e-4): 0.90,
        (2, 1e-3): 0.80,
        (2, 1e-2): 0.50,
        (8, 1e-4): 0.70,
        (8, 1e-3): 0.85,
        (8, 1e-2): 0.60,
    }
    shared = sweeps.shared_learning_rate(accuracy)
    # 1e-4 loses 0.15 at rank 8; 1e-3 loses 0.10 at rank 2; 1e-2 loses 0.40
    assert shared.lr == 1e-3
    assert shared.worst_loss == pytest.approx(0.10)
    assert shared.best_lrs == {2: 1e-4, 8: 1e-3}
    assert shared.best_lr_spread == pytest.approx(10)
    ties = sweeps.shared_learning_rate({(r, lr): 0.5 for r in (1, 4) for lr in (1e-3, 1e-2)})
    assert (ties.lr, ties.worst_loss, ties.best_lr_spread) == (1e-3, 0.0, 1.0)
    with pytest.raises(ValueError, match="missing"):
        sweeps.shared_learning_rate({(2, 1e-3): 0.5, (8, 1e-2): 0.5})


def test_accuracy_interval_is_wilsons_interval_of_the_count() -> None:
    assert sweeps.accuracy_interval(0.96, 300) == train.wilson_interval(288, 300)
    with pytest.raises(ValueError, match="fraction"):
        sweeps.accuracy_interval(1.5, 10)


def test_clearly_apart_needs_disjoint_intervals() -> None:
    assert not sweeps.clearly_apart(0.96, 0.9733, 300)  # the research notes' example
    assert sweeps.clearly_apart(0.80, 0.97, 149)
    assert not sweeps.clearly_apart(0.80, 0.97, 20)  # the same gap on 20 messages is noise
    assert sweeps.clearly_apart(0.97, 0.80, 149)  # order does not matter
