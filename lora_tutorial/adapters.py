"""Adapter files: the trained tensors of a model's adapter layers in one safetensors file.

:func:`save_adapter` writes them with metadata (each layer's kind, config and size),
:func:`read_adapter` reads a file back, and :func:`load_adapter` wraps a fresh base model's layers
as recorded and copies the tensors in. Chapter 6 uses them to keep and swap adapters on disk.

A damaged, edited or misplaced adapter is refused, not silently applied: ``sha256`` checks the
tensors and the rest of the metadata (an edited ``alpha`` too), :func:`load_adapter` compares
``base_fingerprint`` (every base value of the adapted layers) with the model's base unless
``allow_other_base=True``, every field is type- and range-checked, extra modules must lie outside
adapter layers and may replace a pretrained module only when the caller names it
(``replace_modules``), and NaN/inf values are refused. A layer's kind is the key of its class in
:data:`ADAPTER_KINDS`, the one registry of adapter kinds; register a new kind there.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import weakref
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lora_tutorial import __version__
from lora_tutorial.lora import (
    AdapterLayer,
    LinearWithLoRA,
    adapter_layers,
    base_digest,
    find_submodule,
    set_submodule,
)
from lora_tutorial.quantize import MAX_BLOCK_SIZE, LinearWithQLoRA
from lora_tutorial.runtime.checks import is_number
from lora_tutorial.runtime.files import atomic_write
from lora_tutorial.variants import LinearWithDoRA, LinearWithPiSSA, LinearWithVeRA

ADAPTER_FORMAT = "lora_tutorial.adapter"
# 2: the base fingerprint covers every base value of the adapted layers (1 sampled 4096 of each).
FINGERPRINT_VERSION = "2"
MAX_METADATA_CHARS = 1_000_000  # per JSON field; a GPT-2 adapter's layer list takes about 12,000

# The adapter kinds a file may name, and the class that rebuilds each (matched by exact type).
ADAPTER_KINDS: dict[str, type[AdapterLayer]] = {
    "lora": LinearWithLoRA,
    "dora": LinearWithDoRA,
    "pissa": LinearWithPiSSA,
    "vera": LinearWithVeRA,
    "qlora": LinearWithQLoRA,
}

_HEX64 = re.compile(r"[0-9a-f]{64}")
_RECORD_FIELDS = {"kind", "config", "in_dim", "out_dim"}

# What each config value a file may hold must be: (check, description).
_CONFIG_VALUES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "rank": (lambda v: is_number(v, integer=True) and v >= 1, "a positive integer"),
    "alpha": (lambda v: is_number(v) and 0 < v < math.inf, "a positive finite number"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "dropout": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "blocksize": (
        lambda v: is_number(v, integer=True) and 1 <= v <= MAX_BLOCK_SIZE,
        f"an integer from 1 to {MAX_BLOCK_SIZE}",
    ),
    "d_initial": (lambda v: is_number(v) and math.isfinite(v), "a finite number"),
    "seed": (lambda v: is_number(v, integer=True), "an integer"),
}


def _config_keys(kind: str) -> tuple[set[str], bool]:
    """The named arguments a layer of ``kind`` is built with (its config must hold each), and
    whether it takes other keyword arguments too (``**kwargs``)."""
    parameters = inspect.signature(ADAPTER_KINDS[kind]).parameters.values()
    named = {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return named - {"linear"}, any(p.kind == p.VAR_KEYWORD for p in parameters)


class AdapterFileError(ValueError):
    """An adapter file that cannot be used: truncated, corrupt, edited, or not an adapter."""


# Each layer's last base digest, with the identity and version of the tensors it hashed: a frozen
# base does not change, so switching adapters on one model hashes its base once.
_DIGESTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def _layer_base_digest(layer: AdapterLayer) -> str:
    """:func:`~lora_tutorial.lora.base_digest` of the base weights ``layer`` was built on."""
    if isinstance(layer, LinearWithPiSSA):  # its .linear is a residual the SVD computed from W0
        return layer.source_digest
    base = {k: v for k, v in layer.state_dict().items() if k.startswith("linear.")}
    # _version counts in-place writes (shared by detached views), so a changed weight is seen.
    key = tuple((k, v.data_ptr(), v._version, v.dtype, v.device) for k, v in base.items())
    cached = _DIGESTS.get(layer)
    if cached is None or cached[0] != key:
        cached = _DIGESTS[layer] = (key, base_digest(base))
    return cached[1]


def base_fingerprint(model: nn.Module, names: Collection[str] | None = None) -> str:
    """A sha256 digest of the base weights in the model's adapter layers (or ``names``).

    It covers every value of every adapted layer's weight and bias, rounded to bfloat16: another
    base (other weights or seed) differs in it, while a float32 base and its bfloat16 copy agree.
    Hashing GPT-2 small's linear layers takes about a second on a CPU, once per layer object
    (later calls reuse it until a base tensor is replaced or written in place).
    """
    layers = {n: m for n, m in adapter_layers(model).items() if names is None or n in names}
    digest = hashlib.sha256()
    for name, layer in layers.items():
        digest.update(f"{name}:{_layer_base_digest(layer)};".encode())
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
                f"layer {name!r} is merged, so it computes base + update from one merged weight "
                "and its adapter tensors may no longer be what it computes; call "
                "unmerge_lora(model) before saving"
            )
        kind = _kind(layer)
        if kind is None:
            cls = type(layer).__name__
            raise TypeError(
                f"layer {name!r} is a {cls}, which is not in adapters.ADAPTER_KINDS, so a file "
                f"could not say how to rebuild it; register it: ADAPTER_KINDS['my-kind'] = {cls}"
            )
        size = {"in_dim": layer.linear.in_features, "out_dim": layer.linear.out_features}
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
        "fingerprint_version": FINGERPRINT_VERSION,
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
    return is_number(value, integer=True) and value >= 1


def _decode(path: Path, metadata: dict[str, str], field: str) -> Any:
    """``json.loads`` of a metadata field, refusing huge or deeply nested text."""
    text = metadata[field]
    if len(text) > MAX_METADATA_CHARS:
        raise _field_error(
            path, field, f"holds {len(text):,} characters, over {MAX_METADATA_CHARS:,}"
        )
    try:
        return json.loads(text)
    except RecursionError:
        raise _field_error(
            path, field, "is nested too deeply to be an adapter's metadata"
        ) from None
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        raise _field_error(path, field, f"is not valid JSON ({err})") from None


def _check_config(path: Path, name: str, kind: str, config: Any) -> None:
    """Refuse a layer config with missing, unknown or ill-typed values (the field named)."""
    field = f"layers.{name}.config"
    if not isinstance(config, dict):
        raise _field_error(path, field, f"is {config!r}, not a JSON object")
    wanted, more = _config_keys(kind)
    if not wanted <= set(config) or (set(config) - wanted and not more):
        raise _field_error(
            path, field, f"has keys {sorted(config)}, but a {kind} layer takes {sorted(wanted)}"
        )
    for key, value in config.items():
        valid, description = _CONFIG_VALUES.get(key, (lambda v: True, ""))
        if not valid(value):
            raise _field_error(path, f"{field}.{key}", f"is {value!r}, not {description}")


def _check_metadata(path: Path, metadata: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The decoded ``layers`` and ``extra_modules``; AdapterFileError naming any bad field."""
    for field in ("layers", "extra_modules", "base_fingerprint", "sha256"):
        if field not in metadata:
            raise _field_error(path, field, "is missing")
        if field in ("base_fingerprint", "sha256") and not _HEX64.fullmatch(metadata[field]):
            raise _field_error(path, field, "is not a sha256 digest (64 hex digits)")
    layers, extras = _decode(path, metadata, "layers"), _decode(path, metadata, "extra_modules")
    if not isinstance(layers, dict) or not layers:
        raise _field_error(path, "layers", "must be a JSON object: layer name -> record")
    for name, record in layers.items():
        if not isinstance(record, dict) or set(record) != _RECORD_FIELDS:
            raise _field_error(path, f"layers.{name}", f"must hold {sorted(_RECORD_FIELDS)}")
        kind = record["kind"]
        if not isinstance(kind, str) or kind not in ADAPTER_KINDS:
            raise _field_error(
                path, f"layers.{name}.kind", f"is {kind!r}, not one of {sorted(ADAPTER_KINDS)}"
            )
        for dim in ("in_dim", "out_dim"):
            if not _is_count(record[dim]):
                raise _field_error(
                    path, f"layers.{name}.{dim}", f"is {record[dim]!r}, not a positive integer"
                )
        _check_config(path, name, kind, record["config"])
    if not isinstance(extras, list) or not all(isinstance(e, str) and e for e in extras):
        raise _field_error(path, "extra_modules", "must be a JSON list of module names")
    for extra in extras:
        for name in layers:
            if extra == name or extra.startswith(name + ".") or name.startswith(extra + "."):
                raise _field_error(
                    path, "extra_modules", f"names {extra!r}, which overlaps adapter layer {name!r}"
                )
    return layers, extras


