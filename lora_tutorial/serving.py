"""Many LoRA adapters on one base model: a batched forward pass where each row uses its own adapter.

A server that hosts one fine-tuned task per customer need not keep one model per task. The base
weights ``W`` are shared; adapter ``k`` adds only ``x @ A_k @ B_k`` (scaled). Stacking the
adapters' factors into ``A[k]`` ``(n, in_dim, rank)`` and ``B[k]`` ``(n, rank, out_dim)``, a mixed
batch runs in one pass::

    y_i = x_i W^T + b + x_i @ A[ids_i] @ B[ids_i]        (one batched matrix product for all rows)

This is the idea behind S-LoRA (Sheng et al., 2023, arXiv:2311.03285) and Punica (Chen et al.,
2023, arXiv:2310.18547), which add custom GPU kernels and memory paging; here it is two
``torch.bmm`` calls. Adapters of different ranks are zero-padded to the largest rank (zero columns
of ``A`` and rows of ``B`` add nothing), a layer one adapter does not adapt gets zero factors, and
each adapter's scaling is folded into its ``B``.

- :class:`MultiAdapterModel` builds the shared model from a base and adapted copies of it, and runs
  ``model(*inputs, adapter_ids=ids)``.
- :func:`forward_merging_per_request` and :func:`forward_per_task_models` are the two simple
  alternatives the chapter and ``benchmarks/bench_serving.py`` time it against.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from lora_tutorial.lora import (
    LinearWithLoRA,
    adapter_layers,
    find_submodule,
    merge_and_unload,
    merge_lora,
    set_submodule,
    unmerge_lora,
)
from lora_tutorial.runtime import rehearsal
from lora_tutorial.runtime.checks import is_number


def multi_lora_delta(x: Tensor, A: Tensor, B: Tensor, adapter_ids: Tensor) -> Tensor:
    """Row ``i`` of ``x`` ``(batch, ..., in_dim)`` times ``A[ids_i] @ B[ids_i]``."""
    batch = x.shape[0]
    rows = x.reshape(batch, -1, x.shape[-1])  # (batch, tokens, in_dim)
    update = torch.bmm(torch.bmm(rows, A[adapter_ids]), B[adapter_ids])
    return update.reshape(*x.shape[:-1], B.shape[-1])


class _RowSelected(nn.Module):
    """A layer whose output depends on ``adapter_ids``, which :class:`MultiAdapterModel` sets."""

    adapter_ids: Tensor | None

    def _ids(self, x: Tensor) -> Tensor:
        ids = self.adapter_ids
        if ids is None:
            raise RuntimeError(
                "no adapter_ids set; call the MultiAdapterModel with adapter_ids=..., "
                "not its layers"
            )
        if ids.shape != (x.shape[0],):
            raise ValueError(
                f"adapter_ids has shape {tuple(ids.shape)}, but the batch has {x.shape[0]} rows; "
                "give one adapter index per row"
            )
        return ids


class MultiLoRALinear(_RowSelected):
    """A frozen ``nn.Linear`` and ``n`` stacked LoRA updates; row ``i`` uses update ``ids[i]``.

    ``A``: ``(n, in_dim, rank)``, ``B``: ``(n, rank, out_dim)``; scalings folded into ``B``.
    """

    A: Tensor
    B: Tensor

    def __init__(self, linear: nn.Linear, A: Tensor, B: Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("A", A)
        self.register_buffer("B", B)
        self.adapter_ids = None

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x) + multi_lora_delta(x, self.A, self.B, self._ids(x))


class MultiLinear(_RowSelected):
    """``n`` whole linear layers of one shape (each task's head, say); row ``i`` uses ``ids[i]``."""

    weight: Tensor
    bias: Tensor | None

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)  # (n, out_dim, in_dim)
        self.register_buffer("bias", bias)  # (n, out_dim) or None
        self.adapter_ids = None

    def forward(self, x: Tensor) -> Tensor:
        ids = self._ids(x)
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        out = torch.bmm(rows, self.weight[ids].transpose(1, 2))
        if self.bias is not None:
            out = out + self.bias[ids].unsqueeze(1)
        return out.reshape(*x.shape[:-1], self.weight.shape[1])


