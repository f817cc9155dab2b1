"""Checks for chapter 3's coding exercises: merging an adapter and freezing everything else."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lora_tutorial import lora
from lora_tutorial.exercises._feedback import call, report


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


def check_freeze(fn: Callable[[nn.Module], object]) -> bool:
    """Check ``fn(model)``: afterwards only the LoRA matrices ``A`` and ``B`` require gradients."""
    model = _Toy()
    _, err = call(fn, model)
    if err:
        return report([f"your function raised {err}"], "")
    problems: list[str] = []
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    expected = sorted(
        name for name, _ in model.named_parameters() if name.endswith(("lora.A", "lora.B"))
    )
    missing = [n for n in expected if n not in trainable]
    extra = [n for n in trainable if n not in expected]
    if missing:
        problems.append(f"these adapter matrices are frozen but must train: {missing}")
    if extra:
        problems.append(f"these parameters still train but should be frozen: {extra}")
    return report(
        problems, f"Only the {len(expected)} adapter matrices train; everything else is frozen."
    )


def check_embedding_lora(cls: Callable[..., nn.Module]) -> bool:
    """Check ``cls(embedding, rank, alpha)``: LoRA for an ``nn.Embedding``.

    The class keeps the embedding as ``.embedding`` (frozen), holds ``.A``
    ``(num_embeddings, rank)``, ``.B`` ``(rank, embedding_dim)`` and ``.scaling = alpha / rank``,
    starts exactly at the embedding, and returns ``embedding(ids) + scaling * A[ids] @ B``.
    """
    torch.manual_seed(0)
    embedding = nn.Embedding(20, 6)
    original = embedding.weight.detach().clone()
    layer, err = call(cls, embedding, 3, 6.0)
    if err:
        return report([f"cls(nn.Embedding(20, 6), 3, 6.0) raised {err}"], "")
    problems: list[str] = []
    ids = torch.tensor([[0, 5, 19], [3, 3, 7]])
    A, B = getattr(layer, "A", None), getattr(layer, "B", None)
    if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor):
        return report(["the layer needs parameters .A and .B"], "")
    if tuple(A.shape) != (20, 3) or tuple(B.shape) != (3, 6):
        problems.append(
            f"A is {tuple(A.shape)} and B {tuple(B.shape)}; expected (20, 3) and (3, 6)"
        )
    if getattr(layer, "scaling", None) != 2.0:
        problems.append("scaling should be alpha / rank = 6.0 / 3 = 2.0")
    out, err = call(layer, ids)
    if err:
        return report([*problems, f"layer(ids) raised {err}"], "")
    if not problems and not torch.equal(out, embedding(ids)):
        problems.append(
            "at the start the layer must return exactly the embedding (start A or B at 0)"
        )
    if embedding.weight.requires_grad:
        problems.append("the embedding's weight still trains; freeze it")
    if not (A.requires_grad and B.requires_grad):
        problems.append("A and B must be trainable")
    if problems:
        return report(problems, "")
    with torch.no_grad():
        A.normal_(generator=torch.Generator().manual_seed(1))
        B.normal_(generator=torch.Generator().manual_seed(2))
    out, err = call(layer, ids)
    expected = original[ids] + 2.0 * A.detach()[ids] @ B.detach()
    if err:
        problems.append(f"with non-zero A and B, layer(ids) raised {err}")
    elif not torch.allclose(out, expected, atol=1e-5):
        problems.append(
            "with non-zero A and B the output is not embedding(ids) + scaling * A[ids] @ B"
        )
    else:
        out.square().sum().backward()
        if A.grad is None or B.grad is None:
            problems.append("no gradient reached A or B")
        elif A.grad[torch.tensor([1, 2, 4])].abs().sum() != 0:
            problems.append("rows of A for ids that were not looked up received gradient")
    return report(
        problems,
        "Each token id picks its own row of A, a rank-r update of the whole embedding matrix. "
        "PEFT's LoRA for embeddings works the same way (there A starts at zero and B at random).",
    )


__all__ = ["check_embedding_lora", "check_freeze"]
