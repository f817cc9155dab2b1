"""LoRA from scratch: wrap linear layers, freeze the rest, merge.

LoRA (Hu et al., 2021) leaves a pretrained linear layer ``y = x W^T + b`` frozen and learns a
low-rank update beside it::

    y = x W^T + b + scaling * (x @ A @ B)      A: (in_dim, rank), B: (rank, out_dim)

B starts at zero, so a freshly wrapped model computes exactly what the base model computed.
``scaling = alpha / rank`` as in the LoRA paper and PEFT, or ``alpha / sqrt(rank)`` with
``use_rslora=True`` (rsLoRA, Kalajdzievski 2023). A is drawn like ``nn.Linear(in_dim, rank)``'s
weight, as LoRA's reference code and PEFT do.

Every adapter kind (DoRA, PiSSA, VeRA in :mod:`~lora_tutorial.variants`, QLoRA in
:mod:`~lora_tutorial.quantize`) is an :class:`AdapterLayer` like :class:`LinearWithLoRA`, which
``replace_linear_with_lora(model, ..., wrapper=cls)`` applies.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from fnmatch import fnmatchcase
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_tutorial.runtime.checks import check_number


def check_alpha(alpha: Any) -> None:
    """Raise ValueError unless ``alpha`` is a positive, finite number (LoRA layers and the CLI)."""
    check_number(
        "alpha", alpha, above=0, what="a positive number", hint="a common choice is 2 * rank"
    )


def check_rank_and_dropout(rank: Any, dropout: Any) -> None:
    """Raise ValueError unless ``rank`` is a positive integer and ``0 <= dropout < 1``."""
    check_number("rank", rank, integer=True, at_least=1, hint="typical values are 4, 8 or 16")
    check_number("dropout", dropout, at_least=0, below=1, what="a probability in [0, 1)")


def check_lora_arguments(
    in_dim: int, out_dim: int, rank: Any, alpha: Any, use_rslora: Any, dropout: Any
) -> None:
    """ValueError for a bad rank, alpha, ``use_rslora`` or dropout; a warning for a rank above
    ``min(in_dim, out_dim)``, which the layer accepts (as PEFT does) but cannot use in full."""
    check_rank_and_dropout(rank, dropout)
    check_alpha(alpha)
    if not isinstance(use_rslora, bool):
        raise ValueError(f"use_rslora must be True or False, got {use_rslora!r}")
    scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    if not 0 < scaling < math.inf:
        raise ValueError(f"alpha={alpha!r} with rank={rank} gives a scaling of {scaling}")
    if rank > min(in_dim, out_dim):
        warnings.warn(
            f"rank {rank} exceeds min(in_dim, out_dim) = {min(in_dim, out_dim)} of a "
            f"{in_dim}->{out_dim} layer: its update's rank is capped at that, so the extra rank "
            "only adds parameters",
            stacklevel=4,
        )


@runtime_checkable
class FrozenLinear(Protocol):
    """What an adapter layer needs of the layer it wraps. ``nn.Linear`` has it all, and so has
    QLoRA's 4-bit :class:`~lora_tutorial.quantize.LinearNF4`, whose ``weight`` is dequantized."""

    in_features: int
    out_features: int

    @property
    def weight(self) -> Tensor: ...  # (out_features, in_features)

    @property
    def bias(self) -> Tensor | None: ...

    def __call__(self, x: Tensor) -> Tensor: ...


def check_base_layer(linear: Any) -> None:
    """Raise TypeError unless ``linear`` is a module with :class:`FrozenLinear`'s attributes."""
    if not isinstance(linear, nn.Module) or not isinstance(linear, FrozenLinear):
        raise TypeError(
            f"linear must be an nn.Linear (or a module with in_features, out_features, weight "
            f"and bias, such as quantize.LinearNF4), got {type(linear).__name__}"
        )


# ----------------------------------------------------------------------------- layers


