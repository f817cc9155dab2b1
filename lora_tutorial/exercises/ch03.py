"""Checks for chapter 3's coding exercises: LoRA for an embedding, merging an adapter into a plain
`nn.Linear`, and the rsLoRA alpha that reproduces a layer."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lora_tutorial import lora
from lora_tutorial.exercises._feedback import call, report


def _adapted(in_dim: int, out_dim: int, bias: bool, seed: int) -> lora.LinearWithLoRA:
    """A LoRA layer with a random, non-zero ``B``: an adapter as if trained."""
    torch.manual_seed(seed)
    layer = lora.LinearWithLoRA(nn.Linear(in_dim, out_dim, bias=bias), rank=3, alpha=6)
    with torch.no_grad():
        layer.lora.B.normal_()
    return layer


def check_merge_to_linear(fn: Callable[[lora.LinearWithLoRA], nn.Module]) -> bool:
    """Check ``fn(layer)``: a new plain ``nn.Linear`` computing what the LoRA ``layer`` computes,
    with ``layer`` left as it was."""
    problems: list[str] = []
    for in_dim, out_dim, bias in [(12, 7, True), (5, 9, False)]:
        where = f"for a {in_dim} -> {out_dim} layer{'' if bias else ' without bias'}"
        layer = _adapted(in_dim, out_dim, bias, seed=in_dim)
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        x = torch.randn(4, in_dim)
        with torch.no_grad():
            expected = layer(x)
        out, err = call(fn, layer)
        if err:
            problems.append(f"{where} your function raised {err}")
            break
        if type(out) is not nn.Linear:
            problems.append(f"{where} it returned {type(out).__name__}, not a plain nn.Linear")
            break
        if (out.in_features, out.out_features) != (in_dim, out_dim):
            problems.append(
                f"{where} the result maps {out.in_features} -> {out.out_features}; nn.Linear's "
                "weight is (out_dim, in_dim), so the update (A @ B) must be transposed"
            )
            break
        if (out.bias is None) != (not bias):
            problems.append(f"{where} the result {'lacks' if bias else 'adds'} a bias")
            break
        if any(not torch.equal(v, layer.state_dict()[k]) for k, v in before.items()):
            problems.append(f"{where} the LoRA layer's own tensors changed; build a new layer")
            break
        if out.weight.data_ptr() == layer.linear.weight.data_ptr():
            problems.append(f"{where} the result shares its weight with the frozen base layer")
            break
        with torch.no_grad():
            got = out(x)
            base = layer.linear(x)
            no_scaling = base + x @ layer.lora.A @ layer.lora.B
        if not torch.allclose(got, expected, atol=1e-5):
            hint = ""
            if torch.allclose(got, base, atol=1e-5):
                hint = ": the update is missing"
            elif torch.allclose(got, no_scaling, atol=1e-5):
                hint = ": multiply the update by s = layer.lora.scaling"
            problems.append(f"{where} the result's outputs differ from the LoRA layer's{hint}")
            break
    return report(
        problems,
        "One product per layer now: W0 + s (A B)^T, the weight chapter 3's merge computes.",
    )


def check_rslora_alpha(fn: Callable[[float, int], float]) -> bool:
    """Check ``fn(alpha, rank)``: the alpha for which an rsLoRA layer (``s = alpha / sqrt(r)``)
    computes what a plain LoRA layer with ``alpha`` (``s = alpha / r``) computes."""
    problems: list[str] = []
    for alpha, rank in [(16, 4), (8.0, 16), (32, 8)]:
        where = f"for alpha={alpha}, rank={rank}"
        got, err = call(fn, alpha, rank)
        if err:
            problems.append(f"{where} your function raised {err}")
            break
        if type(got) not in (int, float):
            problems.append(f"{where} it returned {type(got).__name__}, not a number")
            break
        expected = alpha / math.sqrt(rank)
        if not abs(got - expected) <= 1e-6 * expected:
            hints = {
                round(alpha * math.sqrt(rank), 6): "that multiplies by sqrt(r); solve "
                "alpha_rs / sqrt(r) = alpha / r for alpha_rs",
                round(alpha / rank, 6): "that is s itself; the rsLoRA layer still divides "
                "its alpha by sqrt(r)",
            }
            hint = hints.get(round(got, 6), "") if math.isfinite(got) else ""
            problems.append(
                f"{where} you returned {got!r}, expected {expected:.4f}"
                + (f" ({hint})" if hint else "")
            )
            break
        torch.manual_seed(rank)
        base = nn.Linear(16, 16)
        plain = lora.LinearWithLoRA(base, rank=rank, alpha=alpha)
        rs = lora.LinearWithLoRA(base, rank=rank, alpha=got, use_rslora=True)
        with torch.no_grad():
            plain.lora.B.normal_()
            rs.lora.load_state_dict(plain.lora.state_dict())
            x = torch.randn(3, 16)
            if not torch.allclose(plain(x), rs(x), atol=1e-5):
                problems.append(f"{where} the two layers' outputs differ")
                break
    return report(
        problems,
        "Same s, same layer: alpha matters only through s.",
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
    scaling = getattr(layer, "scaling", None)
    if type(scaling) is not float or not abs(scaling - 2.0) <= 1e-9:
        problems.append(f"scaling is {scaling!r}; it should be s = alpha / rank = 6.0 / 3 = 2.0")
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


__all__ = ["check_embedding_lora", "check_merge_to_linear", "check_rslora_alpha"]