def _stack_lora(name: str, base_linear: nn.Linear, adapted: Sequence[nn.Module]) -> MultiLoRALinear:
    """Stack every adapted model's LoRA factors for layer ``name`` (zeros where one has none)."""
    found = [adapter_layers(m).get(name) for m in adapted]
    layers = [layer if isinstance(layer, LinearWithLoRA) else None for layer in found]
    rank = max(layer.lora.A.shape[1] for layer in layers if layer is not None)
    n, in_dim, out_dim = len(adapted), base_linear.in_features, base_linear.out_features
    like = base_linear.weight
    A = torch.zeros(n, in_dim, rank, dtype=like.dtype, device=like.device)
    B = torch.zeros(n, rank, out_dim, dtype=like.dtype, device=like.device)
    for k, layer in enumerate(layers):
        if layer is None:
            continue
        r = layer.lora.A.shape[1]
        A[k, :, :r] = layer.lora.A.detach()
        B[k, :r, :] = layer.lora.B.detach() * layer.lora.scaling
    return MultiLoRALinear(base_linear, A, B)


def _stack_linear(name: str, adapted: Sequence[nn.Module]) -> MultiLinear:
    found = [find_submodule(m, name, "extra module") for m in adapted]
    modules = [m for m in found if isinstance(m, nn.Linear)]
    if len(modules) != len(found):
        raise TypeError(f"extra module {name!r} must be an nn.Linear in every adapted model")
    shapes = [tuple(m.weight.shape) for m in modules]
    if len(set(shapes)) > 1:
        raise ValueError(
            f"extra module {name!r} has different shapes in the adapted models ({shapes}; "
            "(out, in) each): one batch needs one output size, so serve models whose heads have "
            "different numbers of classes separately"
        )
    weight = torch.stack([m.weight.detach() for m in modules])
    has_bias = [m.bias is not None for m in modules]
    if any(has_bias) and not all(has_bias):
        raise ValueError(f"extra module {name!r} has a bias in some adapted models only")
    bias = torch.stack([m.bias.detach() for m in modules]) if all(has_bias) else None
    return MultiLinear(weight, bias)


def _check_adapted(adapted: Sequence[nn.Module], base: nn.Module, extras: list[str]) -> list[str]:
    """The adapted layers' names (union over the models), once checked that they share ``base``."""
    if not adapted:
        raise ValueError("adapted is empty: give at least one model with LoRA layers")
    names: list[str] = []
    base_state = base.state_dict()
    for k, model in enumerate(adapted):
        layers = adapter_layers(model)
        if not layers:
            raise ValueError(f"adapted[{k}] has no adapter layers; apply LoRA to it first")
        for name, layer in layers.items():
            if type(layer) is not LinearWithLoRA:
                raise TypeError(
                    f"adapted[{k}].{name} is a {type(layer).__name__}; batched serving here stacks "
                    "plain LoRA (LinearWithLoRA) only: merge other variants into one model per task"
                )
            if layer.merged:
                raise ValueError(f"adapted[{k}].{name} is merged; unmerge it (lora.unmerge_lora)")
            if not bool(torch.isfinite(layer.delta_weight()).all()):
                raise ValueError(
                    f"adapted[{k}].{name}: its update holds NaN or inf values (did training "
                    "diverge?); it cannot be served"
                )
            if name not in names:
                names.append(name)
        renamed = {f"{name}.linear.": f"{name}." for name in layers}
        for key, value in model.state_dict().items():
            if any(key.startswith(f"{prefix}.") for prefix in [*extras, *layers]) and not any(
                key.startswith(wrapped) for wrapped in renamed
            ):
                continue  # trained tensors: the LoRA factors and the extra modules
            plain = next(
                (key.replace(w, b, 1) for w, b in renamed.items() if key.startswith(w)), key
            )
            if plain not in base_state or not torch.equal(base_state[plain], value):
                raise ValueError(
                    f"adapted[{k}] differs from the base model in {key!r}: every adapter must be "
                    "trained on the same frozen base (name changed weights in extra_modules)"
                )
    return names


