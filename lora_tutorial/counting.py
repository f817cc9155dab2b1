"""Counting what LoRA saves: parameters, bytes, and the memory and time of a training step.

- **Parameters** (chapter 2): how many numbers a dense layer and its LoRA adapter hold, every
  linear layer of GPT-2 by name, and the whole model, without building it.
- **Bytes**: one memory model, :class:`TrainingRecipe`, of what training keeps per trained
  parameter (weight, gradient, AdamW's two moments, an optional float32 master copy) and per
  frozen one; :data:`RECIPES` names three (``"fp32"``: 16 bytes, chapter 2's runs; ``"bf16-mixed"``:
  2 + 2 + 8 + 4 = 16; ``"bf16"``: 2 + 2 + 8 = 12, QLoRA's accounting, chapter 8).
  :func:`training_state_bytes` and :func:`finetuning_memory` (LLaMA-shaped models, 7B to 65B, in
  full, with LoRA and with QLoRA) both derive from it.
- **Measured** (chapters 2, 3 and 5): the peak memory of a block of code (:class:`PeakMemory`), one
  training step's time, state and activation bytes (:func:`measure_training_step`), to set
  beside the predictions, and forward passes timed side by side (:func:`time_forward_passes`).

Conventions, shared with :mod:`lora_tutorial.lora`: a weight ``W`` has shape ``(out_dim, in_dim)``
as in ``nn.Linear.weight``; its adapter holds ``A`` of shape ``(in_dim, rank)`` and ``B`` of shape
``(rank, out_dim)``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_tutorial.runtime import rehearsal
from lora_tutorial.runtime.checks import check_number, check_positive
from lora_tutorial.runtime.rehearsal import peak_rss_bytes

# --------------------------------------------------------------------------- parameter counts


def _check_dims(**dims: int) -> None:
    for name, value in dims.items():
        check_positive(name, value, integer=True, hint="pass a whole number of at least 1")


def full_param_count(in_dim: int, out_dim: int) -> int:
    """Numbers in a dense ``(out_dim, in_dim)`` weight: what full fine-tuning trains."""
    _check_dims(in_dim=in_dim, out_dim=out_dim)
    return in_dim * out_dim


def lora_param_count(in_dim: int, out_dim: int, rank: int) -> int:
    """Numbers in a LoRA adapter for that weight: ``rank * (in_dim + out_dim)`` (A plus B)."""
    _check_dims(in_dim=in_dim, out_dim=out_dim, rank=rank)
    return rank * (in_dim + out_dim)


@dataclass(frozen=True)
class LinearShape:
    """One ``nn.Linear`` of a model: name (as in ``named_modules``), sizes, whether it has bias."""

    name: str
    in_dim: int
    out_dim: int
    bias: bool


def gpt_linear_shapes(cfg: Mapping, num_classes: int | None = None) -> list[LinearShape]:
    """Every linear layer of ``gpt.GPTModel(cfg)``, named as in the model, without building it.

    ``num_classes`` replaces the vocabulary output head by a classification head (with a bias,
    as ``nn.Linear`` has by default), as the spam classifier does.
    """
    d, n_layers, qkv_bias = cfg["emb_dim"], cfg["n_layers"], bool(cfg["qkv_bias"])
    shapes = []
    for i in range(n_layers):
        block = f"trf_blocks.{i}"
        for proj in ("W_query", "W_key", "W_value"):
            shapes.append(LinearShape(f"{block}.att.{proj}", d, d, qkv_bias))
        shapes.append(LinearShape(f"{block}.att.out_proj", d, d, True))
        shapes.append(LinearShape(f"{block}.ff.layers.0", d, 4 * d, True))
        shapes.append(LinearShape(f"{block}.ff.layers.2", 4 * d, d, True))
    if num_classes is None:
        shapes.append(LinearShape("out_head", d, cfg["vocab_size"], False))
    else:
        shapes.append(LinearShape("out_head", d, num_classes, True))
    return shapes


def gpt_param_count(cfg: Mapping, num_classes: int | None = None, *, tied_head: bool = True) -> int:
    """All parameters of ``gpt.GPTModel(cfg)`` (embeddings, blocks, norms, head), unbuilt.

    GPT-2's vocabulary head shares its weight with the token embedding (``tied_head=True``, as
    ``GPTModel`` does), so it adds nothing; ``tied_head=False`` counts it separately, as untied
    implementations do. A classification head (``num_classes``) is always a separate layer.
    """
    d = cfg["emb_dim"]
    embeddings = (cfg["vocab_size"] + cfg["context_length"]) * d
    norms = (
        (2 * cfg["n_layers"] + 1) * 2 * d
    )  # two LayerNorms per block plus the final one; scale and shift
    shapes = gpt_linear_shapes(cfg, num_classes)
    if num_classes is None and tied_head:
        shapes = [s for s in shapes if s.name != "out_head"]
    linears = sum(s.in_dim * s.out_dim + (s.out_dim if s.bias else 0) for s in shapes)
    return embeddings + norms + linears


def lora_params_for(
    shapes: Iterable[LinearShape], rank: int, select: Callable[[str], bool] | None = None
) -> int:
    """LoRA parameters for the layers in ``shapes`` whose name passes ``select`` (all when None)."""
    return sum(
        lora_param_count(s.in_dim, s.out_dim, rank)
        for s in shapes
        if select is None or select(s.name)
    )


# --------------------------------------------------------------------------- bytes

_NAMED_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
}


def bytes_per_param(dtype: torch.dtype | str) -> int:
    """Bytes one number takes in ``dtype`` (a torch dtype or a name such as ``"bfloat16"``)."""
    if isinstance(dtype, str):
        if dtype not in _NAMED_DTYPES:
            raise ValueError(
                f"unknown dtype name {dtype!r}; use one of {sorted(_NAMED_DTYPES)} or a torch.dtype"
            )
        dtype = _NAMED_DTYPES[dtype]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or a name, got {type(dtype).__name__}")
    return torch.empty((), dtype=dtype).element_size()


def adapter_bytes(n_params: int, dtype: torch.dtype | str = torch.float32) -> int:
    """Bytes of ``n_params`` adapter weights on disk or in memory (file headers not included)."""
    return n_params * bytes_per_param(dtype)


def adamw_state_bytes(n_trainable: int, dtype: torch.dtype | str = torch.float32) -> int:
    """Bytes of AdamW's state: two running averages (first and second moment) per trained number."""
    return 2 * n_trainable * bytes_per_param(dtype)


