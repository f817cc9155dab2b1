"""Checks for chapter 3's coding exercises: merging an adapter and freezing everything else."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lora_tutorial import lora
from lora_tutorial.exercises._feedback import (
    Check,
    Verdict,
    call,
    close,
    field,
    names,
    near,
    number,
    outcome,
    tensor,
)


class _Toy(nn.Module):
    """Two wrapped layers, one plain layer and a LayerNorm: every kind a freeze must handle."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(8)
        self.body = nn.Sequential(
            lora.LinearWithLoRA(nn.Linear(8, 8), 2, 4),
            nn.ReLU(),
            lora.LinearWithLoRA(nn.Linear(8, 8), 2, 4),
        )
        self.head = nn.Linear(8, 2)


def _trainable(model: nn.Module) -> list[str]:
    return sorted(name for name, p in model.named_parameters() if p.requires_grad)


def _probe_freeze(fn: Callable[[nn.Module], object]) -> tuple:
    model = _Toy()
    _, err = call(fn, model)
    return _trainable(model), err


def _judge_freeze(data: object) -> Verdict:
    listed, err = outcome(data)
    if err:
        return [f"your function raised {err}"], ""
    trainable = names(listed)
    expected = sorted(
        name for name, _ in _Toy().named_parameters() if name.endswith(("lora.A", "lora.B"))
    )
    problems: list[str] = []
    missing = [n for n in expected if n not in trainable]
    extra = [n for n in trainable if n not in expected]
    if missing:
        problems.append(f"these adapter matrices are frozen but must train: {missing}")
    if extra:
        problems.append(f"these parameters still train but should be frozen: {extra}")
    return problems, f"Only the {len(expected)} adapter matrices train; everything else is frozen."


check_freeze = Check(_probe_freeze, _judge_freeze)
"""Check ``fn(model)``: afterwards only the LoRA matrices ``A`` and ``B`` require gradients."""

_IDS = [[0, 5, 19], [3, 3, 7]]


def _embedding() -> nn.Embedding:
    torch.manual_seed(0)
    return nn.Embedding(20, 6)


def _filled(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.empty(shape).normal_(generator=torch.Generator().manual_seed(seed))


def _probe_embedding_lora(cls: Callable[..., nn.Module]) -> dict:
    """What the learner's layer does: built, called at the start, then with random A and B."""
    embedding = _embedding()
    layer, err = call(cls, embedding, 3, 6.0)
    if err:
        return {"init": err}
    A, B = getattr(layer, "A", None), getattr(layer, "B", None)
    seen: dict = {"init": None, "scaling": getattr(layer, "scaling", None)}
    if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor):
        return seen
    ids = torch.tensor(_IDS)
    seen |= {"A": A, "B": B, "A_trains": A.requires_grad, "B_trains": B.requires_grad}
    seen["start"] = call(layer, ids)
    seen["embedding_trains"] = embedding.weight.requires_grad
    with torch.no_grad():
        A.normal_(generator=torch.Generator().manual_seed(1))
        B.normal_(generator=torch.Generator().manual_seed(2))
    out, err = call(layer, ids)
    seen["random"] = (out, err)
    if isinstance(out, torch.Tensor) and out.requires_grad:
        out.square().sum().backward()
        seen["A_grad"], seen["B_grad"] = A.grad, B.grad
    return seen


def _judge_embedding_lora(data: object) -> Verdict:
    init = field(data, "init", str, type(None))
    if init:
        return [f"cls(nn.Embedding(20, 6), 3, 6.0) raised {init}"], ""
    assert isinstance(data, dict)  # field() checked it
    A, B = tensor(data.get("A")), tensor(data.get("B"))
    if A is None or B is None:
        return ["the layer needs parameters .A and .B"], ""
    problems: list[str] = []
    if tuple(A.shape) != (20, 3) or tuple(B.shape) != (3, 6):
        problems.append(
            f"A is {tuple(A.shape)} and B {tuple(B.shape)}; expected (20, 3) and (3, 6)"
        )
    if not near(number(data.get("scaling")), 2.0, tol=0.0):
        problems.append("scaling should be alpha / rank = 6.0 / 3 = 2.0")
    out, err = outcome(field(data, "start", tuple))
    if err:
        return [*problems, f"layer(ids) raised {err}"], ""
    embedding, ids = _embedding(), torch.tensor(_IDS)
    original = embedding.weight.detach()
    if not problems and not close(out, original[ids], atol=0.0, rtol=0.0):
        problems.append(
            "at the start the layer must return exactly the embedding (start A or B at 0)"
        )
    if field(data, "embedding_trains", bool):
        problems.append("the embedding's weight still trains; freeze it")
    if not (field(data, "A_trains", bool) and field(data, "B_trains", bool)):
        problems.append("A and B must be trainable")
    if problems:
        return problems, ""
    out, err = outcome(field(data, "random", tuple))
    expected = original[ids] + 2.0 * _filled((20, 3), 1)[ids] @ _filled((3, 6), 2)
    if err:
        problems.append(f"with non-zero A and B, layer(ids) raised {err}")
    elif not close(out, expected):
        problems.append(
            "with non-zero A and B the output is not embedding(ids) + scaling * A[ids] @ B"
        )
    else:
        A_grad, B_grad = tensor(data.get("A_grad")), tensor(data.get("B_grad"))
        if A_grad is None or B_grad is None or tuple(A_grad.shape) != (20, 3):
            problems.append("no gradient reached A or B")
        elif A_grad[torch.tensor([1, 2, 4])].abs().sum() != 0:
            problems.append("rows of A for ids that were not looked up received gradient")
    return (
        problems,
        "Each token id picks its own row of A, a rank-r update of the whole embedding matrix. "
        "PEFT's LoRA for embeddings works the same way (there A starts at zero and B at random).",
    )


check_embedding_lora = Check(_probe_embedding_lora, _judge_embedding_lora)
"""Check ``cls(embedding, rank, alpha)``: LoRA for an ``nn.Embedding``.

The class keeps the embedding as ``.embedding`` (frozen), holds ``.A`` ``(num_embeddings, rank)``,
``.B`` ``(rank, embedding_dim)`` and ``.scaling = alpha / rank``, starts exactly at the embedding,
and returns ``embedding(ids) + scaling * A[ids] @ B``.
"""


__all__ = ["check_embedding_lora", "check_freeze"]