class MultiAdapterModel(nn.Module):
    """One frozen base model serving ``len(adapted)`` LoRA adapters at once, one per row of a batch.

    ``base`` is the model without adapters (it is copied, not changed); ``adapted`` are copies of it
    with LoRA layers (any subset of layers, any ranks), e.g. one per task; ``extra_modules`` names
    linear layers that each adapted model trained in full (such as a classifier head), which are
    stacked too. Call ``model(*inputs, adapter_ids=ids)`` with one adapter index per row.
    """

    def __init__(
        self,
        base: nn.Module,
        adapted: Sequence[nn.Module],
        extra_modules: str | Iterable[str] = (),
    ) -> None:
        super().__init__()
        extras = [extra_modules] if isinstance(extra_modules, str) else list(extra_modules)
        names = _check_adapted(adapted, base, extras)
        self.base = copy.deepcopy(base).requires_grad_(False)
        self.num_adapters = len(adapted)
        for name in names:
            linear = find_submodule(self.base, name, "adapted layer")
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"{name!r} in the base model is a {type(linear).__name__}")
            set_submodule(self.base, name, _stack_lora(name, linear, adapted))
        for name in extras:
            find_submodule(self.base, name, "extra module")
            set_submodule(self.base, name, _stack_linear(name, adapted))
        self._selected = [m for m in self.base.modules() if isinstance(m, _RowSelected)]

    def forward(self, *inputs: Tensor, adapter_ids: Tensor | Sequence[int]) -> Tensor:
        if not inputs:
            raise ValueError("give the model's inputs: model(input_ids, adapter_ids=ids)")
        ids = adapter_id_tensor(adapter_ids, self.num_adapters).to(inputs[0].device)
        for module in self._selected:
            module.adapter_ids = ids
        try:
            return self.base(*inputs)
        finally:
            for module in self._selected:
                module.adapter_ids = None


def adapter_id_tensor(adapter_ids: Tensor | Sequence[int], num_adapters: int) -> Tensor:
    """``adapter_ids`` as a long tensor, once checked: whole numbers in ``0..num_adapters - 1``.

    A float (``0.2``), a bool or a negative number is refused rather than rounded or wrapped; so is
    an empty batch, which has nothing to answer.
    """
    if isinstance(adapter_ids, Tensor):
        if adapter_ids.dtype == torch.bool or adapter_ids.is_floating_point():
            raise ValueError(
                f"adapter_ids must hold integers, got a {adapter_ids.dtype} tensor; use dtype=long"
            )
        values = adapter_ids.reshape(-1).tolist() if adapter_ids.ndim == 1 else None
    else:
        values = list(adapter_ids) if isinstance(adapter_ids, Sequence) else None
    if values is None or not all(is_number(v, integer=True) for v in values):
        raise ValueError(
            f"adapter_ids must be one whole number per row (a list or a 1-d tensor), got "
            f"{adapter_ids!r}"
        )
    if not values:
        raise ValueError(
            "adapter_ids is empty: give one adapter index per row of a non-empty batch"
        )
    if not all(0 <= v < num_adapters for v in values):
        raise ValueError(f"adapter_ids must lie in 0..{num_adapters - 1}, got {values}")
    return torch.tensor(values, dtype=torch.long)


# ----------------------------------------------------------------------------- the alternatives


def _rows(inputs: Sequence[Tensor], index: Tensor) -> list[Tensor]:
    return [t[index] for t in inputs]


@torch.no_grad()
def forward_merging_per_request(
    adapted: Sequence[nn.Module], *inputs: Tensor, adapter_ids: Sequence[int]
) -> Tensor:
    """Answer each row (request) alone: merge its adapter into the weights, run it, unmerge.

    One set of weights in memory, but every request pays two passes over its adapted weights and
    runs with a batch of one.
    """
    ids = adapter_id_tensor(adapter_ids, len(adapted)).tolist()
    outputs = []
    for i, k in enumerate(ids):
        model = adapted[k]
        merge_lora(model)
        try:
            outputs.append(model(*_rows(inputs, torch.tensor([i]))))
        finally:
            unmerge_lora(model)
    return torch.cat(outputs)


