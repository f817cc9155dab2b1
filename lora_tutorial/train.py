"""Training and evaluating the classifier with one of the three fine-tuning methods.

- :func:`prepare_model` (from :mod:`lora_tutorial.methods`, with the default settings
  ``DEFAULT_LR``, ``LORA_RANK``, ...) freezes and adapts a classifier for one method.
- :func:`train_classifier` runs AdamW (or an optimizer you build) epoch by epoch
  (:func:`train_epoch`, one :func:`train_step` per batch) and returns a :class:`History` that
  chapters plot. A loss that is NaN or infinite stops it with :class:`TrainingDiverged`.
- :func:`~lora_tutorial.evaluation.evaluate` gives accuracy, loss, confusion, precision, recall.
- Under ``torchrun`` (:func:`lora_tutorial.distributed.distributed`), :func:`train_classifier`
  trains with ``DistributedDataParallel``.

Batches are ``(input_ids, labels, lengths)`` as :class:`~lora_tutorial.data.SpamDataset` yields.

Rehearsal mode stops each run after ``config.REHEARSAL_TRAIN_STEPS`` steps and each evaluation
after ``config.REHEARSAL_EVAL_BATCHES`` batches. When ``$LORA_TUTORIAL_RECORD`` names a file, every
run (any mode) appends one JSON line to it, e.g.::

    {"mode": "rehearsal", "method": "lora", "steps_done": 2, "full_steps": 470,
     "median_step_seconds": 1.9, "projected_full_seconds": 1012.4, "elapsed_seconds": 9.8,
     "peak_rss_bytes": 2147483648, "cuda_peak_bytes": null, "device": "cpu"}

``method``: :func:`train_classifier`'s ``label`` or null; ``full_steps``: the steps of the same
call in full mode, per process (epochs x batches, or ``max_steps``); ``median_step_seconds``: a
step's median time (batch loading included, warm-up step left out); ``projected_full_seconds``:
that x ``full_steps`` + the measured time per evaluation batch x full mode's evaluation batches;
``peak_rss_bytes``: ``getrusage`` peak RSS; ``cuda_peak_bytes``: peak allocated on CUDA, else null.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from lora_tutorial import config, memory
from lora_tutorial.classify import GPTClassifier
from lora_tutorial.distributed import DistInfo, dist_info, gather, shard_loader, wrap_model
from lora_tutorial.evaluation import (
    Evaluation,
    MethodResult,
    batch_loss,
    batches_read,
    eval_batch_limit,
    evaluate,
    summarize,
)
from lora_tutorial.methods import (
    DEFAULT_LR,
    HEAD,
    LORA_ALPHA,
    LORA_RANK,
    LORA_TARGETS,
    METHODS,
    QUICK_LORA_ALPHA,
    QUICK_LR,
    default_alpha,
    default_lr,
    prepare_model,
    trainable_state_dict,
    weights_digest,
)

# What chapters and the command line use as train.*: this module's own names and, re-exported,
# the methods' settings and setup (lora_tutorial.methods) and the evaluation (.evaluation).
# fmt: off
__all__ = [
    "DEFAULT_LR", "HEAD", "LORA_ALPHA", "LORA_RANK", "LORA_TARGETS", "METHODS", "QUICK_LORA_ALPHA",
    "QUICK_LR", "Evaluation", "History", "MethodResult", "Run", "TrainingDiverged", "default_alpha",
    "default_lr", "evaluate", "prepare_model", "set_seed", "step_limit", "summarize",
    "train_classifier", "train_epoch", "train_step", "trainable_state_dict", "weights_digest",
]
# fmt: on


class TrainingDiverged(ValueError):
    """The training loss became NaN or infinite; the run stopped before any step used that loss."""

    def __init__(self, loss: float, step: int, epoch: int) -> None:
        self.loss = loss
        self.step = step
        self.epoch = epoch
        super().__init__(
            f"training diverged: the loss is {loss} at step {step} (epoch {epoch}); the run "
            "stopped before the optimizer used it. Lower the learning rate (e.g. ten times) "
            "and train again."
        )


# --- training ----------------------------------------------------------------------------------


@dataclass
class History:
    """What a training run recorded, for plots and reports.

    Losses are recorded every ``eval_every`` optimizer steps: ``train_losses`` is the mean loss
    of the training batches since the previous record, ``val_losses`` the loss on the first
    ``eval_batches`` validation batches. Accuracies are per epoch. ``epoch_seconds`` is the
    training time of each epoch without evaluations. ``examples_seen`` counts messages over all
    processes. ``steps_done`` of ``full_steps`` (what full mode runs, per process) ran, at
    ``median_step_seconds`` each; ``projected_full_seconds``: the full run's time at that pace.
    """

    steps: list[int] = field(default_factory=list)
    examples_seen: list[int] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    elapsed_seconds: float = 0.0
    peak_memory_bytes: int = 0
    memory_measure: str = ""
    world_size: int = 1
    steps_done: int = 0
    full_steps: int = 0
    median_step_seconds: float = 0.0
    projected_full_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def set_seed(seed: int) -> None:
    """Seed PyTorch's generators (CPU and every GPU) so a run can be repeated."""
    torch.manual_seed(seed)


