"""Checks for chapter 5 (fine-tuning GPT-2 with LoRA): the evaluation loop, the training step and
the last-block method, each compared with what the package computes."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_tutorial.classify import GPTClassifier
from lora_tutorial.data import PAD_TOKEN_ID
from lora_tutorial.exercises._feedback import (
    BadData,
    Check,
    Verdict,
    call,
    close,
    field,
    names,
    outcome,
    type_name,
)
from lora_tutorial.gpt import GPT_CONFIGS, GPTModel
from lora_tutorial.train import evaluate, prepare_model


def _tiny_classifier(drop_rate: float = 0.0, seed: int = 0) -> GPTClassifier:
    """A tiny GPT with a two-class head, shaped like the chapter's model."""
    torch.manual_seed(seed)
    return GPTClassifier(GPTModel({**GPT_CONFIGS["tiny"], "drop_rate": drop_rate}))


def _messages(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` right-padded random messages of 2 to 8 tokens: ``(input_ids, lengths)``."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (n,), generator=gen)
    ids = torch.randint(0, 50000, (n, 8), generator=gen)
    ids[torch.arange(8) >= lengths[:, None]] = PAD_TOKEN_ID
    return ids, lengths


def _accuracy_data(model: GPTClassifier) -> DataLoader:
    """Ten messages in batches of 4, 4 and 2, labelled so that the model gets 7 of them right
    (two wrong in the first batch, one in the last: a mean of batch accuracies is not 0.7)."""
    ids, lengths = _messages(10, seed=1)
    model.eval()
    with torch.no_grad():
        labels = model(ids, lengths).argmax(-1)
    labels[[0, 1, 8]] = 1 - labels[[0, 1, 8]]
    return DataLoader(TensorDataset(ids, labels, lengths), batch_size=4)


def _accuracy_case() -> tuple[GPTClassifier, DataLoader]:
    """The small model with dropout, and its loader; the model in training mode, as after
    training."""
    model = _tiny_classifier(drop_rate=0.5)
    loader = _accuracy_data(model)
    return model.train(), loader


def _probe_accuracy(accuracy: Callable[[nn.Module, DataLoader], float]) -> tuple:
    """Two calls, each on the model in training mode: dropout left on shows as two answers."""
    model, loader = _accuracy_case()
    first = call(accuracy, model, loader)
    return first, call(accuracy, model.train(), loader)


def _judge_accuracy(data: object) -> Verdict:
    if type(data) is not tuple or len(data) != 2:
        raise BadData("expected two results")
    (got, err), (again, _) = outcome(data[0]), outcome(data[1])
    if err:
        return [f"your function raised {err}"], ""
    model, loader = _accuracy_case()
    want = evaluate(model, loader).accuracy
    problems: list[str] = []
    if type(got) is not float:
        problems.append(
            f"return the accuracy as a Python float (e.g. correct / total), not {type_name(got)}"
        )
    elif not abs(got - want) <= 1e-9:
        model.eval()
        with torch.no_grad():
            right = [(model(i, n).argmax(-1) == y).float() for i, y, n in loader]
            at_last = [(model(i).argmax(-1) == y).float() for i, y, _ in loader]
        batch_mean = sum(r.mean().item() for r in right) / len(right)
        unpooled = torch.cat(at_last).mean().item()
        if math.isfinite(got) and again != got:
            problems.append(
                "two calls gave different answers: dropout is still on. Call model.eval() "
                "before predicting"
            )
        elif abs(got - unpooled) <= 1e-9:
            problems.append(
                "you called the model without lengths, so it read position -1, a padding token "
                "for most messages: model(input_ids, lengths)"
            )
        elif abs(got - batch_mean) <= 1e-9:
            problems.append(
                "that is the mean of the batches' accuracies; the last batch is smaller, so "
                "count correct messages and divide by all messages"
            )
        else:
            problems.append(f"you return {got:.4f}; the classifier gets {want:.4f} right")
    return problems, "the same accuracy as train.evaluate, message by message."


check_accuracy = Check(_probe_accuracy, _judge_accuracy)
"""Check ``accuracy(model, loader)``: the share of messages the classifier gets right.

The loader yields ``(input_ids, labels, lengths)``; the answer must equal
``train.evaluate(model, loader).accuracy`` on a small model that has dropout.
"""


def _reference_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch) -> float:
    input_ids, labels, lengths = batch
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(input_ids, lengths), labels)
    loss.backward()
    optimizer.step()
    return loss.item()


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """The same number of tensors, pairwise of one shape and within 1e-6 (NaN never is)."""
    return len(a) == len(b) and all(close(x, y, atol=1e-6, rtol=1e-5) for x, y in zip(a, b))


def _step_case() -> tuple[nn.Module, torch.optim.Optimizer, list[tuple]]:
    """A small LoRA classifier, its AdamW and three batches: built alike by probe and judge."""
    model = prepare_model(_tiny_classifier(), "lora", rank=2, alpha=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = []
    for seed in (2, 3, 4):
        ids, lengths = _messages(4, seed)
        batches.append((ids, torch.tensor([0, 1, 1, 0]), lengths))
    return model, optimizer, batches


def _probe_train_step(
    train_step: Callable[[nn.Module, torch.optim.Optimizer, tuple], float],
) -> list:
    """Per step: what the learner's step returned, and the trainable parameters after it."""
    model, optimizer, batches = _step_case()
    return [
        {"loss": call(train_step, model, optimizer, batch), "params": _trainable(model)}
        for batch in batches
    ]


def _params(value: object) -> list[torch.Tensor]:
    if type(value) is not list or not all(type(t) is torch.Tensor for t in value):
        raise BadData("expected a list of tensors")
    return value


def _judge_train_step(data: object) -> Verdict:
    ours, optimizer, batches = _step_case()
    if type(data) is not list or len(data) != len(batches):
        raise BadData(f"expected {len(batches)} steps")
    start = _trainable(ours)
    with torch.no_grad():  # what a first step that forgets the lengths would report
        unpooled = nn.functional.cross_entropy(ours(batches[0][0]), batches[0][1]).item()
    problems: list[str] = []
    for step, (batch, seen) in enumerate(zip(batches, data), 1):
        want = _reference_step(ours, optimizer, batch)
        got, err = outcome(field(seen, "loss", tuple))
        theirs = _params(field(seen, "params", list))
        if err:
            problems.append(f"your function raised {err}")
            break
        if type(got) is not float:
            problems.append(
                f"return the loss as a Python float (loss.item()), not {type_name(got)}"
            )
            break
        if not abs(got - want) <= 1e-5:  # NaN fails too
            hint = (
                "call the model with the lengths, model(input_ids, lengths), so it reads each "
                "message's last real token"
                if step == 1 and abs(got - unpooled) <= 1e-5
                else "the loss is the cross-entropy of the model's logits and the labels"
            )
            problems.append(f"step {step}: your loss is {got:.5f}, expected {want:.5f}; {hint}")
            break
        if not _same(theirs, _trainable(ours)):
            if _same(theirs, start):
                problems.append(
                    "the parameters did not change: call loss.backward(), then optimizer.step()"
                )
            elif step > 1:
                problems.append(
                    f"step {step} moved the parameters differently: gradients add up from step "
                    "to step unless you clear them, so call optimizer.zero_grad() in every step"
                )
            else:
                problems.append("step 1 moved the parameters differently from AdamW's step")
            break
    return problems, "forward, loss, backward, step: the heart of train.train_classifier."


check_train_step = Check(_probe_train_step, _judge_train_step)
"""Check ``train_step(model, optimizer, batch)``: one optimizer step; returns the loss.

``batch`` is ``(input_ids, labels, lengths)``. Three steps must change the trainable parameters
exactly as forward, cross-entropy, backward and AdamW's step do, from fresh gradients each time.
"""


def _probe_last_block(freeze_fn: Callable[[nn.Module], None]) -> tuple:
    """The names of the parameters that require gradients after ``freeze_fn``, and its error."""
    model = _tiny_classifier()  # a tiny GPT with a two-class head, like the chapter's model
    _, err = call(freeze_fn, model)
    return [n for n, p in model.named_parameters() if p.requires_grad], err


def _judge_last_block(data: object) -> Verdict:
    listed, err = outcome(data)
    if err:
        return [f"your function raised {err}"], ""
    trainable = set(names(listed))
    model = _tiny_classifier()
    last = len(model.gpt.trf_blocks) - 1
    wanted_prefixes = (f"gpt.trf_blocks.{last}.", "gpt.final_norm.", "gpt.out_head.")
    every = [name for name, _ in model.named_parameters()]
    wrong_frozen = [n for n in every if n.startswith(wanted_prefixes) and n not in trainable]
    wrong_trainable = [n for n in every if not n.startswith(wanted_prefixes) and n in trainable]
    unknown = sorted(trainable - set(every))
    problems: list[str] = []
    if wrong_frozen:
        problems.append(f"these should be trainable but are frozen: {_few(wrong_frozen)}")
    if wrong_trainable or unknown:
        problems.append(
            f"these should be frozen but are trainable: {_few(wrong_trainable + unknown)}"
        )
    return problems, "only the last block, the final LayerNorm and the new head will learn."


check_last_block = Check(_probe_last_block, _judge_last_block)
"""Check ``freeze_fn(model)`` leaves exactly the last block, final norm and head trainable.

``model`` is a :class:`~lora_tutorial.classify.GPTClassifier`; the backbone is ``model.gpt``.
"""


def _few(names: list[str], k: int = 4) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")
