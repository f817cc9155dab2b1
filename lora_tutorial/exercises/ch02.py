"""Checks for chapter 2's exercises: predict a model's trainable parameters, the bytes another
optimizer keeps, and how the activations grow with the batch; each check then measures."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lora_tutorial import classify, counting, gpt, lora
from lora_tutorial.exercises._feedback import Check, Verdict, type_name

RANK = 8  # the adapters' rank in the counting exercise


def _is_number(value: object) -> bool:
    """An int or a float, not a bool, not a subclass, not a tensor."""
    return type(value) in (int, float)


def tiny_lora_classifier(rank: int = RANK) -> nn.Module:
    """The ``tiny`` GPT as a 2-class classifier, LoRA of ``rank`` on every block layer, head
    trained fully: chapter 2's measured LoRA model at the smallest shapes."""
    torch.manual_seed(0)
    model = classify.GPTClassifier(gpt.GPTModel("tiny"), num_classes=2)
    lora.replace_linear_with_lora(model, rank=rank, alpha=2 * rank, exclude="out_head")
    lora.mark_only_lora_as_trainable(model, extra_modules="gpt.out_head")
    return model


def _judge_trainable_prediction(prediction: object) -> Verdict:
    counted = lora.count_parameters(tiny_lora_classifier()).trainable
    if type(prediction) is not int:
        return [f"give the count as a whole number (an int), got {type_name(prediction)}"], ""
    if prediction == counted:
        return [], f"The model trains {counted:,} parameters, as you predicted."
    cfg = gpt.GPT_CONFIGS["tiny"]
    d, layers = cfg["emb_dim"], cfg["n_layers"]
    adapters = layers * RANK * (4 * 2 * d + 2 * 5 * d)
    hints = {
        adapters: "that counts the adapters; the new 2-class head trains fully too",
        adapters + 2 * d: "the head's bias (one number per class) trains too",
        layers * RANK * 4 * 2 * d + 2 * d + 2: "the feed-forward layers (d -> 4d -> d) have "
        "adapters too",
        layers * RANK * 2 * 2 * d + 2 * d + 2: "LoRA is on every linear layer of the blocks, "
        "not only query and value",
        layers * RANK * 6 * 2 * d + 2 * d + 2: "the feed-forward layers are d x 4d and 4d x d, "
        "not d x d",
    }
    return [
        f"you predicted {prediction:,}, the model trains {counted:,}"
        + (f" ({hints[prediction]})" if prediction in hints else "")
    ], ""


check_trainable_prediction = Check.on_value(_judge_trainable_prediction)
"""Check a prediction of ``tiny_lora_classifier()``'s trainable parameters, then count them."""


def sgd_exercise_model() -> nn.Module:
    """A frozen 256 -> 256 layer with a rank-8 adapter, then a trained 256 -> 4 head."""
    torch.manual_seed(0)
    base = nn.Linear(256, 256).requires_grad_(False)
    return nn.Sequential(lora.LinearWithLoRA(base, rank=8, alpha=16), nn.ReLU(), nn.Linear(256, 4))


def _judge_sgd_state_prediction(prediction: object) -> Verdict:
    model = sgd_exercise_model()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trained, lr=0.1, momentum=0.9)
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    model(x).square().mean().backward()
    optimizer.step()
    measured = counting.measured_state_bytes(model, optimizer).total
    if not _is_number(prediction):
        return [f"give a number of bytes, got {type_name(prediction)}"], ""
    assert isinstance(prediction, (int, float))  # for mypy: _is_number checked the exact type
    if prediction == measured:
        return [], f"After one step the model and SGD hold {measured:,} bytes, as predicted."
    n_total, n_trained = lora.count_parameters(model)
    hints: dict[float, str] = {
        4 * (n_total + 3 * n_trained): "that is AdamW's state (two moments); SGD with momentum "
        "keeps one buffer per trained number",
        4 * (n_total + n_trained): "SGD with momentum keeps a buffer per trained number",
        4 * (n_total + 2 * n_total): "frozen weights have no gradient and no momentum buffer",
        n_total + 2 * n_trained: "that counts numbers; each float32 number takes 4 bytes",
    }
    return [
        f"you predicted {prediction:,} bytes, measured {measured:,}"
        + (f" ({hints[prediction]})" if prediction in hints else "")
    ], ""


check_sgd_state_prediction = Check.on_value(_judge_sgd_state_prediction)
"""Check a prediction of the float32 bytes that weights, gradients and SGD-with-momentum's state
hold after one step of ``sgd_exercise_model()``; the judge runs that step and measures them."""


def _activation_bytes(model: nn.Module, batch: int, n_tokens: int = 32) -> int:
    generator = torch.Generator().manual_seed(batch)
    vocab = gpt.GPT_CONFIGS["tiny"]["vocab_size"]
    tokens = torch.randint(vocab, (batch, n_tokens), generator=generator)
    labels = torch.randint(2, (batch,), generator=generator)
    with counting.count_saved_activations(model) as saved:
        loss = F.cross_entropy(model(tokens), labels)
    loss.backward()
    return saved["bytes"]


def _judge_activation_growth(prediction: object) -> Verdict:
    model = tiny_lora_classifier(rank=16)
    measured = _activation_bytes(model, 16) / _activation_bytes(model, 8)
    if not _is_number(prediction):
        return [f"give the ratio as a number, got {type_name(prediction)}"], ""
    assert isinstance(prediction, (int, float))  # for mypy: _is_number checked the exact type
    if not math.isfinite(prediction) or not abs(prediction - measured) <= 0.1 * measured:
        hint = ""
        if abs(prediction - 1) <= 0.1:
            hint = " (the state does not grow with the batch, but every activation does)"
        return [f"you predicted {prediction:g}, measured {measured:.2f}{hint}"], ""
    return (
        [],
        f"Measured: {measured:.2f} times. Every saved activation has one row per example, so "
        "doubling the batch doubles them, for LoRA as for full fine-tuning.",
    )


check_activation_growth = Check.on_value(_judge_activation_growth)
"""Check a prediction of how many times more activation bytes the LoRA classifier saves at batch
16 than at batch 8 (32 tokens each); the judge measures both."""


__all__ = [
    "check_activation_growth",
    "check_sgd_state_prediction",
    "check_trainable_prediction",
    "sgd_exercise_model",
    "tiny_lora_classifier",
]