@dataclass(frozen=True)
class TrainingRecipe:
    """Bytes that training keeps per parameter, by kind: one memory model for the whole book.

    A *trained* parameter holds its weight, its gradient, AdamW's two moments and, in mixed
    precision, a float32 master copy of the weight that the optimizer updates; a *frozen*
    parameter holds only its weight.
    """

    name: str
    weight: int  # the trained weight as the forward pass reads it
    grad: int
    adam_moments: int  # both moments together
    master: int  # the float32 master copy of a trained weight (0: none)
    frozen: int  # a frozen weight

    @property
    def per_trained(self) -> int:
        """Bytes per trained parameter: weight + gradient + moments + master copy."""
        return self.weight + self.grad + self.adam_moments + self.master


RECIPES: dict[str, TrainingRecipe] = {
    # everything in float32: what the book's own CPU runs do (chapter 2 measures it)
    "fp32": TrainingRecipe("fp32", weight=4, grad=4, adam_moments=8, master=0, frozen=4),
    # the usual mixed precision: bf16 weights and gradients, fp32 moments and master weights
    "bf16-mixed": TrainingRecipe(
        "bf16-mixed", weight=2, grad=2, adam_moments=8, master=4, frozen=2
    ),
    # bf16 weights and gradients, fp32 moments, no master copy: QLoRA's accounting (chapter 8)
    "bf16": TrainingRecipe("bf16", weight=2, grad=2, adam_moments=8, master=0, frozen=2),
}


def training_recipe(recipe: TrainingRecipe | str) -> TrainingRecipe:
    """``recipe`` itself, or the recipe of that name in :data:`RECIPES`."""
    if isinstance(recipe, TrainingRecipe):
        return recipe
    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise ValueError(
            f"unknown training recipe {recipe!r}; use one of {sorted(RECIPES)} or a TrainingRecipe"
        )
    return RECIPES[recipe]


@dataclass(frozen=True)
class TrainingStateBytes:
    """Bytes that training keeps for the whole run, apart from activations."""

    weights: int
    grads: int
    optimizer: int
    master: int = 0  # float32 master copies of the trained weights (mixed precision)

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.master


def training_state_bytes(
    n_total: int, n_trainable: int, recipe: TrainingRecipe | str = "fp32"
) -> TrainingStateBytes:
    """Predicted bytes of weights (all), gradients, AdamW state and master copies (trained only).

    ``recipe`` (a :class:`TrainingRecipe` or a name in :data:`RECIPES`) says how many bytes each
    kind takes; the default, ``"fp32"``, is 16 bytes per trained and 4 per frozen parameter.
    """
    if not 0 <= n_trainable <= n_total:
        raise ValueError(
            f"need 0 <= n_trainable <= n_total, got n_trainable={n_trainable}, n_total={n_total}"
        )
    rec = training_recipe(recipe)
    n_frozen = n_total - n_trainable
    return TrainingStateBytes(
        weights=n_trainable * rec.weight + n_frozen * rec.frozen,
        grads=n_trainable * rec.grad,
        optimizer=n_trainable * rec.adam_moments,
        master=n_trainable * rec.master,
    )


