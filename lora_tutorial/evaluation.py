"""Evaluating a classifier: accuracy, loss, confusion matrix, precision and recall on a loader,
and the row that compares one trained method with the others (:func:`summarize`).

:func:`evaluate` runs the model in :func:`~lora_tutorial.gpt.eval_mode` on ``(input_ids, labels,
lengths)`` batches; :func:`batch_loss` and :func:`autocast` are shared with the training loop in
:mod:`lora_tutorial.train`. In rehearsal mode an evaluation reads at most
``config.REHEARSAL_EVAL_BATCHES`` batches.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import asdict, dataclass
from typing import Protocol, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from lora_tutorial import config, gpt, lora


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


def eval_batch_limit(num_batches: int | None) -> int | None:
    """The batches an evaluation reads: ``num_batches`` (None: all); in rehearsal mode at most
    ``config.REHEARSAL_EVAL_BATCHES``."""
    if not config.is_rehearsal():
        return num_batches
    cap = config.REHEARSAL_EVAL_BATCHES
    return cap if num_batches is None else min(num_batches, cap)


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
    reads at most ``config.REHEARSAL_EVAL_BATCHES``. Runs in :func:`~lora_tutorial.gpt.eval_mode`.
    """
    model = unwrap(model)
    device = device or next(model.parameters()).device
    n = cast(int, model.num_classes)
    confusion = torch.zeros(n, n, dtype=torch.long)
    total_loss = 0.0
    with gpt.eval_mode(model):
        for batch in itertools.islice(loader, eval_batch_limit(num_batches)):
            loss, logits = batch_loss(model, batch, device)
            labels, predicted = batch[1], logits.argmax(dim=-1).cpu()
            confusion += torch.bincount(labels * n + predicted, minlength=n * n).view(n, n)
            total_loss += loss.item() * len(labels)
    return scores(confusion, total_loss)


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


class TrainingHistory(Protocol):
    """What :func:`summarize` reads from a :class:`lora_tutorial.train.History`."""

    epoch_seconds: list[float]
    peak_memory_bytes: int
    memory_measure: str
    val_accuracy: list[float]


def summarize(
    method: str, model: nn.Module, history: TrainingHistory, test: Evaluation | None = None
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
