"""Fine-tuning a classifier: the three methods, the training loop, and its train.

- **Methods**: :func:`prepare_model` freezes and adapts a classifier for one of ``METHODS``
  (``"lora"``, ``"full"``, ``"last-block"``); ``DEFAULT_LR``, ``LORA_RANK``, :func:`default_alpha`
  and ``LORA_TARGETS`` are the settings the chapters and the command line share.
- **Evaluation**: :func:`evaluate` gives accuracy, loss, confusion matrix, precision and recall;
  :func:`all_logits` and :func:`predictions` the logits and answers for every message;
  :func:`wilson_interval` how far an accuracy on a test set of n messages may be from the true
  one; :func:`summarize` turns a trained model into one row of a comparison table, and
  :func:`mean_over_seeds` several seeds' rows into one per method.
- **Training**: :func:`train_classifier` runs AdamW (or an optimizer you build) epoch by epoch
  (:func:`train_epoch`, one :func:`train_step` per batch) and returns a :class:`History` that
  chapters plot. A loss that is NaN or infinite stops it with :class:`TrainingDiverged`. Under
  ``torchrun`` it trains with ``DistributedDataParallel``
  (:mod:`lora_tutorial.runtime.distributed`).

Batches are ``(input_ids, labels, lengths)`` as :class:`~lora_tutorial.data.SpamDataset` yields.
In rehearsal mode (:mod:`lora_tutorial.runtime.rehearsal`) a run stops after two steps, an
evaluation after two batches, and every run appends its record and projected full-mode time to
``$LORA_TUTORIAL_RECORD`` when that names a file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from lora_tutorial import counting, gpt, lora
from lora_tutorial.classify import GPTClassifier
from lora_tutorial.gpt import GPTModel
from lora_tutorial.runtime import rehearsal
from lora_tutorial.runtime.checks import check_number
from lora_tutorial.runtime.distributed import DistInfo, dist_info, gather, shard_loader, wrap_model

# --------------------------------------------------------------------------- the three methods

METHODS = ("lora", "full", "last-block")

# Default AdamW learning rates in full mode (GPT-2), shared by the chapters and the command line.
# LoRA gets ten times the rate of the other methods, as is usual: full and last-block fine-tuning
# move pretrained weights, which large steps would damage (5e-5, as chapter 6 of LLMs-from-scratch
# uses), while LoRA's update starts at zero (B = 0) and grows as the product of two small matrices,
# so at that rate it changes the model far more slowly. Hu et al. (2021) trained LoRA with 2e-4 on
# GPT-2 and 4e-4 to 5e-4 on RoBERTa.
DEFAULT_LR = {"lora": 5e-4, "full": 5e-5, "last-block": 5e-5}
# Quick mode, every method: a tiny random model needs large steps to move in a few batches.
QUICK_LR = 1e-3

# LoRA's default rank and alpha in full mode (scaling alpha / rank = 2). Under AdamW the scaling,
# like the learning rate, sets how fast the update grows. Appendix E of LLMs-from-scratch multiplied
# its rank-16 update by alpha = 16 itself and drew A about 7x larger than our PEFT-style init, so
# its update started out much faster than ours even at a tenth of our rate. alpha = 2 * rank narrows
# that gap for a 5-epoch budget and stays within the LoRA authors' settings (their scripts:
# RoBERTa-base rank 8, alpha 16; GPT-2 rank 4, alpha 32). Quick mode keeps alpha = rank: its tiny
# random model already trains at QUICK_LR, and with a doubled scaling chapter 7's quick LoRA+ run
# ended at chance accuracy.
LORA_RANK, LORA_ALPHA, QUICK_LORA_ALPHA = 16, 32, 16

# The linear layers of a transformer block: attention projections and the feed-forward pair.
LORA_TARGETS = ("W_query", "W_key", "W_value", "out_proj", "ff.layers.0", "ff.layers.2")
HEAD = "gpt.out_head"  # the classification head's name in a GPTClassifier


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}; pick one of those names")


def default_lr(method: str, *, quick: bool) -> float:
    """The default learning rate of ``method``: ``DEFAULT_LR[method]``, or ``QUICK_LR`` if quick."""
    _check_method(method)
    return QUICK_LR if quick else DEFAULT_LR[method]


def default_alpha(*, quick: bool) -> float:
    """LoRA's default alpha: ``LORA_ALPHA``, or ``QUICK_LORA_ALPHA`` when ``quick``."""
    return QUICK_LORA_ALPHA if quick else LORA_ALPHA