def megabytes(n_bytes: float) -> float:
    """Bytes as megabytes (10**6 bytes, the unit papers and file browsers use), for tables."""
    return n_bytes / 1e6


def gigabytes(n_bytes: float) -> float:
    """Bytes as gigabytes (10**9 bytes), for tables."""
    return n_bytes / 1e9


# --------------------------------------------------------------------------- real models
# Memory for fine-tuning LLaMA-shaped models (Touvron et al., 2023, arXiv:2302.13971, Table 2:
# width, layers; feed-forward width 2/3 * 4d rounded to 256). The estimates count what training
# keeps for the whole run, not the activations (which depend on batch size, sequence length and
# gradient checkpointing). Each trained number costs what the training recipe says (RECIPES; the
# default "bf16": weight and gradient in bf16, AdamW's two moments in float32, 12 bytes: the
# accounting behind QLoRA's "more than 780 GB" for a 65B model); the frozen weights cost:
# - full: nothing frozen;
# - lora: the recipe's bytes per frozen weight (2 in bf16);
# - qlora: the blocks' linear weights in NF4 with double quantisation (Dettmers et al., 2023):
#   4 bits per weight, an 8-bit scale per block of 64 weights and a float32 constant per 256
#   scales, 4 + 8/64 + 32/(64*256) = 4.127 bits; embeddings, output head and norms at the
#   recipe's bytes per frozen weight.

# Touvron et al. (2023), Table 2; vocab 32,000; separate (untied) input embedding and output head.
LLAMA_CONFIGS: dict[str, dict[str, int]] = {
    "llama-7b": {"emb_dim": 4096, "n_layers": 32, "ff_dim": 11008, "vocab_size": 32000},
    "llama-13b": {"emb_dim": 5120, "n_layers": 40, "ff_dim": 13824, "vocab_size": 32000},
    "llama-33b": {"emb_dim": 6656, "n_layers": 60, "ff_dim": 17920, "vocab_size": 32000},
    "llama-65b": {"emb_dim": 8192, "n_layers": 80, "ff_dim": 22016, "vocab_size": 32000},
}
SIZING_METHODS = ("full", "lora", "qlora")
NF4_BLOCK, SCALE_BLOCK = 64, 256  # weights per NF4 scale; scales per float32 constant
NF4_DQ_BITS = 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * SCALE_BLOCK)  # 4.127 bits per weight


def llama_linear_shapes(cfg: Mapping[str, int]) -> list[LinearShape]:
    """The linear layers of LLaMA's blocks: q, k, v, o and gated feed-forward (gate, up, down)."""
    d, f = cfg["emb_dim"], cfg["ff_dim"]
    shapes = []
    for i in range(cfg["n_layers"]):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes.append(LinearShape(f"layers.{i}.attn.{name}", d, d, False))
        shapes.append(LinearShape(f"layers.{i}.mlp.gate_proj", d, f, False))
        shapes.append(LinearShape(f"layers.{i}.mlp.up_proj", d, f, False))
        shapes.append(LinearShape(f"layers.{i}.mlp.down_proj", f, d, False))
    return shapes


def llama_param_count(cfg: Mapping[str, int]) -> tuple[int, int]:
    """(all parameters, of which in the blocks' linear layers) of a LLaMA-shaped model."""
    d = cfg["emb_dim"]
    linear = sum(s.in_dim * s.out_dim for s in llama_linear_shapes(cfg))
    embeddings_and_head = 2 * cfg["vocab_size"] * d
    norms = (2 * cfg["n_layers"] + 1) * d  # RMSNorm: one scale vector per norm
    return linear + embeddings_and_head + norms, linear


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes that fine-tuning keeps for the whole run (no activations), by kind."""

    method: str
    params: int
    trainable: int
    weights: float  # the model's weights (frozen and trained), as stored
    grads: float
    optimizer: float
    master: float = 0.0  # float32 master copies of the trained weights, if the recipe keeps them

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.master


def finetuning_memory(
    cfg: Mapping[str, int],
    method: str,
    *,
    rank: int = 64,
    recipe: TrainingRecipe | str = "bf16",
) -> MemoryEstimate:
    """Memory of ``method`` (``"full"``, ``"lora"`` or ``"qlora"``) for a LLaMA-shaped ``cfg``.

    LoRA and QLoRA adapt every linear layer of the blocks with ``rank`` (QLoRA's setting: r = 64
    on all linear layers). ``recipe`` gives the bytes per trained and per frozen number (see
    :data:`RECIPES`); the default ``"bf16"`` is 12 bytes per trained number, as QLoRA counts.
    """
    if method not in SIZING_METHODS:
        raise ValueError(f"method={method!r} is not one of {SIZING_METHODS}")
    rec = training_recipe(recipe)
    total, linear = llama_param_count(cfg)
    n_trained = total if method == "full" else lora_params_for(llama_linear_shapes(cfg), rank)
    if method == "full":
        frozen = 0.0
    elif method == "lora":
        frozen = float(total * rec.frozen)
    else:
        frozen = linear * NF4_DQ_BITS / 8 + (total - linear) * rec.frozen
    params = total if method == "full" else total + n_trained
    return MemoryEstimate(
        method,
        params,
        n_trained,
        weights=frozen + n_trained * rec.weight,
        grads=n_trained * rec.grad,
        optimizer=n_trained * rec.adam_moments,
        master=n_trained * rec.master,
    )


# --------------------------------------------------------------------------- measured


def _rss_bytes() -> int:
    """Resident memory of this process now (Linux), or its high-water mark elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


