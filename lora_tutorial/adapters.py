"""Adapter files: the trained tensors of a model's adapter layers in one safetensors file.

:func:`save_adapter` writes them with metadata (each layer's kind, config and size),
:func:`read_adapter` reads a file back, and :func:`load_adapter` wraps a fresh base model's layers
as recorded and copies the tensors in. Chapter 6 uses them to keep and swap adapters on disk.

A damaged, edited or misplaced adapter is refused, not silently applied: ``sha256`` checks the
tensors and the rest of the metadata (an edited ``alpha`` too), :func:`load_adapter` compares
``base_fingerprint`` with the model's base unless ``allow_other_base=True``, every field is
validated, extra modules must lie outside adapter layers, and NaN/inf values are refused. A layer's
kind is the key of its class in :data:`ADAPTER_KINDS`; register a new kind there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lora_tutorial import __version__
from lora_tutorial.lora import LinearWithLoRA, adapter_layers, find_submodule, set_submodule
from lora_tutorial.quantize import LinearWithQLoRA
from lora_tutorial.runtime.files import atomic_write
from lora_tutorial.variants import LinearWithDoRA, LinearWithPiSSA, LinearWithVeRA

ADAPTER_FORMAT = "lora_tutorial.adapter"

# The adapter kinds a file may name, and the class that rebuilds each (matched by exact type).
ADAPTER_KINDS: dict[str, type[nn.Module]] = {
    "lora": LinearWithLoRA,
    "dora": LinearWithDoRA,
    "pissa": LinearWithPiSSA,
    "vera": LinearWithVeRA,
    "qlora": LinearWithQLoRA,
}

FINGERPRINT_SAMPLES = 4096  # values per base tensor that the fingerprint looks at
_HEX64 = re.compile(r"[0-9a-f]{64}")
_RECORD_FIELDS = {"kind", "config", "in_dim", "out_dim"}


def _dims(linear: nn.Module) -> tuple[int, int]:
    """(in_dim, out_dim) of a base layer: an ``nn.Linear`` or QLoRA's 4-bit ``LinearNF4``."""
    if isinstance(linear, nn.Linear):
        return linear.in_features, linear.out_features
    return cast(int, linear.in_dim), cast(int, linear.out_dim)


class AdapterFileError(ValueError):
    """An adapter file that cannot be used: truncated, corrupt, edited, or not an adapter."""