def prepare_model(
    model: GPTClassifier,
    method: str,
    *,
    rank: int = LORA_RANK,
    alpha: float = LORA_ALPHA,
    targets: tuple[str, ...] = LORA_TARGETS,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> GPTClassifier:
    """Freeze and adapt ``model`` in place for ``method``; returns it.

    - ``"lora"``: the linear layers whose names end with one of ``targets`` (patterns as in
      :func:`~lora_tutorial.lora.replace_linear_with_lora`) become
      :class:`~lora_tutorial.lora.LinearWithLoRA` (rank, alpha, and rsLoRA's scaling if
      ``use_rslora``); only the LoRA matrices and the new classification head are trained.
    - ``"full"``: every weight is trained.
    - ``"last-block"``: the last transformer block, the final norm and the head are trained.

    The head is always trained: it is new and starts from random weights.
    """
    _check_method(method)
    if method == "full":
        model.requires_grad_(True)
        return model
    if method == "last-block":
        model.requires_grad_(False)
        backbone = cast(GPTModel, model.gpt)
        for module in (backbone.trf_blocks[-1], backbone.final_norm, backbone.out_head):
            module.requires_grad_(True)
        return model
    if not targets:
        raise ValueError(
            "targets is empty: name at least one linear layer for LoRA, e.g. ('W_query', 'W_value')"
        )
    lora.replace_linear_with_lora(
        model,
        rank,
        alpha,
        include=list(targets),
        exclude=HEAD,
        dropout=dropout,
        use_rslora=use_rslora,
    )
    lora.mark_only_lora_as_trainable(model, extra_modules=HEAD)
    return model


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that are trained, by name (what a run of a method changes)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer, by name: equal digests mean equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


# --------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    """Scores of a classifier on a loader; ``confusion[i][j]``: true class ``i`` predicted ``j``."""

    accuracy: float
    loss: float
    confusion: list[list[int]]
    precision: list[float]  # per class; 0.0 for a class never predicted
    recall: list[float]  # per class; 0.0 for a class never present
    examples: int


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU with native bf16 (compute capability 8.0+: A100, L4, H100), else fp32.

    Older GPUs such as Colab's T4 (7.5) only emulate bf16, which gains nothing there, so they
    train in float32. (``torch.cuda.is_bf16_supported()`` says True for them: it counts emulation.)
    """
    use_bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def batch_loss(model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of one ``(input_ids, labels, lengths)`` batch; returns ``(loss, logits)``."""
    input_ids, labels, lengths = (t.to(device) for t in batch)
    with autocast(device):
        logits = model(input_ids, lengths)
    return nn.functional.cross_entropy(logits.float(), labels), logits


def batches_read(loader: DataLoader, num_batches: int | None) -> int:
    """How many batches of ``loader`` an evaluation limited to ``num_batches`` reads."""
    return len(loader) if num_batches is None else min(num_batches, len(loader))


def scores(confusion: torch.Tensor, total_loss: float) -> Evaluation:
    """Accuracy, mean loss, precision and recall from a confusion matrix and the summed loss."""
    examples = int(confusion.sum())
    if examples == 0:
        raise ValueError("the loader gave no examples to evaluate (empty data or num_batches=0)")
    correct = confusion.diag().tolist()
    predicted, present = confusion.sum(dim=0).tolist(), confusion.sum(dim=1).tolist()
    return Evaluation(
        accuracy=sum(correct) / examples,
        loss=total_loss / examples,
        confusion=confusion.tolist(),
        precision=[c / p if p else 0.0 for c, p in zip(correct, predicted, strict=True)],
        recall=[c / t if t else 0.0 for c, t in zip(correct, present, strict=True)],
        examples=examples,
    )


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device | None = None,
    num_batches: int | None = None,
) -> Evaluation:
    """Accuracy, mean loss, confusion matrix and per-class precision/recall on ``loader``.

    ``num_batches`` limits the evaluation to the first batches (a quick estimate); rehearsal mode
    reads at most two batches. Runs in :func:`~lora_tutorial.gpt.eval_mode`.
    """
    model = unwrap(model)
    device = device or next(model.parameters()).device
    n = cast(int, model.num_classes)
    confusion = torch.zeros(n, n, dtype=torch.long)
    total_loss = 0.0
    with gpt.eval_mode(model):
        for batch in itertools.islice(loader, rehearsal.eval_batch_limit(num_batches)):
            loss, logits = batch_loss(model, batch, device)
            labels, predicted = batch[1], logits.argmax(dim=-1).cpu()
            confusion += torch.bincount(labels * n + predicted, minlength=n * n).view(n, n)
            total_loss += loss.item() * len(labels)
    return scores(confusion, total_loss)


