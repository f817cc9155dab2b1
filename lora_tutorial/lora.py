"""LoRA from scratch: wrap linear layers, freeze the rest, merge, and keep adapters on disk.

LoRA (Hu et al., 2021) leaves a pretrained linear layer ``y = x W^T + b`` frozen and learns a
low-rank update beside it::

    y = x W^T + b + scaling * (x @ A @ B)      A: (in_dim, rank), B: (rank, out_dim)

B starts at zero, so a freshly wrapped model computes exactly what the base model computed.

Scaling. ``scaling = alpha / rank`` by default, as in the LoRA paper and PEFT: the learning rate
you tune for one rank then roughly holds for another. ``use_rslora=True`` gives
``alpha / sqrt(rank)`` (rank-stabilised LoRA, Kalajdzievski 2023), which keeps the update from
shrinking as the rank grows. The code this module grew from multiplied by ``alpha`` alone; with that
convention the update (a sum of ``rank`` terms) grows with the rank, so every change of rank also
changes the effective learning rate. LLMs-from-scratch changed its appendix E code to
``alpha / rank`` for this reason (github.com/rasbt/LLMs-from-scratch, pull request 823, 2025).

Initialisation. A is drawn like the weight of ``nn.Linear(in_dim, rank)`` (uniform, bound
``1/sqrt(in_dim)``), as LoRA's reference code and PEFT do. Running ``kaiming_uniform_`` on A laid
out as ``(in_dim, rank)`` would take ``rank`` as the fan-in and draw values ``sqrt(in_dim/rank)``
times larger.

The extension point: adapter layers. Every wrapped layer is an :class:`AdapterLayer`, a frozen
``.linear`` plus trainable tensors, which provides

- ``kind`` (class attribute): the name under which it is registered in ``ADAPTER_KINDS`` (on class
  creation) and recorded in adapter files;
- ``config()``: JSON-friendly keyword arguments such that ``cls(linear, **config)`` rebuilds it;
- ``delta_weight()``: the update as an ``(out, in)`` matrix, which the default additive
  ``merge()`` / ``unmerge()`` use (override both when the update is not additive);
- ``adapter_state()``: the tensors an adapter file holds (default: everything outside ``.linear``);
- ``merged`` and ``merged_linear()``.

``replace_linear_with_lora(..., wrapper=MyLayer)`` applies any such class, and ``save_adapter`` /
``load_adapter`` store and rebuild it by its ``kind``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from fnmatch import fnmatchcase
from typing import Any, ClassVar, NamedTuple, Union

import torch
from torch import Tensor, nn

# ----------------------------------------------------------------------------- argument checks


def check_rank(rank: Any) -> None:
    """Raise ValueError unless ``rank`` is a positive integer (shared by every adapter layer)."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(
            f"rank must be a positive integer, got {rank!r}; typical values are 4, 8 or 16"
        )


