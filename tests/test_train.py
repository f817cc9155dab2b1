"""Training loop, evaluation, the three methods and peak-memory measurement, on a tiny model."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_tutorial import distributed, gpt, lora, train, variants
from lora_tutorial.classify import GPTClassifier

TINY = gpt.GPT_CONFIGS["tiny"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread than on cores shared with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def separable(n: int, seed: int, width: int = 12) -> TensorDataset:
    """Right-padded messages of 3..width tokens: class 0 uses tokens 100-109, class 1 tokens 1100-1109."""
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


def test_prepare_model_trains_what_each_method_says() -> None:
    emb, hidden, layers = TINY["emb_dim"], 4 * TINY["emb_dim"], TINY["n_layers"]
    head = emb * 2 + 2
    linear = emb * emb + emb
    block = (
        4 * linear + (emb * hidden + hidden) + (hidden * emb + emb) + 2 * 2 * emb
    )  # + two LayerNorms
    rank = 4
    lora_per_block = 4 * rank * (emb + emb) + rank * (emb + hidden) + rank * (hidden + emb)

    full = train.prepare_model(tiny_classifier(), "full")
    counts = lora.count_parameters(full)
    assert counts.trainable == counts.total

    last = train.prepare_model(tiny_classifier(), "last-block")
    assert lora.count_parameters(last).trainable == block + 2 * emb + head
    assert not any(p.requires_grad for p in last.gpt.trf_blocks[0].parameters())

    adapted = train.prepare_model(tiny_classifier(), "lora", rank=rank, alpha=8)
    assert lora.count_parameters(adapted).trainable == layers * lora_per_block + head
    assert len(lora.adapter_layers(adapted)) == 6 * layers
    assert isinstance(adapted.gpt.out_head, nn.Linear) and adapted.gpt.out_head.weight.requires_grad

    only_query = train.prepare_model(
        tiny_classifier(), "lora", rank=rank, alpha=8, targets=("W_query",)
    )
    assert lora.count_parameters(only_query).trainable == layers * rank * 2 * emb + head

    with pytest.raises(ValueError, match="method='prefix'"):
        train.prepare_model(tiny_classifier(), "prefix")


def test_default_learning_rates_and_lora_settings() -> None:
    assert (
        train.default_lr("lora", quick=False) == train.DEFAULT_LR["lora"] > train.DEFAULT_LR["full"]
    )
    assert [train.default_lr(m, quick=False) for m in train.METHODS] == [
        train.DEFAULT_LR[m] for m in train.METHODS
    ]
    assert {train.default_lr(m, quick=True) for m in train.METHODS} == {train.QUICK_LR}
    with pytest.raises(ValueError, match="method='prefix'"):
        train.default_lr("prefix", quick=False)
    layer = train.prepare_model(tiny_classifier(), "lora").gpt.trf_blocks[0].att.W_query.lora
    assert (
        layer.A.shape[1] == train.LORA_RANK and layer.scaling == train.LORA_ALPHA / train.LORA_RANK
    )
    assert (train.default_alpha(quick=False), train.default_alpha(quick=True)) == (
        train.LORA_ALPHA,
        train.QUICK_LORA_ALPHA,
    )


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


def test_training_without_trainable_parameters_is_refused() -> None:
    model = tiny_classifier().requires_grad_(False)
    with pytest.raises(ValueError, match="prepare_model"):
        train.train_classifier(model, *loaders(), progress=False)


PEAK_MEMORY_PROBE = """
import torch
from lora_tutorial import memory
size = 200 * 2**20
with memory.PeakMemory(torch.device("cpu")) as peak:
    start = memory._rss_bytes()
    block = torch.ones(size // 4)  # written, so resident
print(peak.peak_bytes - start)
"""


def test_peak_memory_sees_a_large_allocation() -> None:
    """In a fresh process, so that no freed memory the allocator kept can hide the allocation."""
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_PROBE], capture_output=True, text=True, check=True
    )
    assert int(result.stdout) >= 0.9 * 200 * 2**20


@pytest.mark.parametrize(("capability", "bf16"), [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_autocast_only_on_gpus_with_native_bf16(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], bf16: bool
) -> None:
    """A T4 (7.5) only emulates bf16, so it trains in float32; A100 (8.0) and H100 (9.0) use bf16."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(
        torch, "autocast", lambda device_type, dtype, enabled: calls.append((device_type, enabled))
    )
    train.autocast(torch.device("cuda"))
    train.autocast(torch.device("cpu"))
    assert calls == [("cuda", bf16), ("cpu", False)]


def test_outside_torchrun_there_is_one_process() -> None:
    with distributed.distributed() as info:
        assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
        assert distributed.gather("x") == ["x"]