@dataclass
class Run:
    """One training run in progress: what it trains with, and what it has counted so far."""

    model: nn.Module  # the model as given; evaluated directly
    net: nn.Module  # what trains: the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    device: torch.device
    info: DistInfo
    val_loader: DataLoader
    eval_every: int
    eval_batches: int | None
    max_steps: int | None  # rehearsal mode's cap included
    progress: bool
    history: History
    step: int = 0
    seen: int = 0
    window: list[float] = field(default_factory=list)  # training losses since the last record
    step_seconds: list[float] = field(default_factory=list)
    eval_seconds: float = 0.0
    eval_batches_read: int = 0
    last_val: tuple[int, int | None, Evaluation] | None = None  # (step, batches, result)

    @property
    def done(self) -> bool:
        return self.max_steps is not None and self.step >= self.max_steps


def checked_loss(loss: torch.Tensor, run: Run, epoch: int) -> float:
    """The loss as a number; :class:`TrainingDiverged` if it (in any process) is not finite."""
    value = loss.item()
    diverged = not math.isfinite(value)
    if run.info.world_size > 1:  # all processes stop together, before the next all-reduce
        flag = torch.tensor(float(diverged), device=run.device)
        dist.all_reduce(flag)
        diverged = flag.item() > 0
    if diverged:
        raise TrainingDiverged(value, step=run.step + 1, epoch=epoch + 1)
    return value


def train_step(run: Run, batch: Sequence[torch.Tensor], epoch: int) -> None:
    """One optimizer step on one batch: forward, backward, check the loss, update."""
    run.optimizer.zero_grad(set_to_none=True)
    loss, _ = batch_loss(run.net, batch, run.device)
    loss.backward()
    value = checked_loss(loss, run, epoch)
    run.optimizer.step()
    run.step += 1
    run.seen += len(batch[1]) * run.info.world_size
    run.window.append(value)


def timed_evaluate(run: Run, loader: DataLoader, num_batches: int | None) -> Evaluation:
    """:func:`evaluate` during training, its time and batches counted for the projection.

    The same model (no step since) on the same batches gives the same result, so a second call
    for the validation loader at one step (its loss, then its accuracy) reuses the first.
    """
    limit, is_val = eval_batch_limit(num_batches), loader is run.val_loader
    if is_val and run.last_val is not None and run.last_val[:2] == (run.step, limit):
        return run.last_val[2]
    start = time.perf_counter()
    result = evaluate(run.model, loader, device=run.device, num_batches=num_batches)
    run.eval_seconds += time.perf_counter() - start
    run.eval_batches_read += batches_read(loader, limit)
    if is_val:
        run.last_val = (run.step, limit, result)
    return result


