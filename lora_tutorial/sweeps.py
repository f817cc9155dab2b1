"""Small LoRA experiments for chapter 8: which layers to adapt, which rank, alpha and learning rate.

- ``LAYER_PRESETS``: the four usual choices of layers (query+value, all attention, feed-forward,
  all linear) as name patterns for :func:`~lora_tutorial.train.prepare_model`.
- :func:`lora_params_per_rank` and :func:`rank_for_budget`: how many trainable numbers a preset
  adds per unit of rank, and the rank that spends a given budget.
- :class:`Sweep` trains one LoRA classifier per setting, seeded alike, and remembers each result, so
  that settings shared by two experiments (the same layers, rank, scaling and learning rate) train
  once. It counts optimizer steps, so a chapter can check its training budget.
- :data:`SCALING_RULES`, :func:`rule_setting` and :func:`shared_learning_rate`: three ways to pick
  alpha as the rank changes, and how well one learning rate then serves every rank.
- :func:`wilson_interval` and :func:`clearly_apart`: how precisely a validation set of n messages
  measures an accuracy, and whether two single runs differ by more than that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from lora_tutorial import counting, train
from lora_tutorial.classify import GPTClassifier
from lora_tutorial.lora import LinearWithLoRA, adapter_layers, count_parameters

LAYER_PRESETS: dict[str, tuple[str, ...]] = {
    "query+value": ("W_query", "W_value"),
    "all attention": ("W_query", "W_key", "W_value", "out_proj"),
    "feed-forward": ("ff.layers.0", "ff.layers.2"),
    "all linear": train.LORA_TARGETS,
}


def _preset(preset: str | tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(preset, tuple):
        return preset
    if preset not in LAYER_PRESETS:
        raise ValueError(f"unknown layer preset {preset!r}; choose one of {list(LAYER_PRESETS)}")
    return LAYER_PRESETS[preset]


def _adapted(name: str, targets: tuple[str, ...]) -> bool:
    """Whether the layer called ``name`` is one of ``targets`` (names end with a target)."""
    return any(name.endswith("." + t) for t in targets)


def lora_params_per_rank(cfg: Mapping, preset: str | tuple[str, ...]) -> int:
    """Trainable LoRA numbers per unit of rank on ``preset``'s layers of ``GPTModel(cfg)``."""
    targets = _preset(preset)
    return counting.lora_params_for(
        counting.gpt_linear_shapes(cfg), 1, lambda name: _adapted(name, targets)
    )


def rank_for_budget(cfg: Mapping, preset: str | tuple[str, ...], budget: int) -> int:
    """The rank (at least 1) whose LoRA on ``preset``'s layers comes closest to ``budget``.

    A rank above a layer's smaller side adds parameters but no rank to the update (it is full rank
    already), so a small model's few layers may get less than the budget: the rank stops there.
    """
    if budget < 1:
        raise ValueError(f"budget={budget}: give the number of trainable LoRA parameters (>= 1)")
    targets = _preset(preset)
    largest = min(
        min(s.in_dim, s.out_dim)
        for s in counting.gpt_linear_shapes(cfg)
        if _adapted(s.name, targets)
    )
    return min(largest, max(1, round(budget / lora_params_per_rank(cfg, preset))))


def scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """LoRA's multiplier of the update: ``alpha / rank``, or ``alpha / sqrt(rank)`` for rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class CountingAdamW:
    """``make_optimizer`` for :func:`~lora_tutorial.train.train_classifier`: AdamW over the
    trainable parameters, counting in ``.steps`` the optimizer steps taken (a budget check)."""

    def __init__(self, lr: float, weight_decay: float = 0.1) -> None:
        self.lr, self.weight_decay, self.steps = lr, weight_decay, 0

    def _count(self, *_: object) -> None:
        self.steps += 1

    def __call__(self, model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        optimizer.register_step_post_hook(self._count)
        return optimizer


@dataclass
class SweepRun:
    """One trained setting: what was trained, how long, how well (last validation accuracy)."""

    layers: str
    rank: int
    alpha: float
    use_rslora: bool
    lr: float
    trainable_params: int
    lora_params: int
    steps: int
    seconds: float
    val_accuracy: float

    @property
    def scaling(self) -> float:
        return scaling(self.rank, self.alpha, self.use_rslora)

    def to_dict(self) -> dict:
        return {**asdict(self), "scaling": self.scaling}


class Sweep:
    """Train LoRA classifiers on one data set, one per setting, and keep what each run learned.

    ``make_base()`` returns a fresh classifier (the same weights every call); each run adapts it
    with :func:`~lora_tutorial.train.prepare_model` and trains it with
    :func:`~lora_tutorial.train.train_classifier` for ``epochs`` epochs and the given seed. Runs are
    remembered by (layers, rank, scaling, learning rate): a second request for the same setting
    returns the first result. The trained tensors (LoRA factors and head) are kept, so
    :meth:`model` rebuilds any run's classifier.

    """

    def __init__(
        self,
        make_base: Callable[[], GPTClassifier],
        train_loader: DataLoader,
        val_loader: DataLoader,
        *,
        epochs: int,
        device: torch.device | str | None = None,
        seed: int = 123,
        eval_every: int = 50,
    ) -> None:
        self.make_base = make_base
        self.train_loader, self.val_loader = train_loader, val_loader
        self.epochs, self.device, self.seed, self.eval_every = epochs, device, seed, eval_every
        self.runs: dict[tuple, SweepRun] = {}
        self._states: dict[tuple, dict[str, torch.Tensor]] = {}

    @staticmethod
    def _key(layers: str, rank: int, alpha: float, use_rslora: bool, lr: float) -> tuple:
        return (layers, rank, round(scaling(rank, alpha, use_rslora), 9), lr)

    def _prepared(self, layers: str, rank: int, alpha: float, use_rslora: bool) -> GPTClassifier:
        return train.prepare_model(
            self.make_base(),
            "lora",
            rank=rank,
            alpha=alpha,
            targets=_preset(layers),
            use_rslora=use_rslora,
        )

    def run(
        self, layers: str, rank: int, alpha: float, lr: float, *, use_rslora: bool = False
    ) -> SweepRun:
        """Train (or recall) LoRA of ``rank`` and ``alpha`` on ``layers`` (a preset) at ``lr``."""
        key = self._key(layers, rank, alpha, use_rslora, lr)
        if key in self.runs:
            return self.runs[key]
        model = self._prepared(layers, rank, alpha, use_rslora)
        make_optimizer = CountingAdamW(lr)

        history = train.train_classifier(
            model,
            self.train_loader,
            self.val_loader,
            epochs=self.epochs,
            eval_every=self.eval_every,
            device=self.device,
            seed=self.seed,
            progress=False,
            make_optimizer=make_optimizer,
        )
        counts = lora_counts(model)
        result = SweepRun(
            layers=layers,
            rank=rank,
            alpha=alpha,
            use_rslora=use_rslora,
            lr=lr,
            trainable_params=counts[0],
            lora_params=counts[1],
            steps=make_optimizer.steps,
            seconds=sum(history.epoch_seconds),
            val_accuracy=history.val_accuracy[-1],
        )
        self.runs[key] = result
        self._states[key] = {
            k: v.cpu().clone() for k, v in train.trainable_state_dict(model).items()
        }
        return result

    def model(self, run: SweepRun) -> GPTClassifier:
        """A classifier with ``run``'s trained LoRA factors and head, on the CPU."""
        key = self._key(run.layers, run.rank, run.alpha, run.use_rslora, run.lr)
        if key not in self._states:
            raise KeyError(
                f"no run with layers={run.layers!r}, rank={run.rank}, lr={run.lr} in this sweep"
            )
        model = self._prepared(run.layers, run.rank, run.alpha, run.use_rslora)
        model.load_state_dict(self._states[key], strict=False)
        return model

    @property
    def total_steps(self) -> int:
        """Optimizer steps of every run so far."""
        return sum(r.steps for r in self.runs.values())


def _lora_layers(model: nn.Module) -> list[LinearWithLoRA]:
    return [m for m in adapter_layers(model).values() if isinstance(m, LinearWithLoRA)]


