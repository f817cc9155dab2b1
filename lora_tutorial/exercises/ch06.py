"""Checks for chapter 6 (adapters: store, swap, merge)."""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lora_tutorial.adapters import save_adapter
from lora_tutorial.classify import GPTClassifier
from lora_tutorial.exercises._feedback import (
    BadData,
    Check,
    Other,
    Verdict,
    call,
    close,
    field,
    outcomes,
    type_name,
)
from lora_tutorial.gpt import GPT_CONFIGS, GPTModel
from lora_tutorial.lora import merge_lora
from lora_tutorial.train import prepare_model


def _tiny_lora_classifier(seed: int = 0) -> nn.Module:
    """A tiny GPT classifier with rank-2 LoRA on every attention and feed-forward layer."""
    torch.manual_seed(seed)
    return prepare_model(GPTClassifier(GPTModel("tiny")), "lora", rank=2, alpha=4)


def _random_adapter(
    model: nn.Module, keep: Callable[[str], bool], seed: int
) -> dict[str, torch.Tensor]:
    """Random values for the trainable tensors whose names pass ``keep`` (an adapter, as
    ``read_adapter`` returns it)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: 0.2 * torch.randn(p.shape, generator=gen)
        for name, p in model.named_parameters()
        if p.requires_grad and keep(name)
    }


def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(tokens)


def _adapter_case() -> tuple[nn.Module, dict, dict, torch.Tensor]:
    """A model, its old adapter, a new one covering only query, value and head, and tokens."""
    base = _tiny_lora_classifier()
    old = _random_adapter(base, lambda name: True, seed=1)
    new = _random_adapter(
        base, lambda name: "W_query" in name or "W_value" in name or "out_head" in name, seed=2
    )
    tokens = torch.randint(0, 50257, (3, 9), generator=torch.Generator().manual_seed(3))
    return base, old, new, tokens


def _probe_use_adapter(use_adapter: Callable[[nn.Module, dict[str, torch.Tensor]], object]) -> list:
    """The logits after the learner's switch, on an unmerged and on a merged model."""
    base, old, new, tokens = _adapter_case()
    results = []
    for merged in (False, True):
        model = copy.deepcopy(base)
        model.load_state_dict(old, strict=False)
        if merged:
            merge_lora(model)

        def switch_and_run(model: nn.Module = model) -> torch.Tensor:
            use_adapter(model, {k: v.clone() for k, v in new.items()})
            return _logits(model, tokens)

        results.append(call(switch_and_run))
    return results


def _judge_use_adapter(data: object) -> Verdict:
    base, _, new, tokens = _adapter_case()
    base.load_state_dict(new, strict=False)  # B starts at zero: uncovered layers add nothing
    want = _logits(base, tokens)
    problems: list[str] = []
    for merged, (got, err) in zip((False, True), outcomes(data, 2)):
        if err:
            problems.append(
                f"with a{' merged' if merged else 'n unmerged'} model your function raised {err}"
            )
            break
        if not close(got, want, atol=1e-5, rtol=1e-5):
            if merged:
                problems.append(
                    "on a merged model the old update stays folded into the weights: "
                    "unmerge (unmerge_lora) before switching"
                )
            else:
                problems.append(
                    "the layers the new adapter does not cover still apply the old adapter: "
                    "reset every LoRA layer (B to zero) before copying the new tensors"
                )
            break
    return (
        problems,
        "the model now computes the base plus the new adapter, and nothing of the old one.",
    )


check_use_adapter = Check(_probe_use_adapter, _judge_use_adapter)
"""Check ``use_adapter(model, adapter)`` puts exactly ``adapter`` on a model that has another.

Layers that the new adapter does not cover must compute the base model again (their LoRA update
reset to zero), and a merged model must be unmerged before the switch.
"""


def _trained_adapter(model: nn.Module, seed: int) -> None:
    """Give every trainable tensor of ``model`` random values, as if it had been trained."""
    with torch.no_grad():
        for name, value in _random_adapter(model, lambda name: True, seed).items():
            model.get_parameter(name).copy_(value)


def _save_case() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A trained LoRA classifier, a fresh copy of it before training, and tokens."""
    trained = _tiny_lora_classifier()
    fresh = copy.deepcopy(trained)  # the same base and LoRA layers, before training
    _trained_adapter(trained, seed=5)
    tokens = torch.randint(0, 50257, (3, 9), generator=torch.Generator().manual_seed(6))
    return trained, fresh, tokens


def _read_saved(path: str, trainable: set[str]) -> dict:
    """What a file holds: every tensor's name, the values of the trained tensors, and the
    metadata's ``rank`` and ``alpha``."""
    with safe_open(path, "pt") as f:
        keys = sorted(f.keys())
        metadata = f.metadata() or {}
        values = {k: f.get_tensor(k) for k in keys if k in trainable}
    return {
        "names": keys,
        "tensors": values,
        "metadata": {k: metadata.get(k) for k in ("rank", "alpha")},
    }


def _probe_save_lora(save_lora: Callable[[nn.Module, str], object]) -> dict:
    """The learner's function writes the trained model's adapter; this reads the file back."""
    trained, _, _ = _save_case()
    trainable = {name for name, p in trained.named_parameters() if p.requires_grad}
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "adapter.safetensors")
        _, err = call(save_lora, trained, path)
        if err:
            return {"error": err}
        try:
            return {"error": None, "read": None, **_read_saved(path, trainable)}
        except Exception as exc:  # no file, or not safetensors
            return {"error": None, "read": type(exc).__name__}