def record_losses(run: Run) -> None:
    """Add the mean training loss since the last record and the validation loss to the history."""
    train_loss = sum(run.window) / len(run.window)
    if run.info.world_size > 1:
        train_loss = sum(cast(list[float], gather(train_loss))) / run.info.world_size
    history = run.history
    history.steps.append(run.step)
    history.examples_seen.append(run.seen)
    history.train_losses.append(train_loss)
    history.val_losses.append(timed_evaluate(run, run.val_loader, run.eval_batches).loss)
    run.window = []


def record_accuracy(run: Run, train_loader: DataLoader, num_batches: int | None) -> str:
    """Add this epoch's training and validation accuracy to the history; returns a summary line."""
    train_acc = timed_evaluate(run, train_loader, num_batches).accuracy
    val_acc = timed_evaluate(run, run.val_loader, num_batches).accuracy
    run.history.train_accuracy.append(train_acc)
    run.history.val_accuracy.append(val_acc)
    return f"train accuracy {train_acc:.1%}, validation accuracy {val_acc:.1%}"


def train_epoch(run: Run, loader: DataLoader, epoch: int, epochs: int) -> float:
    """One pass over ``loader`` (or until ``run.max_steps``); returns its training seconds.

    A step's time runs from the end of the previous step (or evaluation) to the end of its
    update: loading the batch is included, evaluations are not.
    """
    run.net.train()
    show = run.progress and run.info.is_main
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not show, leave=False)
    first, tick = len(run.step_seconds), time.perf_counter()
    for batch in bar:
        train_step(run, batch, epoch)
        run.step_seconds.append(time.perf_counter() - tick)
        if run.step % run.eval_every == 0 or run.done:
            record_losses(run)
            losses = run.history.train_losses[-1], run.history.val_losses[-1]
            bar.set_postfix(train_loss=f"{losses[0]:.3f}", val_loss=f"{losses[1]:.3f}")
        if run.done:
            break
        tick = time.perf_counter()
    return sum(run.step_seconds[first:])


def _optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None,
) -> torch.optim.Optimizer:
    if make_optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    optimizer = make_optimizer(model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"make_optimizer(model) returned {type(optimizer).__name__}, "
            "not a torch.optim.Optimizer"
        )
    return optimizer


def _check_settings(model: nn.Module, epochs: int, eval_every: int, make_optimizer: object) -> None:
    if epochs < 1 or eval_every < 1:
        raise ValueError(f"epochs={epochs}, eval_every={eval_every}: both must be at least 1")
    if make_optimizer is not None and not callable(make_optimizer):
        raise TypeError(
            "make_optimizer must be a function model -> optimizer, got "
            f"{type(make_optimizer).__name__}; e.g. make_optimizer=lambda m: torch.optim.SGD("
            "[p for p in m.parameters() if p.requires_grad], lr=0.1)"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "no parameter requires a gradient; call prepare_model(model, method) first"
        )


def step_limit(max_steps: int | None) -> int | None:
    """``max_steps`` (None: no limit); in rehearsal mode at most ``REHEARSAL_TRAIN_STEPS``."""
    if not config.is_rehearsal():
        return max_steps
    cap = config.REHEARSAL_TRAIN_STEPS
    return cap if max_steps is None else min(max_steps, cap)


