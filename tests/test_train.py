"""The training loop on a tiny model: learning, seeding, optimizers, divergence, rehearsal mode."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_tutorial import gpt, train, variants
from lora_tutorial.classify import GPTClassifier
from lora_tutorial.runtime import config
from lora_tutorial.runtime.rehearsal import EVAL_BATCHES, TRAIN_STEPS

TINY = gpt.GPT_CONFIGS["tiny"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


def separable(n: int, seed: int, width: int = 12) -> TensorDataset:
    """Right-padded messages of 3..width tokens: class 0 uses tokens 100-109, class 1 1100-1109."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    lengths = torch.randint(3, width + 1, (n,), generator=g)
    ids = torch.full((n, width), 50256)
    for i in range(n):
        ids[i, : lengths[i]] = (
            torch.randint(100, 110, (int(lengths[i]),), generator=g) + 1000 * labels[i]
        )
    return TensorDataset(ids, labels, lengths)


def loaders(batch_size: int = 8) -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    return (
        DataLoader(separable(64, 1), batch_size, shuffle=True, drop_last=True, generator=generator),
        DataLoader(separable(32, 2), batch_size),
    )


def tiny_classifier(seed: int = 0) -> GPTClassifier:
    torch.manual_seed(seed)
    return GPTClassifier(gpt.GPTModel("tiny"))


@pytest.mark.parametrize(("method", "lr"), [("lora", 3e-3), ("full", 1e-3)])
def test_training_lowers_the_loss_and_separates_the_classes(method: str, lr: float) -> None:
    model = train.prepare_model(tiny_classifier(), method, rank=4, alpha=8)
    train_loader, val_loader = loaders()
    before = train.evaluate(model, train_loader).loss
    history = train.train_classifier(
        model,
        train_loader,
        val_loader,
        epochs=4,
        lr=lr,
        eval_every=4,
        eval_batches=None,
        progress=False,
    )
    assert history.steps == list(range(4, 33, 4))
    assert history.examples_seen == [8 * s for s in history.steps]
    assert (
        len(history.train_accuracy) == len(history.val_accuracy) == len(history.epoch_seconds) == 4
    )
    assert history.train_losses[-1] < 0.5 * history.train_losses[0]
    after = train.evaluate(model, train_loader)
    assert after.loss < 0.1 * before
    assert after.accuracy == 1.0 and history.train_accuracy[-1] == 1.0
    assert (
        train.evaluate(model, val_loader).accuracy >= 0.9
    )  # unseen messages of the same two kinds
    assert history.peak_memory_bytes > 0 and history.memory_measure


def test_same_seed_same_weights() -> None:
    def run(seed: int) -> str:
        model = train.prepare_model(tiny_classifier(), "last-block")
        train.train_classifier(
            model, *loaders(), epochs=1, max_steps=3, eval_every=10, seed=seed, progress=False
        )
        return train.weights_digest(model)

    first = run(5)
    assert run(5) == first
    assert run(6) != first


def test_make_optimizer_builds_the_optimizer_that_trains() -> None:
    built: list[torch.optim.Optimizer] = []

    def loraplus(model: nn.Module) -> torch.optim.Optimizer:
        built.append(variants.create_loraplus_optimizer(model, lr=1e-3, lr_ratio=16))
        return built[-1]

    model = train.prepare_model(tiny_classifier(), "lora", rank=4, alpha=8)
    train.train_classifier(
        model,
        *loaders(),
        epochs=1,
        max_steps=3,
        eval_every=10,
        lr=5e-5,
        make_optimizer=loraplus,
        progress=False,
    )
    (optimizer,) = built
    query = model.gpt.trf_blocks[0].att.W_query.lora
    lrs = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert lrs[id(query.A)] == pytest.approx(1e-3) and lrs[id(query.B)] == pytest.approx(16e-3)
    assert optimizer.state[query.B]["step"].item() == 3  # every step went through this optimizer
    assert query.B.abs().min() > 0  # B left zero: the steps changed it


def test_make_optimizer_replaces_lr_and_weight_decay() -> None:
    def standing_still(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)

    model = train.prepare_model(tiny_classifier(), "last-block")
    before = train.weights_digest(model)
    train.train_classifier(
        model,
        *loaders(),
        epochs=1,
        max_steps=3,
        eval_every=10,
        lr=1e-2,
        make_optimizer=standing_still,
        progress=False,
    )
    assert train.weights_digest(model) == before