def check_alpha(alpha: Any) -> None:
    """Raise ValueError unless ``alpha`` is a positive, finite number."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (0 < alpha < math.inf):
        raise ValueError(
            f"alpha must be a positive number, got {alpha!r}; a common choice is alpha = 2 * rank"
        )


def check_dropout(dropout: Any) -> None:
    """Raise ValueError unless ``dropout`` is a probability in [0, 1)."""
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not (0 <= dropout < 1):
        raise ValueError(
            f"dropout must be a probability in [0, 1), got {dropout!r}; use 0.0 for no dropout"
        )


# ----------------------------------------------------------------------------- layers


class LoRALayer(nn.Module):
    """The low-rank update ``scaling * (x @ A @ B)``: A ``(in_dim, rank)`` random, B ``(rank, out_dim)`` zero."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_rank(rank)
        check_alpha(alpha)
        check_dropout(dropout)
        self.rank, self.alpha, self.use_rslora, self.dropout_p = (
            int(rank),
            alpha,
            bool(use_rslora),
            float(dropout),
        )
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.A = nn.Parameter(torch.empty(in_dim, rank, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(rank, out_dim, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A.T, a=math.sqrt(5))  # A.T is (rank, in_dim): fan-in = in_dim
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def scaling_rule(self) -> str:
        return "alpha/sqrt(rank)" if self.use_rslora else "alpha/rank"

    def forward(self, x: Tensor) -> Tensor:
        # Scaling the thin (..., rank) activations rather than the (..., out_dim) result saves an
        # elementwise pass over the output, forward and backward; the product is the same.
        return (self.dropout(x) @ self.A * self.scaling) @ self.B

    def extra_repr(self) -> str:
        in_dim, out_dim = self.A.shape[0], self.B.shape[1]
        return (
            f"in_dim={in_dim}, out_dim={out_dim}, rank={self.rank}, alpha={self.alpha}, "
            f"scaling={self.scaling:g} ({self.scaling_rule}), dropout={self.dropout_p}"
        )


ADAPTER_KINDS: dict[str, type[AdapterLayer]] = {}


class AdapterLayer(nn.Module):
    """A frozen base ``nn.Linear`` (``.linear``) plus a trainable update: the contract every adapter kind meets.

    Subclasses set ``kind``, build their tensors in ``__init__(linear, **config)``, and implement
    ``forward``, ``config`` and ``delta_weight``; see the module docstring.
    """

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):
            ADAPTER_KINDS[cls.kind] = cls

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"linear must be an nn.Linear, got {type(linear).__name__}; "
                "adapters wrap linear layers only (use replace_linear_with_lora to find them in a model)"
            )
        self.linear = linear
        self.merged = False

    def config(self) -> dict[str, Any]:
        """Keyword arguments (JSON values) such that ``type(self)(linear, **config)`` rebuilds this layer."""
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        """The update to ``linear.weight``, shape ``(out_features, in_features)``."""
        raise NotImplementedError

    def adapter_state(self) -> dict[str, Tensor]:
        """The tensors an adapter file holds: this layer's state outside the base layer."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("linear.")}

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The parameters that train: everything outside the base layer."""
        return [p for name, p in self.named_parameters() if not name.startswith("linear.")]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``linear.weight`` so that inference costs what a plain layer costs. Harmless twice."""
        if not self.merged:
            self.linear.weight.add_(self.delta_weight().to(self.linear.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of ``linear.weight`` (exact up to float rounding). Harmless twice."""
        if self.merged:
            self.linear.weight.sub_(self.delta_weight().to(self.linear.weight.dtype))
            self.merged = False

    def merged_linear(self) -> nn.Module:
        """Merge and return the base layer, which now computes what this layer computed."""
        self.merge()
        return self.linear


