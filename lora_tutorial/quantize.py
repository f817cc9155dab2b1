"""Block-wise 4-bit NormalFloat (NF4) quantization of frozen weights, as in QLoRA, from scratch.

QLoRA (Dettmers et al., 2023) stores the frozen base model in 4 bits and trains LoRA adapters on
top in higher precision. Three ideas make 4 bits enough:

1. **Block-wise absmax scaling.** The weights are cut into blocks of 64 values; each block is
   divided by its largest absolute value, so it lies in [-1, 1], and that one scale is kept per
   block. An outlier then spoils only its own block, not the whole matrix.
2. **NF4 levels.** Trained weights are roughly normally distributed, so instead of 16 evenly spaced
   levels the 16 levels sit at quantiles of the normal distribution: each level is used about
   equally often, and exact zero is one of them.
3. **Dequantize on the fly.** The layer keeps only 4-bit codes and the scales; at every forward pass
   it rebuilds a float weight, multiplies, and throws it away. Gradients flow through it to the
   input (and so to the adapters of earlier layers), never into the frozen codes.

:class:`LinearNF4` is such a frozen 4-bit layer; :class:`LinearWithQLoRA` puts a float LoRA
update beside it (``replace_linear_with_lora(model, rank, alpha, wrapper=LinearWithQLoRA)``).

(QLoRA also quantizes the per-block scales themselves, "double quantization"; we keep them in
float32, which costs 32 / 64 = 0.5 extra bits per weight.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_tutorial.lora import (
    LinearWithLoRA,
    Selector,
    select_linear_layers,
    set_submodule,
)
from lora_tutorial.runtime.checks import check_number

NF4_BLOCK_SIZE = 64
# Where the outermost NF4 level sits on the normal CDF (``Phi^-1(1)`` would be infinite). This is
# the value of QLoRA's reference implementation (bitsandbytes); it equals 1 - (1/30 + 1/32) / 2.
NF4_OFFSET = 0.9677083


def nf4_levels(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1], computed from quantiles of the standard normal distribution.

    The positive half gets 8 levels at the normal quantiles of 8 equal steps of probability from
    0.5 to ``offset``; the negative half gets 7 the same way; zero is added so that it is
    represented exactly (padding and ReLU-like zeros cost no error). Both halves are scaled so that
    the outermost level is exactly +-1. The result matches the table published with QLoRA to
    about 1e-7.
    """
    if not 0.5 < offset < 1.0:
        raise ValueError(
            f"offset must lie in (0.5, 1), got {offset!r}; the default is {NF4_OFFSET}"
        )
    quantile = torch.special.ndtri  # the inverse of the standard normal CDF
    positive = quantile(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -quantile(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.abs().max()).float()


@dataclass
class QuantizedTensor:
    """A tensor stored as 4-bit codes (two per byte) plus one float32 absmax scale per block."""

    packed: torch.Tensor  # uint8, two codes per byte: (numel + 1) // 2
    absmax: torch.Tensor  # float32, one per block
    levels: torch.Tensor  # float32, the 16 values a code stands for
    shape: torch.Size
    dtype: torch.dtype  # the dtype dequantize() returns
    blocksize: int

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        """Bytes to store this tensor: the packed codes plus the scales (levels are shared)."""
        return (
            self.packed.numel() * self.packed.element_size()
            + self.absmax.numel() * self.absmax.element_size()
        )

    @property
    def bits_per_value(self) -> float:
        return 8 * self.nbytes / self.numel

    def codes(self) -> torch.Tensor:
        """The 4-bit codes (0..15) as a flat uint8 tensor of length ``numel``."""
        codes = torch.stack([self.packed >> 4, self.packed & 0x0F], dim=1).flatten()
        return codes[: self.numel]

    def dequantize(self) -> torch.Tensor:
        """Rebuild the tensor: each value is ``levels[code] * absmax`` of its block."""
        values = self.levels.to(self.absmax.device)[self.codes().long()]
        pad = (-self.numel) % self.blocksize
        values = F.pad(values, (0, pad)).view(-1, self.blocksize) * self.absmax[:, None]
        return values.flatten()[: self.numel].view(self.shape).to(self.dtype)


MAX_BLOCK_SIZE = 2**20  # the last block is padded to a full one, so a huge size costs memory


def check_blocksize(blocksize: Any) -> None:
    """Raise ValueError unless ``blocksize`` is an integer from 1 to :data:`MAX_BLOCK_SIZE`."""
    check_number(
        "blocksize",
        blocksize,
        integer=True,
        at_least=1,
        at_most=MAX_BLOCK_SIZE,
        hint=f"QLoRA uses {NF4_BLOCK_SIZE}",
    )


def quantize_blockwise(
    tensor: torch.Tensor, levels: torch.Tensor | None = None, blocksize: int = NF4_BLOCK_SIZE
) -> QuantizedTensor:
    """Quantize ``tensor`` block by block to the nearest of 16 ``levels`` (NF4 by default).

    The tensor is flattened and cut into blocks of ``blocksize`` values (the last one padded with
    zeros); each block is divided by its absmax and every value is replaced by the index of the
    nearest level. Pass other levels (``torch.linspace(-1, 1, 16)``, say) to compare codebooks.
    NaN or inf values are refused: they would spoil the scale of their whole block.
    """
    if not tensor.is_floating_point():
        raise TypeError(f"can only quantize floating-point tensors, got dtype {tensor.dtype}")
    check_blocksize(blocksize)
    levels = nf4_levels() if levels is None else levels.detach().float().flatten()
    if levels.numel() != 16 or not bool((levels.diff() > 0).all()):
        raise ValueError(
            f"levels must be 16 increasing values (4 bits), got {levels.numel()}: {levels.tolist()}"
        )
    if tensor.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    flat = tensor.detach().float().flatten()  # float64 beyond float32's range becomes inf here
    bad = (~torch.isfinite(flat)).nonzero()
    if len(bad):
        raise ValueError(
            f"cannot quantize a tensor with {len(bad)} NaN or inf values (the first at flat index "
            f"{bad[0].item()}; values beyond float32's range count as inf): each would spoil its "
            f"block of {blocksize}; fix or drop them first"
        )
    blocks = F.pad(flat, (0, (-flat.numel()) % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    # Nearest level = which interval between consecutive midpoints the value falls into.
    midpoints = ((levels[1:] + levels[:-1]) / 2).to(flat.device)
    codes = torch.bucketize(scaled, midpoints).to(torch.uint8).flatten()[: flat.numel()]
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    packed = (codes[0::2] << 4) | codes[1::2]
    return QuantizedTensor(
        packed, absmax, levels.to(flat.device), tensor.shape, tensor.dtype, blocksize
    )


def quantization_error(tensor: torch.Tensor, quantized: QuantizedTensor) -> dict[str, float]:
    """How far the round trip moved the values: mean and max absolute, relative Frobenius error."""
    diff = (quantized.dequantize().float() - tensor.detach().float()).flatten()
    return {
        "mean_abs_error": diff.abs().mean().item(),
        "max_abs_error": diff.abs().max().item(),
        "relative_error": (diff.norm() / tensor.detach().float().norm().clamp_min(1e-30)).item(),
    }


class LinearNF4(nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored in block-wise NF4; the bias stays in float.

    Nothing in this layer trains: the codes and scales are buffers. The forward pass dequantizes the
    weight to the input's dtype, multiplies, and lets the float copy go, which is how QLoRA keeps
    the whole base model in 4 bits while LoRA adapters (in float) learn on top. It has
    ``nn.Linear``'s ``in_features``, ``out_features``, ``weight`` (dequantized on each read) and
    ``bias``, so an adapter layer can wrap it like any linear layer
    (:class:`~lora_tutorial.lora.FrozenLinear`).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    levels: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear, blocksize: int = NF4_BLOCK_SIZE) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LinearNF4 quantizes an nn.Linear, got {type(linear).__name__}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        q = quantize_blockwise(linear.weight, blocksize=blocksize)
        self.blocksize: int = blocksize
        self.weight_dtype = q.dtype
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("levels", q.levels)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def quantized_weight(self) -> QuantizedTensor:
        shape = torch.Size((self.out_features, self.in_features))
        return QuantizedTensor(
            self.packed, self.absmax, self.levels, shape, self.weight_dtype, self.blocksize
        )

    @property
    def weight(self) -> torch.Tensor:
        """The float weight ``(out, in)`` that the 4-bit codes stand for, rebuilt on each read."""
        return self.quantized_weight().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nf4 blocksize={self.blocksize}"
        )


def quantize_linear_layers(
    model: nn.Module,
    blocksize: int = NF4_BLOCK_SIZE,
    *,
    include: Selector = None,
    exclude: Selector = None,
) -> int:
    """Replace the chosen plain ``nn.Linear`` layers by frozen :class:`LinearNF4`; return the count.

    ``include`` / ``exclude`` choose layers by name as in
    :func:`~lora_tutorial.lora.replace_linear_with_lora` (exclude a classification head to keep it
    in float, say). Adapter layers and their bases are left alone: build QLoRA layers with
    :class:`LinearWithQLoRA` instead.
    """
    chosen = select_linear_layers(model, include, exclude)
    targets = {name: m for name, m in chosen.items() if isinstance(m, nn.Linear)}
    for name, linear in targets.items():
        set_submodule(model, name, LinearNF4(linear, blocksize))
    return len(targets)


class LinearWithQLoRA(LinearWithLoRA):
    """QLoRA's layer: a frozen NF4 base (``.linear`` is a :class:`LinearNF4`) plus a float LoRA.

    Built from a float ``nn.Linear``, which it quantizes (the given layer is left as it is);
    ``.lora`` is an ordinary :class:`~lora_tutorial.lora.LoRALayer` in the base layer's float
    dtype. Merging computes a float weight (dequantized base + update) in a buffer of its own.
    """

    linear: LinearNF4

    def __init__(
        self,
        linear: nn.Linear,
        rank: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        dropout: float = 0.0,
        blocksize: int = NF4_BLOCK_SIZE,
    ) -> None:
        base = LinearNF4(linear, blocksize)
        super().__init__(base, rank, alpha, use_rslora=use_rslora, dropout=dropout)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "blocksize": self.linear.blocksize}


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (what its weights occupy in memory)."""
    tensors = list(model.parameters()) + list(model.buffers())
    unique = {t.data_ptr(): t for t in tensors}  # shared tensors count once
    return sum(t.numel() * t.element_size() for t in unique.values())
