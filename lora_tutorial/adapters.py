"""Adapter files: the trained tensors of a model's adapter layers in one safetensors file.

:func:`save_adapter` writes them with metadata (each layer's kind and config), :func:`read_adapter`
reads a file back, and :func:`load_adapter` wraps a fresh base model's layers as recorded and copies
the tensors in. Chapter 6 uses them to keep and swap small adapters on disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lora_tutorial import __version__
from lora_tutorial.files import atomic_write
from lora_tutorial.lora import AdapterLayer, LinearWithLoRA, LoRALayer
from lora_tutorial.lora import find_submodule as _get_submodule
from lora_tutorial.lora import require_adapter_layers as _require_adapters
from lora_tutorial.lora import set_submodule as _set_submodule
from lora_tutorial.quantize import LinearWithQLoRA
from lora_tutorial.variants import LinearWithDoRA, LinearWithPiSSA, LinearWithVeRA

_KINDS = (LinearWithLoRA, LinearWithDoRA, LinearWithPiSSA, LinearWithVeRA, LinearWithQLoRA)
ADAPTER_KINDS: dict[str, type[AdapterLayer]] = {cls.kind: cls for cls in _KINDS}

ADAPTER_FORMAT = "lora_tutorial.adapter"


class AdapterFileError(ValueError):
    """An adapter file that cannot be read: truncated, corrupt, or not written by ``save_adapter``."""


def _summary(layers: dict[str, AdapterLayer]) -> dict[str, str]:
    """kind, rank, alpha and scaling rule for the file's metadata; "mixed" where the layers differ."""
    summary: dict[str, str] = {}
    for layer in layers.values():
        config = layer.config()
        lora = getattr(layer, "lora", None)
        fields = {
            "kind": layer.kind,
            "rank": str(config.get("rank")),
            "alpha": str(config.get("alpha")),
            "scaling": lora.scaling_rule if isinstance(lora, LoRALayer) else "n/a",
        }
        for key, value in fields.items():
            summary[key] = value if summary.get(key, value) == value else "mixed"
    return summary


def save_adapter(
    model: nn.Module, path: str | os.PathLike, extra_modules: str | Iterable[str] = ()
) -> Path:
    """Write the adapter tensors (and the full state of ``extra_modules``) to a safetensors file; return its path.

    Tensor names are the model's own state-dict keys. The metadata records each layer's kind and
    config, the extra module names, and rank / alpha / scaling rule. The file is written to a
    temporary name and renamed, so a failed save leaves no partial file behind; it gets the
    permissions of any new file (0o644 under the usual umask 022).
    """
    layers = _require_adapters(model, "save_adapter")
    extras = [extra_modules] if isinstance(extra_modules, str) else list(extra_modules)
    for layer in layers.values():
        if ADAPTER_KINDS.get(layer.kind) is not type(layer):
            raise TypeError(
                f"{type(layer).__name__} has kind {layer.kind!r}, which is registered to "
                f"{getattr(ADAPTER_KINDS.get(layer.kind), '__name__', None)}; give the class its own `kind`"
            )
    tensors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        tensors.update({f"{name}.{key}": t for key, t in layer.adapter_state().items()})
    for name in extras:
        state = _get_submodule(model, name, "extra module").state_dict()
        tensors.update({f"{name}.{key}": t for key, t in state.items()})
    tensors = {key: t.detach().to("cpu", copy=True).contiguous() for key, t in tensors.items()}
    metadata = {
        "format": ADAPTER_FORMAT,
        "lora_tutorial_version": __version__,
        "layers": json.dumps(
            {name: {"kind": layer.kind, "config": layer.config()} for name, layer in layers.items()}
        ),
        "extra_modules": json.dumps(extras),
        **_summary(layers),
    }
    path = Path(path)
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the decoded metadata of an adapter file; AdapterFileError if it is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no adapter file at {path}; write one with save_adapter(model, path)"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error type for truncated or garbled files
        raise AdapterFileError(
            f"cannot read adapter file {path}: {err}. It is truncated or corrupt; save the adapter again"
        ) from err
    if metadata.get("format") != ADAPTER_FORMAT:
        raise AdapterFileError(
            f"{path} is a safetensors file but not a lora_tutorial adapter (its metadata lacks "
            f"format={ADAPTER_FORMAT!r}); write adapters with save_adapter"
        )
    try:
        layers, extras = json.loads(metadata["layers"]), json.loads(metadata["extra_modules"])
    except (KeyError, json.JSONDecodeError) as err:
        raise AdapterFileError(
            f"adapter file {path} has damaged metadata ({err!r}); save the adapter again"
        ) from err
    return tensors, {**metadata, "layers": layers, "extra_modules": extras}