def all_logits(
    model: nn.Module, loader: DataLoader, *, device: torch.device | None = None
) -> torch.Tensor:
    """The model's logits for every message of ``loader``, in order, as float32 on the CPU.

    Runs in :func:`~lora_tutorial.gpt.eval_mode` and in float32 (no autocast), so that two models
    that should compute the same function can be compared number by number. Rehearsal mode reads
    the first two batches only, as :func:`evaluate` does.
    """
    model = unwrap(model)
    device = device or next(model.parameters()).device
    with gpt.eval_mode(model):
        return torch.cat(
            [
                model(input_ids.to(device), lengths.to(device)).float().cpu()
                for input_ids, _, lengths in itertools.islice(
                    loader, rehearsal.eval_batch_limit(None)
                )
            ]
        )


def predictions(
    model: nn.Module, loader: DataLoader, *, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predicted classes, labels)`` for every message of ``loader``, in order, on the CPU.

    The same messages as :func:`all_logits` reads (in rehearsal mode the first two batches).
    """
    predicted = all_logits(model, loader, device=device).argmax(dim=-1)
    batches = itertools.islice(loader, rehearsal.eval_batch_limit(None))
    return predicted, torch.cat([labels for _, labels, _ in batches]).cpu()


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's interval for an accuracy of ``correct`` out of ``n`` (95 % for ``z`` = 1.96).

    A test set is one sample of messages: another sample of the same size from the same source
    would score a little differently. The interval says how far: with 95 % confidence the accuracy
    on the whole source lies inside it (Wilson 1927). Unlike the textbook interval p +/- z * sd,
    it stays inside [0, 1] and is not zero wide when every message is right.
    """
    for name, value in (("correct", correct), ("n", n)):
        if type(value) is not int:
            raise TypeError(f"{name}={value!r}: give a whole number of messages (an int)")
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"correct={correct}, n={n}: need n >= 1 and 0 <= correct <= n")
    if not (isinstance(z, (int, float)) and z > 0 and math.isfinite(z)):
        raise ValueError(f"z={z!r}: give a positive number, e.g. 1.96 for a 95 % interval")
    p, z2 = correct / n, z * z
    denominator = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


@dataclass
class MethodResult:
    """One method's row in a comparison table."""

    method: str
    trainable_params: int
    total_params: int
    seconds_per_epoch: float
    peak_memory_bytes: int
    memory_measure: str
    val_accuracy: float
    test_accuracy: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(
    method: str, model: nn.Module, history: History, test: Evaluation | None = None
) -> MethodResult:
    """The comparison row for a trained model: parameters, time per epoch, peak memory, accuracy."""
    counts = lora.count_parameters(unwrap(model))
    return MethodResult(
        method=method,
        trainable_params=counts.trainable,
        total_params=counts.total,
        seconds_per_epoch=sum(history.epoch_seconds) / max(len(history.epoch_seconds), 1),
        peak_memory_bytes=history.peak_memory_bytes,
        memory_measure=history.memory_measure,
        val_accuracy=history.val_accuracy[-1] if history.val_accuracy else float("nan"),
        test_accuracy=test.accuracy if test is not None else None,
    )


