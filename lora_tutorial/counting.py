"""Counting what LoRA saves: parameters, bytes, and the memory and time of a training step.

- **Parameters** (chapter 2): how many numbers a dense layer and its LoRA adapter hold, every
  linear layer of GPT-2 by name, and the whole model, without building it.
- **Bytes**: what training keeps per parameter (weights, gradients, AdamW's moments), and what
  fine-tuning LLaMA-shaped models (7B to 65B) needs in full, with LoRA and with QLoRA (chapter 8).
- **Measured** (chapters 2 and 5): the peak memory of a block of code (:class:`PeakMemory`) and one
  training step's time, state and activation bytes (:func:`measure_training_step`), to set
  beside the predictions.

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
class TrainingStateBytes:
    """Bytes that training keeps for the whole run, apart from activations."""

    weights: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def training_state_bytes(
    n_total: int, n_trainable: int, dtype: torch.dtype | str = torch.float32
) -> TrainingStateBytes:
    """Predicted bytes of weights (all), gradients (trained only) and AdamW state (trained only)."""
    if not 0 <= n_trainable <= n_total:
        raise ValueError(
            f"need 0 <= n_trainable <= n_total, got n_trainable={n_trainable}, n_total={n_total}"
        )
    size = bytes_per_param(dtype)
    return TrainingStateBytes(
        n_total * size, n_trainable * size, adamw_state_bytes(n_trainable, dtype)
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
# gradient checkpointing):
# - full: every weight and its gradient in bf16, AdamW's two moments in float32: 12 bytes per
#   parameter (the accounting behind QLoRA's "more than 780 GB" for a 65B model).
# - lora: the frozen weights in bf16 (2 bytes each), plus for each LoRA number its bf16 weight and
#   gradient and float32 AdamW moments.
# - qlora: the blocks' linear weights in NF4 with double quantisation (Dettmers et al., 2023):
#   4 bits per weight, an 8-bit scale per block of 64 weights and a float32 constant per 256
#   scales, 4 + 8/64 + 32/(64*256) = 4.127 bits; embeddings, output head and norms in bf16.

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
BF16, FP32 = bytes_per_param("bfloat16"), bytes_per_param("float32")


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

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


def finetuning_memory(cfg: Mapping[str, int], method: str, *, rank: int = 64) -> MemoryEstimate:
    """Memory of ``method`` (``"full"``, ``"lora"`` or ``"qlora"``) for a LLaMA-shaped ``cfg``.

    LoRA and QLoRA adapt every linear layer of the blocks with ``rank`` (QLoRA's setting: r = 64
    on all linear layers).
    """
    if method not in SIZING_METHODS:
        raise ValueError(f"method={method!r} is not one of {SIZING_METHODS}")
    total, linear = llama_param_count(cfg)
    if method == "full":
        return MemoryEstimate(method, total, total, total * BF16, total * BF16, total * 2 * FP32)
    n_lora = lora_params_for(llama_linear_shapes(cfg), rank)
    quantized = linear * NF4_DQ_BITS / 8 + (total - linear) * BF16
    base = total * BF16 if method == "lora" else quantized
    return MemoryEstimate(
        method, total + n_lora, n_lora, base + n_lora * BF16, n_lora * BF16, n_lora * 2 * FP32
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
    others. On CUDA the peak of allocated memory during the steps is recorded too.
    """
    check_number("repeats", repeats, integer=True, at_least=2, hint="one warm-up step, one timed")
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