def _check_file_tensors(path: Path, tensors: dict[str, Tensor], layers: dict[str, Any]) -> None:
    """Refuse tensors of no layer, adapter tensors that are not floats, and a rank too large."""
    for name, record in layers.items():
        own = [t for key, t in tensors.items() if key.startswith(name + ".")]
        for tensor in own:
            if not tensor.is_floating_point():
                raise AdapterFileError(
                    f"adapter file {path}: layer {name!r} holds a {tensor.dtype} tensor; adapter "
                    "tensors are floating point (an integer copy would truncate them)"
                )
        most = max((t.numel() for t in own), default=0)
        if record["config"]["rank"] > most:  # a rank-r layer holds a tensor of >= r values
            raise _field_error(
                path,
                f"layers.{name}.config.rank",
                f"is {record['config']['rank']}, more than its tensors hold ({most} values)",
            )


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
    _check_file_tensors(path, tensors, layers)
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
    for field, value in _summary(layers).items():  # the summary must say what the layers say
        if metadata.get(field) != value:
            raise _field_error(
                path, field, f"is {metadata.get(field)!r}, but the layers say {value!r}"
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
        return ADAPTER_KINDS[kind](current, **config).train(current.training)
    except (TypeError, ValueError) as err:
        raise AdapterFileError(
            f"metadata field 'layers.{name}.config' ({config}) cannot build a {kind} layer: {err}"
        ) from None


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    allow_other_base: bool = False,
    replace_modules: str | Iterable[str] = (),
) -> nn.Module:
    """Load an adapter file into ``model`` in place and return it.

    Plain ``nn.Linear`` layers named in the file are wrapped as recorded (in the model's training
    or eval mode); layers that are already adapters must have the same kind and config. Names,
    shapes and the fingerprint of the base the adapter was trained on (unless
    ``allow_other_base=True``) are checked before anything is copied. The file's extra modules
    replace modules of the model: a new one (``model.new_modules``, a classifier's head) freely,
    any other only if named in ``replace_modules``. On any error the model is left unchanged.
    """
    tensors, info = read_adapter(path)
    _check_replacements(model, path, info["extra_modules"], replace_modules)
    if not allow_other_base and info.get("fingerprint_version") != FINGERPRINT_VERSION:
        raise AdapterFileError(
            f"adapter file {path} was saved by an older lora_tutorial, whose base fingerprint "
            "looked at a sample of the weights only, so its base cannot be checked; save it again "
            "(or pass allow_other_base=True if you know it belongs to this base model)"
        )
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
        saved = {key: state[key].detach().clone() for key in tensors}
        with torch.no_grad():
            for key, tensor in tensors.items():
                state[key].copy_(tensor)
        try:
            _refuse_non_finite_updates(path, layers)
        except AdapterFileError:
            with torch.no_grad():
                for key, tensor in saved.items():
                    state[key].copy_(tensor)
            raise
    except BaseException:
        for name, original in reversed(replaced):
            set_submodule(model, name, original)
        raise
    return model