def lora_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, of which LoRA factors) of an adapted model."""
    lora_numbers = sum(layer.lora.A.numel() + layer.lora.B.numel() for layer in _lora_layers(model))
    return count_parameters(model).trainable, lora_numbers


# ----------------------------------------------------------------------------- scaling rules
# Three ways to pick alpha when the rank changes, each a multiplier s of the update s * x A B:
# - "fixed alpha": s = alpha / r with one alpha for every rank (the LoRA paper, PEFT's default);
# - "alpha = 2r": s = alpha / r with alpha = 2r, so s = 2 at every rank (a common heuristic);
# - "rsLoRA": s = alpha / sqrt(r) with one alpha for every rank (Kalajdzievski, 2023).

SCALING_RULES: dict[str, str] = {
    "fixed alpha": "s = α/r, α fixed",
    "alpha = 2r": "s = α/r, α = 2r (s = 2)",
    "rsLoRA": "s = α/√r, α fixed",
}


def rule_setting(rule: str, rank: int, alpha: float) -> tuple[float, bool]:
    """``(alpha, use_rslora)`` of ``rule`` (a key of :data:`SCALING_RULES`) at ``rank``.

    ``alpha`` is the fixed alpha of the "fixed alpha" and "rsLoRA" rules; "alpha = 2r" ignores it.
    """
    if rule not in SCALING_RULES:
        raise ValueError(f"unknown scaling rule {rule!r}; choose one of {list(SCALING_RULES)}")
    if rule == "alpha = 2r":
        return 2.0 * rank, False
    return float(alpha), rule == "rsLoRA"


@dataclass(frozen=True)
class SharedRate:
    """How well one learning rate serves several ranks (see :func:`shared_learning_rate`)."""

    lr: float  # the learning rate whose worst rank loses least
    worst_loss: float  # accuracy the worst-served rank loses at ``lr`` against its own best
    best_lrs: dict[int, float]  # each rank's best learning rate (the smallest of a tie)

    @property
    def best_lr_spread(self) -> float:
        """Largest over smallest of the ranks' best learning rates (1: they all agree)."""
        return max(self.best_lrs.values()) / min(self.best_lrs.values())


def shared_learning_rate(accuracy: Mapping[tuple[int, float], float]) -> SharedRate:
    """The one learning rate that serves every rank best, from ``{(rank, lr): accuracy}``.

    Each rank's best accuracy over the learning rates is its target; the shared rate is the one
    whose largest shortfall from those targets, over the ranks, is smallest. Every rank must have
    been run at every learning rate.
    """
    ranks = sorted({rank for rank, _ in accuracy})
    lrs = sorted({lr for _, lr in accuracy})
    missing = [(r, lr) for r in ranks for lr in lrs if (r, lr) not in accuracy]
    if not ranks or missing:
        raise ValueError(f"run every rank at every learning rate; missing (rank, lr): {missing}")
    best = {r: max(accuracy[r, lr] for lr in lrs) for r in ranks}
    best_lrs = {r: min(lr for lr in lrs if accuracy[r, lr] == best[r]) for r in ranks}
    shortfall = {lr: max(best[r] - accuracy[r, lr] for r in ranks) for lr in lrs}
    lr = min(lrs, key=lambda rate: (shortfall[rate], rate))
    return SharedRate(lr=lr, worst_loss=shortfall[lr], best_lrs=best_lrs)


# ----------------------------------------------------------------------------- noise of a score
# One run's accuracy on n validation messages is a proportion measured on n trials; how precisely
# n messages pin it down is a binomial question. Wilson's interval (Wilson, 1927) behaves well
# near 0 and 1, where the textbook normal interval can reach past 100 %.


def accuracy_interval(accuracy: float, total: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's interval (:func:`~lora_tutorial.train.wilson_interval`) of an accuracy on ``total``
    messages."""
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy={accuracy!r} is not a fraction between 0 and 1")
    return train.wilson_interval(round(accuracy * total), total, z)


def clearly_apart(a: float, b: float, total: int, z: float = 1.96) -> bool:
    """Whether accuracies ``a`` and ``b`` on ``total`` messages have disjoint Wilson intervals.

    A deliberately cautious test for one run per setting: a gap this large is unlikely to come
    from which messages happened to land in the validation set.
    """
    low, high = sorted((a, b))
    return accuracy_interval(low, total, z)[1] < accuracy_interval(high, total, z)[0]


__all__ = [
    "LAYER_PRESETS",
    "SCALING_RULES",
    "CountingAdamW",
    "SharedRate",
    "Sweep",
    "SweepRun",
    "accuracy_interval",
    "clearly_apart",
    "lora_counts",
    "lora_params_per_rank",
    "rank_for_budget",
    "rule_setting",
    "scaling",
    "shared_learning_rate",
]