def base_fingerprint(model: nn.Module, names: Collection[str] | None = None) -> str:
    """A sha256 digest of the frozen base weights in the model's adapter layers (or ``names``).

    Cheap: it hashes each base tensor's name, shape and :data:`FINGERPRINT_SAMPLES` evenly spaced
    values rounded to bfloat16, in which another base (other weights or seed) differs almost
    everywhere while a float32 base and its bfloat16 copy agree (PiSSA's SVD may vary by device).
    """
    layers = {n: m for n, m in adapter_layers(model).items() if names is None or n in names}
    digest = hashlib.sha256()
    for name, layer in layers.items():
        for key, tensor in layer.linear.state_dict().items():
            digest.update(f"{name}.linear.{key}{tuple(tensor.shape)};".encode())
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, math.ceil(flat.numel() / FINGERPRINT_SAMPLES))]
            digest.update(sample.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def _checksum(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    """sha256 of the metadata (but this checksum) and of each tensor's name, type, shape, bytes."""
    fields = {key: value for key, value in metadata.items() if key != "sha256"}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key};{tensor.dtype};{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _kind(layer: nn.Module) -> str | None:  # the key of its exact class in ADAPTER_KINDS
    return next((kind for kind, cls in ADAPTER_KINDS.items() if type(layer) is cls), None)


def _check_extras_outside_layers(
    model: nn.Module, extras: list[str], error: type[ValueError] = ValueError
) -> None:
    """Refuse extra modules that are, sit inside, or hold an adapter layer or its base weights."""
    inside = {id(m): name for name, layer in adapter_layers(model).items() for m in layer.modules()}
    for extra in extras:
        for module in find_submodule(model, extra, "extra module").modules():
            if id(module) in inside:
                raise error(
                    f"extra module {extra!r} overlaps the adapter layer {inside[id(module)]!r}; "
                    "extra_modules may name only modules outside adapter layers (a new head, say)"
                )


def save_adapter(
    model: nn.Module, path: str | os.PathLike, extra_modules: str | Iterable[str] = ()
) -> Path:
    """Write the adapter tensors (and the full state of ``extra_modules``) to a safetensors file.

    Tensor names are the model's state-dict keys; the metadata holds each layer's kind, config and
    size, the extra module names, rank / alpha / scaling, the base fingerprint and the checksum.
    Refuses merged layers, unregistered kinds, extra modules inside adapter layers and NaN/inf.
    Written atomically, with the permissions of any new file; returns the path.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(
            "save_adapter: the model has no adapter layers; "
            "call replace_linear_with_lora(model, ...) first"
        )
    extras = [extra_modules] if isinstance(extra_modules, str) else list(extra_modules)
    if not all(isinstance(name, str) and name for name in extras):
        raise TypeError(f"extra_modules must be module names, got {extra_modules!r}")
    _check_extras_outside_layers(model, extras)
    records: dict[str, dict[str, Any]] = {}
    tensors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(
                f"layer {name!r} is merged, so its base weight holds the update and the file could "
                "not record the base it was trained on; call unmerge_lora(model) before saving"
            )
        kind = _kind(layer)
        if kind is None:
            cls = type(layer).__name__
            raise TypeError(
                f"layer {name!r} is a {cls}, which is not in adapters.ADAPTER_KINDS, so a file "
                f"could not say how to rebuild it; register it: ADAPTER_KINDS['my-kind'] = {cls}"
            )
        in_dim, out_dim = _dims(layer.linear)
        size = {"in_dim": in_dim, "out_dim": out_dim}
        records[name] = {"kind": kind, "config": layer.config(), **size}
        tensors.update({f"{name}.{key}": t for key, t in layer.adapter_state().items()})
    for name in extras:
        tensors.update(model.get_submodule(name).state_dict(prefix=name + "."))
    tensors = {key: t.detach().to("cpu", copy=True).contiguous() for key, t in tensors.items()}
    for key in _not_finite(tensors):
        raise ValueError(
            f"save_adapter: tensor {key!r} holds NaN or inf values, so the training run diverged; "
            "nothing was written. Train again, e.g. with a lower learning rate"
        )
    metadata = {
        "format": ADAPTER_FORMAT,
        "lora_tutorial_version": __version__,
        "layers": json.dumps(records),
        "extra_modules": json.dumps(extras),
        "base_fingerprint": base_fingerprint(model),
        **_summary(records),
    }
    metadata["sha256"] = _checksum(tensors, metadata)
    path = Path(path)
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def _not_finite(tensors: dict[str, Tensor]) -> list[str]:  # the tensors holding NaN or inf
    return [k for k, t in tensors.items() if t.is_floating_point() and not t.isfinite().all()]


def _summary(records: dict[str, dict[str, Any]]) -> dict[str, str]:
    """kind, rank, alpha and scaling rule for the metadata; "mixed" where the layers differ."""
    summary: dict[str, str] = {}
    for record in records.values():
        config = record["config"]
        rslora = config.get("use_rslora")
        fields = {
            "kind": record["kind"],
            "rank": str(config.get("rank")),
            "alpha": str(config.get("alpha")),
            "scaling": "n/a" if rslora is None else "alpha/sqrt(rank)" if rslora else "alpha/rank",
        }
        for key, value in fields.items():
            summary[key] = value if summary.get(key, value) == value else "mixed"
    return summary


def _field_error(path: Path, field: str, problem: str) -> AdapterFileError:
    why = "the file was damaged, edited or written by an older version; save the adapter again"
    return AdapterFileError(f"adapter file {path}: metadata field {field!r} {problem}. {why}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def _check_metadata(path: Path, metadata: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The decoded ``layers`` and ``extra_modules``; AdapterFileError naming any bad field."""
    decoded = {}
    for field in ("layers", "extra_modules", "base_fingerprint", "sha256"):
        if field not in metadata:
            raise _field_error(path, field, "is missing")
        if field in ("base_fingerprint", "sha256") and not _HEX64.fullmatch(metadata[field]):
            raise _field_error(path, field, "is not a sha256 digest (64 hex digits)")
    for field in ("layers", "extra_modules"):
        try:
            decoded[field] = json.loads(metadata[field])
        except json.JSONDecodeError as err:
            raise _field_error(path, field, f"is not valid JSON ({err})") from None
    layers, extras = decoded["layers"], decoded["extra_modules"]
    if not isinstance(layers, dict) or not layers:
        raise _field_error(path, "layers", "must be a JSON object: layer name -> record")
    for name, record in layers.items():
        if not isinstance(record, dict) or set(record) != _RECORD_FIELDS:
            raise _field_error(path, f"layers.{name}", f"must hold {sorted(_RECORD_FIELDS)}")
        kind, config = record["kind"], record["config"]
        options = config if isinstance(config, dict) else {}
        rank, alpha = options.get("rank", 1), options.get("alpha", 1.0)
        checks = {  # field: (value, valid, what it must be)
            "kind": (kind, str(kind) in ADAPTER_KINDS, f"one of {sorted(ADAPTER_KINDS)}"),
            "in_dim": (record["in_dim"], _is_count(record["in_dim"]), "a positive integer"),
            "out_dim": (record["out_dim"], _is_count(record["out_dim"]), "a positive integer"),
            "config": (config, isinstance(config, dict), "a JSON object"),
            "config.rank": (rank, _is_count(rank), "a positive integer"),
            "config.alpha": (alpha, _is_positive(alpha), "a positive finite number"),
        }
        for field, (value, valid, wanted) in checks.items():
            if not valid:
                raise _field_error(path, f"layers.{name}.{field}", f"is {value!r}, not {wanted}")
    if not isinstance(extras, list) or not all(isinstance(e, str) and e for e in extras):
        raise _field_error(path, "extra_modules", "must be a JSON list of module names")
    for extra in extras:
        for name in layers:
            if extra == name or extra.startswith(name + ".") or name.startswith(extra + "."):
                raise _field_error(
                    path, "extra_modules", f"names {extra!r}, which overlaps adapter layer {name!r}"
                )
    return layers, extras


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the decoded metadata of an adapter file, after checking all of it.

    AdapterFileError if the file is unreadable, a metadata field is invalid (named), a tensor holds
    NaN/inf or belongs to no layer, or the checksum fails (the file changed after saving).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no adapter file at {path}; write one with save_adapter(model, path)"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error type for truncated or garbled files
        raise AdapterFileError(
            f"cannot read adapter file {path}: {err}. It is truncated or corrupt; save it again"
        ) from err
    if metadata.get("format") != ADAPTER_FORMAT:
        raise AdapterFileError(
            f"{path} is a safetensors file but not a lora_tutorial adapter (its metadata lacks "
            f"format={ADAPTER_FORMAT!r}); write adapters with save_adapter"
        )
    layers, extras = _check_metadata(path, metadata)
    for key in tensors:
        if not any(key.startswith(owner + ".") for owner in [*layers, *extras]):
            raise AdapterFileError(
                f"adapter file {path}: tensor {key!r} belongs to no layer or extra module named in "
                "its metadata; save the adapter again"
            )
    for key in _not_finite(tensors):
        raise AdapterFileError(
            f"adapter file {path}: tensor {key!r} holds NaN or inf values; it comes from a run "
            "that diverged, or was damaged. Train and save the adapter again"
        )
    checksum = _checksum(tensors, metadata)
    if checksum != metadata["sha256"]:
        raise AdapterFileError(
            f"adapter file {path} fails its checksum: it hashes to sha256 {checksum}, not the "
            f"recorded {metadata['sha256']}; it was damaged or edited. Save the adapter again"
        )
    return tensors, {**metadata, "layers": layers, "extra_modules": extras}


def _build_layer(
    model: nn.Module, name: str, record: dict[str, Any], existing: dict[str, Any]
) -> nn.Module | None:
    """A new adapter layer for the plain nn.Linear at ``name``; None if a matching one is there."""
    current: Any = find_submodule(model, name, "adapted layer")  # an adapter layer or nn.Linear
    kind, config = record["kind"], record["config"]
    if name in existing:
        if current.config() != config or type(current) is not ADAPTER_KINDS[kind]:
            raise ValueError(
                f"layer {name!r} is already a {_kind(current)} adapter with {current.config()}, "
                f"but the file holds a {kind} adapter with {config}; load into a fresh base model"
            )
        if current.merged:
            raise ValueError(
                f"layer {name!r} is merged; call unmerge_lora(model) before loading new weights"
            )
        return None
    if not isinstance(current, nn.Linear):
        raise TypeError(
            f"layer {name!r} is a {type(current).__name__}; the adapter file expects an nn.Linear"
        )
    try:
        return ADAPTER_KINDS[kind](current, **config)
    except (TypeError, ValueError) as err:
        raise AdapterFileError(
            f"metadata field 'layers.{name}.config' ({config}) cannot build a {kind} layer: {err}"
        ) from None


def load_adapter(
    model: nn.Module, path: str | os.PathLike, *, allow_other_base: bool = False
) -> nn.Module:
    """Load an adapter file into ``model`` in place and return it.

    Plain ``nn.Linear`` layers named in the file are wrapped as recorded; layers that are already
    adapters must have the same kind and config. Names, shapes and the fingerprint of the base the
    adapter was trained on (unless ``allow_other_base=True``) are checked before anything is
    copied; on any error the model is left unchanged.
    """
    tensors, info = read_adapter(path)
    existing = adapter_layers(model)
    replaced: list[tuple[str, nn.Module]] = []  # (name, original module), undone on any error
    try:
        for name, record in info["layers"].items():
            layer = _build_layer(model, name, record, existing)
            if layer is not None:
                replaced.append((name, model.get_submodule(name)))
                set_submodule(model, name, layer)
        layers = {name: model.get_submodule(name) for name in info["layers"]}
        _check_extras_outside_layers(model, info["extra_modules"], AdapterFileError)
        state = model.state_dict(keep_vars=True)
        _check_tensors(path, tensors, info, layers, state)
        if not allow_other_base and base_fingerprint(model, layers) != info["base_fingerprint"]:
            raise ValueError(
                f"the adapter in {path} was trained on another base model: the base weights of "
                "its layers here differ from those it was saved with (its base_fingerprint). Load "
                "it into the base it was trained on (the same pretrained weights or random seed), "
                "or pass allow_other_base=True to load it anyway"
            )
        with torch.no_grad():
            for key, tensor in tensors.items():
                state[key].copy_(tensor)
    except BaseException:
        for name, original in reversed(replaced):
            set_submodule(model, name, original)
        raise
    return model


def _check_tensors(path: Any, tensors: dict, info: dict, layers: dict, state: dict) -> None:
    """Refuse missing, unexpected or misshapen tensors, naming the layer (and a wrong config)."""
    owners = {f"{n}.{key}": n for n, layer in layers.items() for key in layer.adapter_state()}
    for name in info["extra_modules"]:
        owners.update({key: name for key in state if key.startswith(name + ".")})
    for key, owner in owners.items():
        if key not in tensors:
            raise ValueError(
                f"layer {owner!r}: the adapter file has no tensor {key!r}; it is from another model"
            )
        in_file, in_model = tuple(tensors[key].shape), tuple(state[key].shape)
        if in_file == in_model:
            continue
        record, linear = info["layers"].get(owner), getattr(layers.get(owner), "linear", None)
        recorded = record and (record["in_dim"], record["out_dim"])
        if linear is not None and recorded == _dims(linear):
            raise AdapterFileError(  # the model's layer has the recorded size: the config is wrong
                f"adapter file {path}: metadata field 'layers.{owner}.config' {record['config']} "
                f"does not fit its tensors: {key!r} has shape {in_file}, a layer built with that "
                f"config {in_model}; save the adapter again"
            )
        raise ValueError(
            f"layer {owner!r}: {key!r} has shape {in_file} in the adapter file but {in_model} "
            "in the model; the adapter was made for other shapes or another rank"
        )
    if unexpected := sorted(tensors.keys() - owners.keys()):
        raise AdapterFileError(
            f"adapter file {path}: tensor {unexpected[0]!r} is not an adapter tensor of this "
            "model (loading it would overwrite other weights); save the adapter again"
        )