def _judge_save_lora(data: object) -> Verdict:
    err = field(data, "error", str, type(None))
    if err:
        return [f"your function raised {err}"], ""
    read = field(data, "read", str, type(None))
    if read:
        return [
            f"could not read adapter.safetensors as safetensors ({read}): "
            "write it with safetensors.torch.save_file(tensors, path, metadata=...)"
        ], ""
    listed, tensors = field(data, "names", list), field(data, "tensors", dict)
    metadata = field(data, "metadata", dict)
    if not all(type(n) is str for n in listed) or not set(tensors) <= set(listed):
        raise BadData("tensors that the file's names do not list")
    trained, fresh, tokens = _save_case()
    want = _logits(trained, tokens)
    trainable = {name for name, p in trained.named_parameters() if p.requires_grad}
    problems: list[str] = []
    frozen = sorted(set(listed) - trainable)
    missing = sorted(trainable - set(listed))
    if frozen:
        problems.append(
            f"the file holds frozen tensors, which every copy of the base has already: "
            f"{', '.join(frozen[:3])}{' ...' if len(frozen) > 3 else ''}"
        )
    if missing:
        problems.append(
            f"the file lacks trained tensors: {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''} (the new head is trained too)"
        )
    for key, value in (("rank", 2.0), ("alpha", 4.0)):
        text = metadata.get(key)
        try:
            ok = type(text) is str and float(text) == value
        except ValueError:
            ok = False
        if not ok:
            problems.append(
                f"the metadata should say {key} (here {value:g}), as a string: without it "
                "nobody can rebuild the LoRA layers the tensors belong to"
            )
    if problems:
        return problems, ""
    if set(tensors) != trainable:
        raise BadData("the trained tensors' values are missing")
    odd = sorted(k for k, t in tensors.items() if type(t) is not torch.Tensor)
    if odd:
        return [f"{odd[0]} is not a tensor of a dtype torch can load into the model"], ""
    try:
        fresh.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        return [f"the file's tensors do not fit the model: {str(exc)[:200]}"], ""
    if not torch.equal(_logits(fresh, tokens), want):
        problems.append("the reloaded model's logits differ from the trained model's")
    return (
        problems,
        "a fresh base with the same LoRA layers plus this file is the trained model, exactly.",
    )


check_save_lora = Check(_probe_save_lora, _judge_save_lora)
"""Check ``save_lora(model, path)`` writes a safetensors file with what was trained.

The file must hold exactly the trainable tensors by their state-dict names (the LoRA matrices and
the head), with ``rank`` and ``alpha`` in its metadata; loading it into a fresh copy of the base
model with the same LoRA layers must give identical logits.
"""


def _targets_file(folder: Path, targets: tuple[str, ...], rank: int, seed: int) -> Path:
    torch.manual_seed(seed)
    model = prepare_model(
        GPTClassifier(GPTModel("tiny")), "lora", rank=rank, alpha=rank, targets=targets
    )
    return save_adapter(model, folder / f"adapter-{seed}.safetensors", extra_modules="gpt.out_head")


_TARGET_CASES = ((("W_query", "W_value"), 3, 1), (("ff.layers.0",), 5, 2))


def _probe_adapter_targets(adapter_targets: Callable[[str], dict[str, int]]) -> list:
    """The learner's answers for two adapter files the package writes."""
    with tempfile.TemporaryDirectory() as name:
        return [
            call(adapter_targets, str(_targets_file(Path(name), targets, rank, seed)))
            for targets, rank, seed in _TARGET_CASES
        ]


def _judge_adapter_targets(data: object) -> Verdict:
    problems: list[str] = []
    blocks = range(GPT_CONFIGS["tiny"]["n_layers"])
    for (targets, rank, _), (got, err) in zip(_TARGET_CASES, outcomes(data, len(_TARGET_CASES))):
        want = {
            f"gpt.trf_blocks.{b}.{'' if t.startswith('ff') else 'att.'}{t}": rank
            for b in blocks
            for t in targets
        }
        if err:
            return [f"your function raised {err}"], ""
        if isinstance(got, Other) and got.type_name == "dict":
            problems.append("the dict's keys should be the layer names, as strings")
            break
        if type(got) is not dict:
            problems.append(f"return a dict {{layer name: rank}}, not {type_name(got)}")
            break
        ranks = list(got.values())
        if got == want and all(type(r) is int for r in ranks):
            continue
        head = [k for k in got if "out_head" in k]
        if head:
            problems.append(f"{head[0]} is the head, stored whole: it has no LoRA")
        elif set(got) != set(want):
            problems.append(
                f"for a file adapting {', '.join(targets)} in both blocks you return the "
                f"layers {sorted(got)}; expected {sorted(want)}"
            )
        elif not all(type(r) is int for r in ranks):
            kinds = sorted({type_name(r) for r in ranks if type(r) is not int})
            problems.append(f"each rank should be a whole number (an int), got {', '.join(kinds)}")
        elif set(ranks) == {GPT_CONFIGS["tiny"]["emb_dim"]}:
            problems.append(
                "that is the input size d_in: A is (d_in, r) (chapter 3's notation box), so "
                "the rank is its second size"
            )
        else:
            problems.append(f"the ranks should all be {rank}, got {sorted(set(ranks))}")
        break
    return problems, "names and shapes say what an adapter file adapts."


check_adapter_targets = Check(_probe_adapter_targets, _judge_adapter_targets)
"""Check ``adapter_targets(path)``: each layer an adapter file adapts, with its rank.

Returns ``{layer name: rank}`` read from the tensors' names and shapes (``A`` is ``(d_in, r)``),
e.g. ``{"gpt.trf_blocks.0.att.W_query": 4, ...}``; the head is not a layer with LoRA.
"""