def train_classifier(
    model: GPTClassifier,
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    epochs: int = 5,
    lr: float = DEFAULT_LR["full"],
    weight_decay: float = 0.1,
    eval_every: int = 50,
    eval_batches: int | None = 5,
    accuracy_batches: int | None = None,
    max_steps: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 123,
    progress: bool = True,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    label: str | None = None,
) -> History:
    """Train the parameters of ``model`` that require gradients; return the history.

    The optimizer is AdamW(``lr``, ``weight_decay``) over those parameters, or whatever
    ``make_optimizer(model)`` returns (then ``lr`` and ``weight_decay`` are not used), e.g.
    ``make_optimizer=lambda m: variants.create_loraplus_optimizer(m, lr=1e-4)`` for LoRA+.
    It is called after the model has moved to ``device``. The default ``lr`` suits full
    fine-tuning; pass :func:`default_lr` of the method you prepared (LoRA wants a larger rate).

    Seeds PyTorch and the training loader's shuffle with ``seed``, so the same call gives the
    same result. Per epoch, accuracy is measured on the first ``accuracy_batches`` batches of
    the training and validation loaders (all of them when None). ``max_steps`` stops early
    (quick runs; rehearsal mode: :func:`step_limit`). A NaN or infinite loss raises
    :class:`TrainingDiverged` before the optimizer uses it. On a CUDA GPU with native bf16 the
    forward pass runs under bf16 :func:`autocast`. ``label`` (e.g. the method) names the run in
    its ``$LORA_TUTORIAL_RECORD`` line.

    Under ``torchrun`` (:func:`~lora_tutorial.distributed.distributed`) with several processes,
    the model trains in ``DistributedDataParallel``, each process on its shard of the training
    set (``batch_size`` messages per process and step); only rank 0 shows progress.
    """
    _check_settings(model, epochs, eval_every, make_optimizer)
    info = dist_info()
    device = info.device(None if device is None else str(device))  # torchrun: this process's GPU
    set_seed(seed)
    model.to(device)
    loader, sampler = shard_loader(train_loader, seed)
    run = Run(
        model=model,
        net=wrap_model(model, info, device),
        optimizer=_optimizer(model, lr, weight_decay, make_optimizer),
        device=device,
        info=info,
        val_loader=val_loader,
        eval_every=eval_every,
        eval_batches=eval_batches,
        max_steps=step_limit(max_steps),
        progress=progress,
        history=History(world_size=info.world_size),
    )
    start = time.perf_counter()
    with memory.PeakMemory(device) as peak:
        for epoch in range(epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            run.history.epoch_seconds.append(train_epoch(run, loader, epoch, epochs))
            summary = record_accuracy(run, train_loader, accuracy_batches)
            if progress and info.is_main:
                tqdm.write(f"epoch {epoch + 1}: {summary}")
            if run.done:
                break
    accuracy_read = batches_read(train_loader, accuracy_batches)
    full_counts = memory.full_run_counts(
        len(loader),
        epochs,
        max_steps,
        eval_every,
        eval_batches=batches_read(val_loader, eval_batches),
        accuracy_batches=accuracy_read + batches_read(val_loader, accuracy_batches),
    )
    return _finish(run, peak, time.perf_counter() - start, full_counts, label)


def _finish(
    run: Run,
    peak: memory.PeakMemory,
    elapsed: float,
    full_counts: tuple[int, int],
    label: str | None,
) -> History:
    """Complete the history with times, memory and projection; append the record if one is kept."""
    projection = memory.Projection(
        steps_done=run.step,
        full_steps=full_counts[0],
        median_step_seconds=memory.median_step_seconds(run.step_seconds),
        eval_batches_done=run.eval_batches_read,
        full_eval_batches=full_counts[1],
        eval_seconds_per_batch=run.eval_seconds / max(run.eval_batches_read, 1),
    )
    history = run.history
    history.elapsed_seconds = elapsed
    history.peak_memory_bytes = peak.peak_bytes
    history.memory_measure = peak.measure
    history.steps_done = projection.steps_done
    history.full_steps = projection.full_steps
    history.median_step_seconds = projection.median_step_seconds
    history.projected_full_seconds = projection.projected_full_seconds
    if run.info.is_main:
        memory.record_run(projection, method=label, elapsed_seconds=elapsed, device=run.device)
    return history
