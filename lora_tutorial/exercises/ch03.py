"""Checks for chapter 3's coding exercises: LoRA for an embedding, merging an adapter into a plain
`nn.Linear`, and the rsLoRA alpha that reproduces a layer."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lora_tutorial import lora
from lora_tutorial.exercises._feedback import (
    BadData,
    Check,
    Verdict,
    call,
    close,
    field,
    integer,
    outcome,
    outcomes,
    tensor,
    type_name,
)


def _adapted(in_dim: int, out_dim: int, bias: bool, seed: int) -> lora.LinearWithLoRA:
    """A LoRA layer with a random, non-zero ``B``: an adapter as if trained."""
    torch.manual_seed(seed)
    layer = lora.LinearWithLoRA(nn.Linear(in_dim, out_dim, bias=bias), rank=3, alpha=6)
    with torch.no_grad():
        layer.lora.B.normal_()
    return layer


_MERGE_CASES = [(12, 7, True), (5, 9, False)]


def _merge_case(in_dim: int, out_dim: int, bias: bool) -> tuple[lora.LinearWithLoRA, torch.Tensor]:
    """The adapted layer of one case and the inputs its merged layer is tried on."""
    layer = _adapted(in_dim, out_dim, bias, seed=in_dim)
    return layer, torch.randn(4, in_dim)


def _probe_merge_to_linear(fn: Callable[[lora.LinearWithLoRA], nn.Module]) -> list:
    """Per case: what the learner's layer is, its sizes, weight and bias, and the LoRA layer's
    tensors afterwards (to see whether they changed)."""
    seen = []
    for case in _MERGE_CASES:
        layer, _ = _merge_case(*case)
        out, err = call(fn, layer)
        result: dict = {"error": err, "type": type_name(out), "plain": type(out) is nn.Linear}
        result["after"] = dict(layer.state_dict())
        if type(out) is nn.Linear:
            parts, err = call(
                lambda out=out, layer=layer: {
                    "in": out.in_features,
                    "out": out.out_features,
                    "weight": out.weight,
                    "bias": out.bias,
                    "shares": out.weight.data_ptr() == layer.linear.weight.data_ptr(),
                }
            )
            result |= parts or {"error": err}
        seen.append(result)
    return seen


def _judge_merge_to_linear(data: object) -> Verdict:
    if type(data) is not list or len(data) != len(_MERGE_CASES):
        raise BadData(f"expected {len(_MERGE_CASES)} results")
    problems: list[str] = []
    for (in_dim, out_dim, bias), seen in zip(_MERGE_CASES, data):
        where = f"for a {in_dim} -> {out_dim} layer{'' if bias else ' without bias'}"
        layer, x = _merge_case(in_dim, out_dim, bias)
        err = field(seen, "error", str, type(None))
        if err:
            problems.append(f"{where} your function raised {err}")
            break
        kind = field(seen, "type", str)
        if not field(seen, "plain", bool):
            problems.append(f"{where} it returned {kind}, not a plain nn.Linear")
            break
        if (integer(seen.get("in")), integer(seen.get("out"))) != (in_dim, out_dim):
            problems.append(
                f"{where} the result maps {seen.get('in')!r} -> {seen.get('out')!r}; nn.Linear's "
                "weight is (out_dim, in_dim), so the update (A @ B) must be transposed"
            )
            break
        weight, got_bias = tensor(seen.get("weight")), seen.get("bias")
        if got_bias is not None and tensor(got_bias) is None:
            raise BadData("a bias that is neither a tensor nor None")
        if (got_bias is None) != (not bias):
            problems.append(f"{where} the result {'lacks' if bias else 'adds'} a bias")
            break
        after = field(seen, "after", dict)
        before = layer.state_dict()
        if set(after) != set(before) or any(
            not close(after[k], v, 0, 0) for k, v in before.items()
        ):
            problems.append(f"{where} the LoRA layer's own tensors changed; build a new layer")
            break
        if field(seen, "shares", bool):
            problems.append(f"{where} the result shares its weight with the frozen base layer")
            break
        if weight is None or tuple(weight.shape) != (out_dim, in_dim):
            shape = tuple(weight.shape) if weight is not None else type_name(seen.get("weight"))
            problems.append(f"{where} the result's weight is {shape}, expected {(out_dim, in_dim)}")
            break
        with torch.no_grad():
            expected = layer(x)
            base = layer.linear(x)
            no_scaling = base + x @ layer.lora.A @ layer.lora.B
            got = x.double() @ weight.double().T
            if got_bias is not None:
                got = got + got_bias.double()
        if not close(got, expected, atol=1e-5):
            hint = ""
            if close(got, base, atol=1e-5):
                hint = ": the update is missing"
            elif close(got, no_scaling, atol=1e-5):
                hint = ": multiply the update by s = layer.lora.scaling"
            problems.append(f"{where} the result's outputs differ from the LoRA layer's{hint}")
            break
    return (
        problems,
        "One product per layer now: W0 + s (A B)^T, the weight chapter 3's merge computes.",
    )


check_merge_to_linear = Check(_probe_merge_to_linear, _judge_merge_to_linear)
"""Check ``fn(layer)``: a new plain ``nn.Linear`` computing what the LoRA ``layer`` computes, with
``layer`` left as it was."""


_RS_CASES: list[tuple[int | float, int]] = [(16, 4), (8.0, 16), (32, 8)]


def _probe_rslora_alpha(fn: Callable[[float, int], float]) -> list:
    return [call(fn, alpha, rank) for alpha, rank in _RS_CASES]


def _judge_rslora_alpha(data: object) -> Verdict:
    problems: list[str] = []
    for (alpha, rank), (got, err) in zip(_RS_CASES, outcomes(data, len(_RS_CASES))):
        where = f"for alpha={alpha}, rank={rank}"
        if err:
            problems.append(f"{where} your function raised {err}")
            break
        if type(got) not in (int, float):
            problems.append(f"{where} it returned {type_name(got)}, not a number")
            break
        expected = alpha / math.sqrt(rank)
        if not abs(got - expected) <= 1e-6 * expected:  # NaN fails too
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
    return problems, "Same s, same layer: alpha matters only through s."


check_rslora_alpha = Check(_probe_rslora_alpha, _judge_rslora_alpha)
"""Check ``fn(alpha, rank)``: the alpha for which an rsLoRA layer (``s = alpha / sqrt(r)``)
computes what a plain LoRA layer with ``alpha`` (``s = alpha / r``) computes."""


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
        call(lambda: out.square().sum().backward())
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
    scaling = data.get("scaling")
    if type(scaling) is not float or not abs(scaling - 2.0) <= 1e-9:
        problems.append(f"scaling is {scaling!r}; it should be s = alpha / rank = 6.0 / 3 = 2.0")
    out, err = outcome(field(data, "start", tuple))
    if err:
        return [*problems, f"layer(ids) raised {err}"], ""
    original, ids = _embedding().weight.detach(), torch.tensor(_IDS)
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
        elif A_grad[torch.tensor([1, 2, 4])].abs().sum() != 0:  # NaN counts as gradient
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


__all__ = ["check_embedding_lora", "check_merge_to_linear", "check_rslora_alpha"]