def mean_over_seeds(results: Sequence[MethodResult]) -> list[MethodResult]:
    """One row per method (in order of first appearance) from runs with several seeds.

    Times and accuracies are the means over the method's runs; the peak memory is the largest.
    """
    rows = []
    for method in dict.fromkeys(r.method for r in results):
        own = [r for r in results if r.method == method]
        tests = [r.test_accuracy for r in own if r.test_accuracy is not None]
        rows.append(
            dataclasses.replace(
                own[0],
                seconds_per_epoch=statistics.mean(r.seconds_per_epoch for r in own),
                peak_memory_bytes=max(r.peak_memory_bytes for r in own),
                val_accuracy=statistics.mean(r.val_accuracy for r in own),
                test_accuracy=statistics.mean(tests) if len(tests) == len(own) else None,
            )
        )
    return rows


# --------------------------------------------------------------------------- training


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
    limit, is_val = rehearsal.eval_batch_limit(num_batches), loader is run.val_loader
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
    check_number("epochs", epochs, integer=True, at_least=1)
    check_number("eval_every", eval_every, integer=True, at_least=1)
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
    (quick runs; a rehearsal stops after two). A NaN or infinite loss raises
    :class:`TrainingDiverged` before the optimizer uses it. On a CUDA GPU with native bf16 the
    forward pass runs under bf16 :func:`autocast`. ``label`` (e.g. the method) names the run in
    its ``$LORA_TUTORIAL_RECORD`` line.

    Under ``torchrun`` (:func:`~lora_tutorial.runtime.distributed.distributed`) with several
    processes,
    the model trains in ``DistributedDataParallel``, each process on its shard of the training
    set (``batch_size`` messages per process and step); only rank 0 shows progress.
    """
    _check_settings(model, epochs, eval_every, make_optimizer)
    info = dist_info()
    device = info.device(None if device is None else str(device))  # torchrun: this process's GPU
    set_seed(seed)
    model.to(device)
    shapes = (
        label,
        _trained_shapes(model),
        len(train_loader),
        epochs,
        max_steps,
        eval_every,
        device,
    )
    measured = rehearsal.repeat_of(shapes)
    if measured is not None:  # a rehearsal has trained these shapes already: count, don't train
        rehearsal.record_repeats(measured, 1, method=label, device=device)
        measured_run = cast(History, measured)
        return dataclasses.replace(
            measured_run, steps_done=0, elapsed_seconds=0.0, epoch_seconds=[]
        )
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
        max_steps=rehearsal.step_limit(max_steps),
        progress=progress,
        history=History(world_size=info.world_size),
    )
    start = time.perf_counter()
    with counting.PeakMemory(device) as peak:
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
    full_counts = rehearsal.full_run_counts(
        len(loader),
        epochs,
        max_steps,
        eval_every,
        eval_batches=batches_read(val_loader, eval_batches),
        accuracy_batches=accuracy_read + batches_read(val_loader, accuracy_batches),
    )
    history = _finish(run, peak, time.perf_counter() - start, full_counts, label)
    rehearsal.remember(shapes, history)
    return history


def _trained_shapes(model: nn.Module) -> tuple:
    """What a training step's cost depends on: the model's size and its trained tensors' shapes."""
    trained = tuple((n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad)
    return sum(p.numel() for p in model.parameters()), trained


def _finish(
    run: Run,
    peak: counting.PeakMemory,
    elapsed: float,
    full_counts: tuple[int, int],
    label: str | None,
) -> History:
    """Complete the history with times, memory and projection; append the record if one is kept."""
    projection = rehearsal.Projection(
        steps_done=run.step,
        full_steps=full_counts[0],
        median_step_seconds=rehearsal.median_step_seconds(run.step_seconds),
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
        rehearsal.record_run(projection, method=label, elapsed_seconds=elapsed, device=run.device)
    return history