class LinearWithLoRA(AdapterLayer):
    """``linear(x) + lora(x)``: a frozen ``nn.Linear`` (``.linear``) and its LoRA update (``.lora``)."""

    kind = "lora"

    def __init__(
        self,
        linear: nn.Linear,
        rank: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(linear)
        self.lora = LoRALayer(
            linear.in_features,
            linear.out_features,
            rank,
            alpha,
            use_rslora=use_rslora,
            dropout=dropout,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.linear(x)
        return self.linear(x) + self.lora(x)

    def config(self) -> dict[str, Any]:
        lora = self.lora
        return {
            "rank": lora.rank,
            "alpha": lora.alpha,
            "use_rslora": lora.use_rslora,
            "dropout": lora.dropout_p,
        }

    def delta_weight(self) -> Tensor:
        return (self.lora.scaling * (self.lora.A @ self.lora.B)).T

    def extra_repr(self) -> str:
        return f"merged={self.merged}"


# ----------------------------------------------------------------------------- finding and replacing layers

Selector = Union[str, Iterable[str], Callable[[str, nn.Module], bool], None]


def _name_matches(name: str, pattern: str) -> bool:
    """fnmatch on the qualified name or any dotted suffix (``"W_query"`` matches ``"blocks.0.att.W_query"``)."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def _matcher(selector: Selector, argument: str) -> Callable[[str, nn.Module], bool] | None:
    if selector is None or callable(selector):
        return selector
    patterns = [selector] if isinstance(selector, str) else list(selector)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"{argument} must be a name pattern, a list of patterns or a function (name, module) -> bool, "
            f"got {selector!r}"
        )
    return lambda name, module: any(_name_matches(name, p) for p in patterns)


def _linear_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) for every nn.Linear and adapter layer, without looking inside adapter layers."""

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for child_name, child in module.named_children():
            name = prefix + child_name
            if isinstance(child, (AdapterLayer, nn.Linear)):
                yield name, child
            else:
                yield from walk(child, name + ".")

    yield from walk(model, "")


def _get_submodule(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        known = [n for n, _ in model.named_modules() if n][:8]
        raise ValueError(
            f"{what} {name!r} is not a module of this model; modules include {known}"
        ) from None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """The model's adapter layers by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def _require_adapters(model: nn.Module, action: str) -> dict[str, AdapterLayer]:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(
            f"{action}: the model has no adapter layers; call replace_linear_with_lora(model, ...) first"
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
    """Wrap the model's ``nn.Linear`` layers in place with ``wrapper`` (LoRA by default) and return the model.

    ``include`` / ``exclude`` choose layers by qualified name: a pattern (``fnmatch``, matched
    against the full name or any dotted suffix, so ``"W_query"`` or ``"trf_blocks.*.ff.*"``), a
    list of patterns, or a function ``(name, module) -> bool``. ``include=None`` means every linear
    layer. Each chosen layer becomes ``wrapper(linear, rank, alpha, use_rslora=..., dropout=...,
    **wrapper_kwargs)``. ``verbose=True`` prints how many layers were wrapped; ``adapter_layers(model)``
    lists them. Nothing is frozen here: call ``mark_only_lora_as_trainable`` next.

    Raises ValueError when nothing matches (listing some linear layers) or when a chosen layer is
    already wrapped; on any error the model is left unchanged.
    """
    if isinstance(model, nn.Linear):
        raise TypeError(
            "model is itself an nn.Linear; wrap it directly: LinearWithLoRA(linear, rank, alpha)"
        )
    included, excluded = _matcher(include, "include"), _matcher(exclude, "exclude")
    found = list(_linear_layers(model))
    chosen = [
        (name, m)
        for name, m in found
        if (included is None or included(name, m))
        and not (excluded is not None and excluded(name, m))
    ]
    if not chosen:
        names = [name for name, _ in found]
        listing = (
            f"linear layers in this model include {names[:8]}"
            if names
            else "this model has no nn.Linear layers"
        )
        raise ValueError(
            f"no linear layer matched include={include!r}, exclude={exclude!r}; {listing}"
        )
    for name, m in chosen:
        if isinstance(m, AdapterLayer):
            raise ValueError(
                f"layer {name!r} is already a {type(m).__name__}; wrapping it again would stack two adapters. "
                "Exclude it, or start from a fresh base model"
            )
    # Build every wrapper before touching the model, so that bad arguments leave it unchanged.
    wrapped = {
        name: wrapper(m, rank, alpha, use_rslora=use_rslora, dropout=dropout, **wrapper_kwargs)
        for name, m in chosen
    }
    for name, layer in wrapped.items():
        _set_submodule(model, name, layer)
    if verbose:
        kind = type(next(iter(wrapped.values()))).__name__
        print(
            f"Wrapped {len(wrapped)} of {len(found)} linear layers with {kind} (rank={rank}, alpha={alpha})"
        )
    return model


# ----------------------------------------------------------------------------- freezing and counting


class ParameterCount(NamedTuple):
    total: int
    trainable: int


def mark_only_lora_as_trainable(model: nn.Module, extra: str | Iterable[str] = ()) -> nn.Module:
    """Freeze everything except the adapters and the modules named in ``extra`` (e.g. a new ``"out_head"``)."""
    layers = _require_adapters(model, "mark_only_lora_as_trainable")
    extras = [extra] if isinstance(extra, str) else list(extra)
    extra_modules = [
        _get_submodule(model, name, "extra module") for name in extras
    ]  # check names first
    model.requires_grad_(False)
    for layer in layers.values():
        for p in layer.adapter_parameters():
            p.requires_grad_(True)
    for module in extra_modules:
        module.requires_grad_(True)
    return model


def count_parameters(model: nn.Module) -> ParameterCount:
    """Total and trainable parameter counts (shared parameters counted once)."""
    params = list(model.parameters())
    return ParameterCount(
        sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    )


# ----------------------------------------------------------------------------- merging


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter layer into its base weight (for inference); harmless if already merged."""
    for layer in _require_adapters(model, "merge_lora").values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora``: take every update back out of its base weight."""
    for layer in _require_adapters(model, "unmerge_lora").values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter layer and put its base layer back in its place: a plain model with the update built in."""
    if isinstance(model, AdapterLayer):
        return model.merged_linear()
    for name, layer in _require_adapters(model, "merge_and_unload").items():
        _set_submodule(model, name, layer.merged_linear())
    return model