@pytest.mark.parametrize(
    ("make_optimizer", "message"),
    [
        (
            torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1),
            "must be a function model -> optimizer",
        ),
        (
            lambda model: [p for p in model.parameters() if p.requires_grad],
            "returned list, not a torch.optim.Optimizer",
        ),
    ],
)
def test_make_optimizer_that_is_no_optimizer_factory_is_refused(
    make_optimizer: object, message: str
) -> None:
    model = train.prepare_model(tiny_classifier(), "last-block")
    with pytest.raises(TypeError, match=message):
        train.train_classifier(model, *loaders(), make_optimizer=make_optimizer, progress=False)


def test_training_without_trainable_parameters_is_refused() -> None:
    model = tiny_classifier().requires_grad_(False)
    with pytest.raises(ValueError, match="prepare_model"):
        train.train_classifier(model, *loaders(), progress=False)


def recording_optimizer(built: list[torch.optim.Optimizer], lr: float):
    def make(model: nn.Module) -> torch.optim.Optimizer:
        built.append(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr))
        return built[-1]

    return make


@pytest.mark.parametrize("lr", [float("inf"), 1e30])
def test_a_diverging_run_stops_before_stepping_on_a_non_finite_loss(lr: float) -> None:
    model = train.prepare_model(tiny_classifier(), "last-block")
    built: list[torch.optim.Optimizer] = []
    with pytest.raises(train.TrainingDiverged, match="Lower the learning rate") as caught:
        train.train_classifier(
            model,
            *loaders(),
            epochs=2,
            eval_every=100,
            make_optimizer=recording_optimizer(built, lr),
            progress=False,
        )
    error = caught.value
    assert isinstance(error, ValueError) and not torch.isfinite(torch.tensor(error.loss))
    assert f"step {error.step} (epoch {error.epoch})" in str(error)
    (optimizer,) = built
    steps = {int(state["step"]) for state in optimizer.state.values()}
    assert steps == {error.step - 1}  # every step before the bad loss, none on it


def test_a_loss_that_is_nan_from_the_start_changes_nothing() -> None:
    model = train.prepare_model(tiny_classifier(), "full")
    with torch.no_grad():
        model.gpt.final_norm.weight.fill_(float("nan"))
    before = train.weights_digest(model)
    with pytest.raises(train.TrainingDiverged, match=r"loss is nan at step 1 \(epoch 1\)"):
        train.train_classifier(model, *loaders(), epochs=1, lr=1e-3, progress=False)
    assert train.weights_digest(model) == before


@pytest.fixture
def rehearsal(monkeypatch: pytest.MonkeyPatch, tmp_path) -> object:
    """Rehearsal mode with a record file; returns the record file's path."""
    monkeypatch.delenv(config.QUICK_ENV, raising=False)
    monkeypatch.setenv(config.REHEARSAL_ENV, "1")
    path = tmp_path / "runs.jsonl"
    monkeypatch.setenv(config.RECORD_ENV, str(path))
    return path


def counting(loader: DataLoader, counter: list[int]) -> DataLoader:
    """``loader`` whose dataset counts the examples read (to see how many batches were used)."""

    class Counted(TensorDataset):
        def __getitem__(self, index):
            counter.append(index)
            return super().__getitem__(index)

    dataset = Counted(*loader.dataset.tensors)
    return DataLoader(dataset, loader.batch_size, drop_last=loader.drop_last)