class PeakMemory:
    """Context manager measuring the peak memory of the code inside it; read ``.peak_bytes``.

    On CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, weights included). Elsewhere:
    the process's resident memory (RSS), sampled every 5 ms by a thread; it includes Python,
    the libraries and memory the allocator kept from earlier work, so compare methods in
    fresh processes. ``.measure`` says which of the two was used.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self.measure = (
            "torch.cuda.max_memory_allocated (tensor memory on the GPU)"
            if device.type == "cuda"
            else "process resident memory (RSS), sampled every 5 ms"
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())


def _storage_key(t: Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def measured_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainingStateBytes:
    """Bytes held right now by the model's parameters, their gradients and the optimizer state."""
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    state = sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, Tensor) and v.ndim > 0  # AdamW's step counter is a 0-d tensor
    )
    return TrainingStateBytes(weights, grads, state)


@contextmanager
def count_saved_activations(model: nn.Module) -> Iterator[dict[str, int]]:
    """Count the bytes autograd saves for the backward pass (the activations) inside the block.

    Tensors that share storage are counted once, and the model's own parameters are not counted.
    The result is in ``counter["bytes"]`` when the block ends.
    """
    param_keys = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[tuple[int, int]] = set()
    counter = {"bytes": 0}

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key[0] not in param_keys and key not in seen:
            seen.add(key)
            counter["bytes"] += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield counter


@dataclass(frozen=True)
class StepMeasurement:
    """One measured training step: time, state and activation bytes, device peak if known."""

    seconds: float
    state: TrainingStateBytes
    activation_bytes: int
    device_peak_bytes: int | None  # torch.cuda.max_memory_allocated on CUDA, None elsewhere


def measure_training_step(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    repeats: int = 3,
) -> StepMeasurement:
    """Measure ``repeats`` training steps (``loss_fn(model)``, backward, ``optimizer.step()``).

    The first step is a warm-up (it creates the optimizer state); the time is the median of the
    others. On CUDA the peak of allocated memory during the steps is recorded too. A rehearsal
    runs two steps (one warm-up, one timed): it only proves that the measurement works.
    """
    check_number("repeats", repeats, integer=True, at_least=2, hint="one warm-up step, one timed")
    repeats = rehearsal.capped_steps(repeats)
    device = next(model.parameters()).device
    on_cuda = device.type == "cuda"
    times, activations = [], 0
    for i in range(repeats):
        optimizer.zero_grad(set_to_none=True)
        if on_cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with count_saved_activations(model) as saved:
            loss = loss_fn(model)
        loss.backward()
        optimizer.step()
        if on_cuda:
            torch.cuda.synchronize(device)
        if i > 0:
            times.append(time.perf_counter() - start)
        activations = saved["bytes"]
    peak = torch.cuda.max_memory_allocated(device) if on_cuda else None
    return StepMeasurement(
        seconds=sorted(times)[len(times) // 2],
        state=measured_state_bytes(model, optimizer),
        activation_bytes=activations,
        device_peak_bytes=peak,
    )


@dataclass(frozen=True)
class ForwardTimings:
    """Median seconds of one call of each form, and how many rounds were timed."""

    seconds: dict[str, float]
    rounds: int


def time_forward_passes(forms: Mapping[str, Callable[[], object]], rounds: int) -> ForwardTimings:
    """Time each zero-argument call in ``forms`` (e.g. a model's forward pass) ``rounds`` times.

    Every form runs once as a warm-up; then the forms run in turn, round after round, so that a
    slow moment of the machine hits all of them alike. Runs under ``torch.no_grad()``. A
    rehearsal times two rounds: it only proves that the code runs.
    """
    check_number("rounds", rounds, integer=True, at_least=1)
    if not forms:
        raise ValueError("forms is empty; pass at least one name -> call")
    rounds = rehearsal.capped_steps(rounds)
    times: dict[str, list[float]] = {name: [] for name in forms}
    with torch.no_grad():
        for call in forms.values():
            call()
        for _ in range(rounds):
            for name, call in forms.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    return ForwardTimings(medians, rounds)
