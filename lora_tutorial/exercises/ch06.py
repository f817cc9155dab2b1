"""Checks for chapter 6 (adapters: store, swap, merge)."""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from lora_tutorial.adapters import save_adapter
from lora_tutorial.classify import GPTClassifier
from lora_tutorial.exercises._feedback import call, report
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


def check_use_adapter(use_adapter: Callable[[nn.Module, dict[str, torch.Tensor]], object]) -> bool:
    """Check ``use_adapter(model, adapter)`` puts exactly ``adapter`` on a model that has another.

    Layers that the new adapter does not cover must compute the base model again (their LoRA
    update reset to zero), and a merged model must be unmerged before the switch.
    """
    base = _tiny_lora_classifier()
    old = _random_adapter(base, lambda name: True, seed=1)
    # The new adapter covers only the attention's query and value layers (and the head).
    new = _random_adapter(
        base, lambda name: "W_query" in name or "W_value" in name or "out_head" in name, seed=2
    )
    tokens = torch.randint(0, 50257, (3, 9), generator=torch.Generator().manual_seed(3))

    want_model = copy.deepcopy(base)
    want_model.load_state_dict(new, strict=False)  # B starts at zero: uncovered layers add nothing
    want = _logits(want_model, tokens)

    problems: list[str] = []
    for merged in (False, True):
        model = copy.deepcopy(base)
        model.load_state_dict(old, strict=False)
        if merged:
            merge_lora(model)
        try:
            use_adapter(model, {k: v.clone() for k, v in new.items()})
            got = _logits(model, tokens)
        except Exception as exc:  # a learner's bug: say it in words instead of a traceback
            problems.append(
                f"with a{' merged' if merged else 'n unmerged'} model your function raised "
                f"{type(exc).__name__}: {exc}"
            )
            break
        if not torch.allclose(got, want, atol=1e-5):
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
    return report(
        problems,
        "the model now computes the base plus the new adapter, and nothing of the old one.",
    )


def _trained_adapter(model: nn.Module, seed: int) -> None:
    """Give every trainable tensor of ``model`` random values, as if it had been trained."""
    with torch.no_grad():
        for name, value in _random_adapter(model, lambda name: True, seed).items():
            model.get_parameter(name).copy_(value)


def check_save_lora(save_lora: Callable[[nn.Module, str], object]) -> bool:
    """Check ``save_lora(model, path)`` writes a safetensors file with what was trained.

    The file must hold exactly the trainable tensors by their state-dict names (the LoRA matrices
    and the head), with ``rank`` and ``alpha`` in its metadata; loading it into a fresh copy of
    the base model with the same LoRA layers must give identical logits.
    """
    trained = _tiny_lora_classifier()
    fresh = copy.deepcopy(trained)  # the same base and LoRA layers, before training
    _trained_adapter(trained, seed=5)
    tokens = torch.randint(0, 50257, (3, 9), generator=torch.Generator().manual_seed(6))
    want = _logits(trained, tokens)
    trainable = {name for name, p in trained.named_parameters() if p.requires_grad}
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "adapter.safetensors")
        _, err = call(save_lora, trained, path)
        if err:
            return report([f"your function raised {err}"], "")
        try:
            tensors = load_file(path)
            with safe_open(path, "pt") as f:
                metadata = f.metadata() or {}
        except Exception as exc:  # no file, or not safetensors
            return report(
                [
                    f"could not read {Path(path).name} as safetensors ({type(exc).__name__}): "
                    "write it with safetensors.torch.save_file(tensors, path, metadata=...)"
                ],
                "",
            )
    frozen = sorted(set(tensors) - trainable)
    missing = sorted(trainable - set(tensors))
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
        try:
            ok = float(metadata.get(key, "nan")) == value
        except ValueError:
            ok = False
        if not ok:
            problems.append(
                f"the metadata should say {key} (here {value:g}), as a string: without it "
                "nobody can rebuild the LoRA layers the tensors belong to"
            )
    if not problems:
        fresh.load_state_dict(tensors, strict=False)
        if not torch.equal(_logits(fresh, tokens), want):
            problems.append("the reloaded model's logits differ from the trained model's")
    return report(
        problems,
        "a fresh base with the same LoRA layers plus this file is the trained model, exactly.",
    )


def _targets_file(folder: Path, targets: tuple[str, ...], rank: int, seed: int) -> Path:
    torch.manual_seed(seed)
    model = prepare_model(
        GPTClassifier(GPTModel("tiny")), "lora", rank=rank, alpha=rank, targets=targets
    )
    return save_adapter(model, folder / f"adapter-{seed}.safetensors", extra_modules="gpt.out_head")


def check_adapter_targets(adapter_targets: Callable[[str], dict[str, int]]) -> bool:
    """Check ``adapter_targets(path)``: each layer an adapter file adapts, with its rank.

    Returns ``{layer name: rank}`` read from the tensors' names and shapes (``A`` is
    ``(d_in, r)``), e.g. ``{"gpt.trf_blocks.0.att.W_query": 4, ...}``; the head is not a layer
    with LoRA.
    """
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        for targets, rank, seed in ((("W_query", "W_value"), 3, 1), (("ff.layers.0",), 5, 2)):
            path = _targets_file(folder, targets, rank, seed)
            blocks = range(GPT_CONFIGS["tiny"]["n_layers"])
            want = {
                f"gpt.trf_blocks.{b}.{'' if t.startswith('ff') else 'att.'}{t}": rank
                for b in blocks
                for t in targets
            }
            got, err = call(adapter_targets, str(path))
            if err:
                return report([f"your function raised {err}"], "")
            if type(got) is not dict:
                problems.append(f"return a dict {{layer name: rank}}, not {type(got).__name__}")
                break
            if got == want:
                continue
            head = [k for k in got if "out_head" in str(k)]
            if head:
                problems.append(f"{head[0]} is the head, stored whole: it has no LoRA")
            elif set(got) != set(want):
                problems.append(
                    f"for a file adapting {', '.join(targets)} in both blocks you return the "
                    f"layers {sorted(got)}; expected {sorted(want)}"
                )
            elif set(got.values()) == {GPT_CONFIGS["tiny"]["emb_dim"]}:
                problems.append(
                    "that is the input size d_in: A is (d_in, r) (chapter 3's notation box), so "
                    "the rank is its second size"
                )
            else:
                problems.append(f"the ranks should all be {rank}, got {sorted(set(got.values()))}")
            break
    return report(problems, "names and shapes say what an adapter file adapts.")