def test_rehearsal_stops_after_a_few_steps_and_projects_the_full_run(rehearsal) -> None:
    train_loader, val_loader = loaders()  # 8 training batches, 4 validation batches
    read: list[int] = []
    val_loader = counting(val_loader, read)
    model = train.prepare_model(tiny_classifier(), "lora", rank=4, alpha=8)
    history = train.train_classifier(
        model, train_loader, val_loader, epochs=3, eval_every=5, progress=False, label="lora"
    )
    steps = TRAIN_STEPS
    assert history.steps_done == steps and history.steps == [steps]
    assert history.examples_seen == [8 * steps] and len(history.val_accuracy) == 1
    # one loss record, capped at REHEARSAL_EVAL_BATCHES batches of 8; the accuracy pass at the
    # same step reuses its evaluation of the same model on the same batches
    assert len(read) == 8 * EVAL_BATCHES
    assert history.val_losses[-1] == pytest.approx(train.evaluate(model, val_loader).loss)
    assert history.full_steps == 3 * len(train_loader)
    assert history.median_step_seconds > 0
    assert history.projected_full_seconds > history.median_step_seconds * history.full_steps
    (line,) = rehearsal.read_text().splitlines()
    record = json.loads(line)
    assert list(record) == [
        "mode",
        "method",
        "steps_done",
        "full_steps",
        "median_step_seconds",
        "projected_full_seconds",
        "elapsed_seconds",
        "peak_rss_bytes",
        "cuda_peak_bytes",
        "device",
    ]
    assert (record["mode"], record["method"], record["device"]) == ("rehearsal", "lora", "cpu")
    assert (record["steps_done"], record["full_steps"]) == (steps, history.full_steps)
    assert record["projected_full_seconds"] == history.projected_full_seconds
    assert record["cuda_peak_bytes"] is None and record["peak_rss_bytes"] > 0


def test_every_run_appends_its_record_and_quick_mode_is_not_capped(
    rehearsal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(config.REHEARSAL_ENV, "0")
    monkeypatch.setenv(config.QUICK_ENV, "1")
    for max_steps in (3, 5):
        history = train.train_classifier(
            train.prepare_model(tiny_classifier(), "last-block"),
            *loaders(),
            epochs=1,
            max_steps=max_steps,
            eval_every=100,
            progress=False,
        )
        assert history.steps_done == history.full_steps == max_steps
    records = [json.loads(line) for line in rehearsal.read_text().splitlines()]
    assert [(r["mode"], r["method"], r["steps_done"]) for r in records] == [
        ("quick", None, 3),
        ("quick", None, 5),
    ]


def test_validation_is_evaluated_again_only_after_a_step(monkeypatch: pytest.MonkeyPatch) -> None:
    train_loader, val_loader = loaders()  # 8 training batches, 4 validation batches
    read: list[int] = []
    val_loader = counting(val_loader, read)
    model = train.prepare_model(tiny_classifier(), "lora", rank=4, alpha=8)
    history = train.train_classifier(
        model, train_loader, val_loader, epochs=2, eval_every=8, eval_batches=None, progress=False
    )
    # a loss record and an accuracy pass at the end of each epoch: one pass over validation each
    assert history.steps == [8, 16] and len(history.val_accuracy) == 2
    assert len(read) == 2 * len(val_loader.dataset)
    assert history.val_accuracy[-1] == train.evaluate(model, val_loader).accuracy


def test_a_rehearsal_trains_each_shape_once_and_counts_the_repeats(rehearsal) -> None:
    """Another seed or learning rate at the same shapes is not trained again, but recorded."""
    train_loader, val_loader = loaders()

    def run(seed: int, lr: float, rank: int = 4) -> train.History:
        model = train.prepare_model(tiny_classifier(seed), "lora", rank=rank, alpha=8)
        return train.train_classifier(
            model, train_loader, val_loader, epochs=1, lr=lr, seed=seed, progress=False
        )

    first, same_shapes, other_rank = run(1, 1e-3), run(2, 5e-3), run(1, 1e-3, rank=2)
    assert first.steps_done == TRAIN_STEPS and other_rank.steps_done == TRAIN_STEPS
    assert same_shapes.steps_done == 0 and same_shapes.epoch_seconds == []
    records = [json.loads(line) for line in rehearsal.read_text().splitlines()]
    assert [r.get("repeat", False) for r in records] == [False, True, False]
    assert records[1]["projected_full_seconds"] == records[0]["projected_full_seconds"]


def test_outside_a_rehearsal_every_run_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    train_loader, val_loader = loaders()
    histories = []
    for seed in (1, 2):
        model = train.prepare_model(tiny_classifier(seed), "lora", rank=4, alpha=8)
        histories.append(
            train.train_classifier(
                model, train_loader, val_loader, epochs=1, max_steps=2, seed=seed, progress=False
            )
        )
    assert [h.steps_done for h in histories] == [2, 2]