class LoRALayer(nn.Module):
    """LoRA's update ``scaling * (x @ A @ B)``; A (in_dim, rank) is random, B (rank, out_dim) 0."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_lora_arguments(in_dim, out_dim, rank, alpha, use_rslora, dropout)
        self.scaling_rule = "alpha/sqrt(rank)" if use_rslora else "alpha/rank"
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        nn.init.kaiming_uniform_(self.A.T, a=math.sqrt(5))  # A.T is (rank, in_dim): fan-in in_dim
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # The casts let a float32 adapter sit on a bfloat16 base (QLoRA's usual mix).
        update = (self.dropout(x.to(self.A.dtype)) @ self.A * self.scaling) @ self.B
        return update.to(x.dtype)


class AdapterLayer(nn.Module):
    """A base layer (``.linear``) plus an update. Subclasses pass their keyword arguments to
    ``__init__`` (``config()`` returns them) and define ``forward`` and ``delta_weight()``.

    The layer never writes the base: ``merge()`` keeps base + update in a buffer of its own. Nor
    does it freeze the base: ``mark_only_lora_as_trainable(model)`` does that for the whole model.
    """

    linear: FrozenLinear

    def __init__(self, linear: FrozenLinear, **config: Any) -> None:
        super().__init__()
        check_base_layer(linear)
        self.linear = linear
        self._config = config
        self.register_buffer("merged_weight", None, persistent=False)  # base + update, if merged

    def config(self) -> dict[str, Any]:
        return dict(self._config)

    @property
    def merged(self) -> bool:
        return self.merged_weight is not None

    def adapter_state(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("linear.")}

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("linear.")]

    def delta_weight(self) -> Tensor:
        raise NotImplementedError  # the update, (out_dim, in_dim) like linear.weight

    def updated_weight(self) -> Tensor:
        weight = self.linear.weight
        return weight + self.delta_weight().to(weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Compute the updated weight once, so that forward costs one product. Harmless twice."""
        weight = self.updated_weight()
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("the update holds NaN or inf values (did training diverge?)")
        self.merged_weight = weight

    def unmerge(self) -> None:
        self.register_buffer("merged_weight", None, persistent=False)

    def merged_forward(self, x: Tensor) -> Tensor:
        trains = any(p.requires_grad for p in self.adapter_parameters())
        if trains and self.training and torch.is_grad_enabled():
            raise RuntimeError(
                "a merged layer cannot train: unmerge_lora(model) first (or model.eval() to infer)"
            )
        return F.linear(x, self.merged_weight, self.linear.bias)