def _build_layer(
    model: nn.Module, name: str, kind: str, config: dict[str, Any]
) -> AdapterLayer | None:
    """A new adapter layer for the plain nn.Linear at ``name``; None if a matching one is already there."""
    current = _get_submodule(model, name, "adapted layer")
    if kind not in ADAPTER_KINDS:
        raise ValueError(
            f"layer {name!r} uses adapter kind {kind!r}, which is not registered (known: {sorted(ADAPTER_KINDS)}); "
            "import the module that defines it, e.g. lora_tutorial.variants"
        )
    if isinstance(current, AdapterLayer):
        if current.kind != kind or current.config() != config:
            raise ValueError(
                f"layer {name!r} is already a {current.kind} adapter with {current.config()}, "
                f"but the file holds a {kind} adapter with {config}; load into a fresh base model"
            )
        if current.merged:
            raise ValueError(
                f"layer {name!r} is merged; call unmerge_lora(model) before loading new adapter weights"
            )
        return None
    if not isinstance(current, nn.Linear):
        raise TypeError(
            f"layer {name!r} is a {type(current).__name__}; the adapter file expects an nn.Linear there"
        )
    return ADAPTER_KINDS[kind](current, **config)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter file into ``model`` in place and return it.

    Plain ``nn.Linear`` layers named in the file are wrapped as recorded; layers that are already
    adapters must have the same kind and config. Shapes are checked before anything is copied: the
    first mismatching layer is named with both shapes, and on any error the model is left unchanged.
    """
    tensors, info = read_adapter(path)
    owners = [*info["layers"], *info["extra_modules"]]
    replaced: list[tuple[str, nn.Module]] = []
    try:
        for name, record in info["layers"].items():
            layer = _build_layer(model, name, record["kind"], record["config"])
            if layer is not None:
                replaced.append((name, layer.linear))
                _set_submodule(model, name, layer)
        state = model.state_dict(keep_vars=True)
        expected = [
            f"{name}.{key}"
            for name in info["layers"]
            for key in model.get_submodule(name).adapter_state()
        ]
        for name in info["extra_modules"]:
            expected += [
                f"{name}.{key}" for key in _get_submodule(model, name, "extra module").state_dict()
            ]
        for key in dict.fromkeys(
            [*expected, *tensors]
        ):  # model order first, then anything else in the file
            owner = max((n for n in owners if key.startswith(n + ".")), key=len, default="?")
            if key not in tensors or key not in state:
                where = "the adapter file" if key not in tensors else "the model"
                raise ValueError(
                    f"layer {owner!r}: {where} has no tensor {key!r}; it comes from another model"
                )
            if tensors[key].shape != state[key].shape:
                raise ValueError(
                    f"layer {owner!r}: {key!r} has shape {tuple(tensors[key].shape)} in the adapter file "
                    f"but {tuple(state[key].shape)} in the model; the adapter was made for other shapes or another rank"
                )
        with torch.no_grad():
            for key, tensor in tensors.items():
                state[key].copy_(tensor)
    except BaseException:
        for name, linear in reversed(replaced):
            _set_submodule(model, name, linear)
        raise
    return model