def merged_copies(adapted: Sequence[nn.Module]) -> list[nn.Module]:
    """One plain model per task with its adapter merged in (copies: ``adapted`` stays as it is)."""
    return [merge_and_unload(copy.deepcopy(m)) for m in adapted]


@torch.no_grad()
def forward_per_task_models(
    merged: Sequence[nn.Module], *inputs: Tensor, adapter_ids: Sequence[int]
) -> Tensor:
    """Group the rows by task and run each group through that task's own merged model.

    As fast as a plain model per group, but it keeps ``len(merged)`` full copies of the weights.
    """
    ids = adapter_id_tensor(adapter_ids, len(merged))
    out: Tensor | None = None
    for k in ids.unique().tolist():
        index = (ids == k).nonzero().flatten()
        part = merged[k](*_rows(inputs, index.to(inputs[0].device)))
        if out is None:
            out = part.new_empty((len(ids), *part.shape[1:]))
        out[index.to(part.device)] = part
    if out is None:
        raise ValueError("adapter_ids is empty: give one adapter index per row")
    return out


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    rounds: int = 7,
    device: torch.device | None = None,
    warm_up: bool = True,
) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternating rounds after one warm-up call.

    Interleaving means a burst of load from other processes slows every candidate alike, and the
    median ignores the rounds it spoiled; compare the results as ratios from the same call.
    ``warm_up=False`` leaves out the warm-up calls, for functions that have just been called.
    A rehearsal times at most two rounds: it only proves that the code runs.
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: time at least one round")
    rounds = rehearsal.capped_steps(rounds)

    def sync() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns.values() if warm_up else ():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def _bytes_held(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@torch.no_grad()
def compare_strategies(
    served: MultiAdapterModel,
    adapted: Sequence[nn.Module],
    *inputs: Tensor,
    adapter_ids: Tensor,
    rounds: int = 7,
) -> dict[str, dict[str, float]]:
    """Answer one mixed batch three ways and compare: time, weights held, agreement.

    The three ways: ``served`` (one batched pass), :func:`forward_merging_per_request` on
    ``adapted`` and :func:`forward_per_task_models` on merged copies of ``adapted``. Returns, per
    way, its median time over ``rounds`` interleaved rounds divided by the batched pass's, the
    megabytes of weights it keeps, and its largest difference to the batched pass's output. A
    rehearsal, which only proves the code runs, times two rounds.
    """
    merged = merged_copies(adapted)
    ids = adapter_ids.tolist()
    batched = "batched multi-adapter"
    strategies: dict[str, Callable[[], Tensor]] = {
        batched: lambda: served(*inputs, adapter_ids=adapter_ids),
        "merge per request": lambda: forward_merging_per_request(adapted, *inputs, adapter_ids=ids),
        "one merged model per task": lambda: forward_per_task_models(
            merged, *inputs, adapter_ids=ids
        ),
    }
    outputs = {name: fn() for name, fn in strategies.items()}  # also the timing's warm-up
    device = inputs[0].device if inputs else None
    timed: dict[str, Callable[[], object]] = dict(strategies)
    seconds = time_interleaved(
        timed, rounds=rehearsal.capped_steps(rounds), device=device, warm_up=False
    )
    one_model = _bytes_held(merged[0])
    held = {batched: _bytes_held(served), "merge per request": one_model}
    held["one merged model per task"] = one_model * len(merged)
    return {
        name: {
            "time / batched": seconds[name] / seconds[batched],
            "weights held (MB)": held[name] / 1e6,
            "max diff to batched": (outputs[name] - outputs[batched]).abs().max().item(),
        }
        for name in strategies
    }


__all__ = [
    "MultiAdapterModel",
    "MultiLinear",
    "MultiLoRALinear",
    "adapter_id_tensor",
    "compare_strategies",
    "forward_merging_per_request",
    "forward_per_task_models",
    "merged_copies",
    "multi_lora_delta",
    "time_interleaved",
]