class LinearWithLoRA(AdapterLayer):
    """``linear(x) + lora(x)``: the base layer (``.linear``) and its LoRA update (``.lora``)."""

    def __init__(
        self,
        linear: FrozenLinear,
        rank: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(linear, rank=rank, alpha=alpha, use_rslora=use_rslora, dropout=dropout)
        in_dim, out_dim, weight = linear.in_features, linear.out_features, linear.weight
        lora = LoRALayer(in_dim, out_dim, rank, alpha, use_rslora=use_rslora, dropout=dropout)
        self.lora = lora.to(weight.device, weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.merged_forward(x)
        return self.linear(x) + self.lora(x)

    def delta_weight(self) -> Tensor:
        """The update as an ``(out_dim, in_dim)`` matrix, the layout of ``linear.weight``."""
        return (self.lora.scaling * (self.lora.A @ self.lora.B)).T


# ----------------------------------------------------------------------------- choosing layers

Selector = str | Iterable[str] | Callable[[str, nn.Module], bool] | None

# Modules that read their linear children's ``.weight`` instead of calling them (the encoder
# layer in its fast inference path): an adapter or a 4-bit layer there would break them.
READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


def _matcher(selector: Selector, argument: str) -> Callable[[str, nn.Module], bool]:
    """``include`` / ``exclude`` as a function (name, module) -> bool."""
    if callable(selector):
        return selector
    if selector is None:
        return lambda name, module: argument == "include"  # include everything, exclude nothing
    patterns = [selector] if isinstance(selector, str) else selector
    if not isinstance(patterns, Iterable) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"{argument} must be a name pattern, a list of them or a function "
            f"(name, module) -> bool, got {selector!r}"
        )
    patterns = list(patterns)
    # A pattern matches the qualified name or any dotted suffix: "W_query" matches "0.att.W_query".
    return lambda name, module: any(
        fnmatchcase(name, p) or fnmatchcase(name, "*." + p) for p in patterns
    )


def _linear_layers(
    parent: nn.Module, prefix: str = ""
) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """(name, layer, parent) for every nn.Linear and adapter layer, not looking inside adapters."""
    for child_name, child in parent.named_children():
        if isinstance(child, (AdapterLayer, nn.Linear)):
            yield prefix + child_name, child, parent
        else:
            yield from _linear_layers(child, prefix + child_name + ".")


def select_linear_layers(
    model: nn.Module, include: Selector = None, exclude: Selector = None
) -> dict[str, nn.Module]:
    """The ``nn.Linear`` (and adapter) layers that ``include`` and not ``exclude``, by name.

    Each is an ``fnmatch`` pattern matched against the qualified name or any dotted suffix
    (``"W_query"``, ``"trf_blocks.*.ff.*"``), a list of them, or a function ``(name, module) ->
    bool``; ``include=None`` means all. Children of ``READS_CHILD_WEIGHTS`` are skipped, warning.
    """
    included, excluded = _matcher(include, "include"), _matcher(exclude, "exclude")
    chosen = {}
    for name, layer, parent in _linear_layers(model):
        if not included(name, layer) or excluded(name, layer):
            continue
        if isinstance(parent, READS_CHILD_WEIGHTS):
            message = f"skipped {name!r}: {type(parent).__name__} reads its weight directly"
            warnings.warn(message + ", so an adapter there would break it", stacklevel=3)
        else:
            chosen[name] = layer
    return chosen


def _refuse_shared_layers(model: nn.Module, chosen: dict[str, nn.Module]) -> None:
    """Raise if a chosen layer object also sits at another place in the model."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    for name, layer in chosen.items():
        others = [other for other in names[id(layer)] if other != name]
        if others:
            raise ValueError(
                f"the nn.Linear at {name!r} is also at {others}: one adapter cannot serve both "
                f"places. Give each place its own copy (copy.deepcopy) first, or exclude {name!r}"
            )


def find_submodule(model: nn.Module, name: str, what: str) -> nn.Module:
    """``model.get_submodule(name)``, or a ValueError that calls it ``what`` and lists names."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        known = [n for n, _ in model.named_modules() if n][:8]
        raise ValueError(
            f"{what} {name!r} is not a module of this model; modules include {known}"
        ) from None


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` (``"trf_blocks.0.att.W_query"``) of ``model``."""
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """The model's adapter layers by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def require_adapter_layers(model: nn.Module, action: str) -> dict[str, AdapterLayer]:
    """``adapter_layers(model)``, or a ValueError saying that ``action`` needs some."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(
            f"{action}: the model has no adapter layers; call replace_linear_with_lora first"
        )
    return layers


def replace_linear_with_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    *,
    include: Selector = None,
    exclude: Selector = None,
    use_rslora: bool = False,
    dropout: float = 0.0,
    wrapper: Callable[..., AdapterLayer] = LinearWithLoRA,
    verbose: bool = False,
    **wrapper_kwargs: Any,
) -> nn.Module:
    """Wrap the chosen ``nn.Linear`` layers in place with ``wrapper`` (LoRA); return the model.

    ``include`` / ``exclude`` choose layers as in :func:`select_linear_layers`; each becomes
    ``wrapper(linear, rank, alpha, use_rslora=..., dropout=..., **wrapper_kwargs)``. Nothing is
    frozen here: call ``mark_only_lora_as_trainable`` next. Raises when nothing matches, when a
    chosen layer is already wrapped or sits at two places; on any error the model is unchanged.
    """
    if isinstance(model, nn.Linear):
        raise TypeError(
            "model is itself an nn.Linear; wrap it directly: LinearWithLoRA(linear, rank, alpha)"
        )
    chosen = select_linear_layers(model, include, exclude)
    if not chosen:
        names = [name for name, _, _ in _linear_layers(model)]
        listing = f"linear layers include {names[:8]}" if names else "it has no nn.Linear layers"
        raise ValueError(
            f"no linear layer matched include={include!r}, exclude={exclude!r}; {listing}"
        )
    for name, layer in chosen.items():
        if isinstance(layer, AdapterLayer):
            raise ValueError(
                f"layer {name!r} is already a {type(layer).__name__}; wrapping it again would "
                "stack two adapters. Exclude it, or start from a fresh base model"
            )
    _refuse_shared_layers(model, chosen)
    # Build every wrapper before touching the model, so that bad arguments leave it unchanged.
    wrapped, options = {}, {"use_rslora": use_rslora, "dropout": dropout, **wrapper_kwargs}
    for name, linear in chosen.items():
        try:
            wrapped[name] = wrapper(linear, rank, alpha, **options)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
    for name, layer in wrapped.items():
        set_submodule(model, name, layer)
    if verbose:
        kind, found = type(layer).__name__, len(list(_linear_layers(model)))
        print(f"Wrapped {len(wrapped)} of {found} linear layers with {kind} ({rank=}, {alpha=})")
    return model


# ----------------------------------------------------------------------------- freezing, counting


class ParameterCount(NamedTuple):
    total: int
    trainable: int


def mark_only_lora_as_trainable(
    model: nn.Module, extra_modules: str | Iterable[str] = ()
) -> nn.Module:
    """Freeze all but the adapters and the modules named in ``extra_modules`` (a new head, say)."""
    layers = require_adapter_layers(model, "mark_only_lora_as_trainable")
    names = [extra_modules] if isinstance(extra_modules, str) else list(extra_modules)
    extras = [find_submodule(model, name, "extra module") for name in names]  # check names first
    model.requires_grad_(False)
    for layer in layers.values():
        for p in layer.adapter_parameters():
            p.requires_grad_(True)
    for module in extras:
        module.requires_grad_(True)
    return model


def count_parameters(model: nn.Module) -> ParameterCount:
    """Total and trainable parameter counts (shared parameters counted once)."""
    params = list(model.parameters())
    return ParameterCount(
        sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    )


# ----------------------------------------------------------------------------- merging


def _refuse_non_finite(layers: dict[str, AdapterLayer]) -> None:
    for name, layer in layers.items():
        if not bool(torch.isfinite(layer.delta_weight()).all()):
            raise ValueError(
                f"cannot merge layer {name!r}: its update holds NaN or inf values (did training "
                "diverge?); nothing was merged"
            )


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter layer (for inference); if an update holds NaN or inf, none is."""
    layers = require_adapter_layers(model, "merge_lora")
    _refuse_non_finite(layers)
    for layer in layers.values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora``: every layer computes base + update separately again (exactly)."""
    for layer in require_adapter_layers(model, "unmerge_lora").values():
        layer.unmerge()
    return model


def unloaded_linear(layer: AdapterLayer) -> nn.Linear:
    """A new, frozen ``nn.Linear`` computing what ``layer`` computes (its update built in)."""
    layer.merge()
    weight, bias = layer.merged_weight, layer.linear.bias
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return linear


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by a plain ``nn.Linear`` with its update built in.

    Each new layer gets its own weight, so a base weight tied to another parameter (GPT-2's head
    and token embedding) keeps its value. If an update holds NaN or inf, nothing is replaced.
    ``merge_and_unload(layer)`` returns the plain layer for one adapter layer.
    """
    if isinstance(model, AdapterLayer):
        return unloaded_linear(model)
    layers = require_adapter_layers(model, "merge_and_unload")
    _refuse_non_finite(layers)
    for name, layer in layers.items():
        set_submodule(model, name, unloaded_linear(layer))
    return model


# ----------------------------------------------------------------------------- fingerprints


def base_digest(tensors: Mapping[str, Tensor]) -> str:
    """sha256 of each tensor's name, shape and every value rounded to bfloat16.

    Adapter files use it to recognise the base an adapter belongs to: another base (other weights
    or seed) differs in it, while a float32 base and its bfloat16 copy agree.
    """
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach()
        digest.update(f"{key}{tuple(tensor.shape)};".encode())
        rounded = tensor.to("cpu", torch.bfloat16).contiguous().view(torch.int16)
        digest.update(rounded.reshape(-1).numpy().data)  # hashed in place, not copied
    return digest.hexdigest()