def _check_replacements(
    model: nn.Module, path: Any, extras: list[str], replace_modules: str | Iterable[str]
) -> None:
    """Refuse extra modules that would overwrite a module the model did not create new."""
    allowed = [replace_modules] if isinstance(replace_modules, str) else list(replace_modules)
    new = set(getattr(model, "new_modules", ()))
    for extra in extras:
        if extra not in new and extra not in allowed:
            raise ValueError(
                f"the adapter file {path} would replace the model's module {extra!r} with its own "
                f"copy, and {extra!r} is not a new module of this model (model.new_modules: "
                f"{sorted(new)}); if that is intended, pass replace_modules=[{extra!r}]"
            )


def _refuse_non_finite_updates(path: Any, layers: dict[str, nn.Module]) -> None:
    """AdapterFileError if a loaded layer's update overflows (a huge alpha, say) to inf or NaN."""
    with torch.no_grad():
        for name, layer in layers.items():
            if isinstance(layer, AdapterLayer) and not bool(layer.delta_weight().isfinite().all()):
                raise AdapterFileError(
                    f"adapter file {path}: layer {name!r} computes an update with inf or NaN "
                    f"values from its tensors and config {layer.config()} (an alpha too large?); "
                    "nothing was loaded"
                )


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
        if linear is not None and recorded == (linear.in_features, linear.out_features):
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
