"""Memory for fine-tuning real models: full fine-tuning, LoRA in bf16 and QLoRA, from layer shapes.

Chapter 2's arithmetic (``lowrank``) applied to LLaMA-shaped models (Touvron et al., 2023,
arXiv:2302.13971, Table 2: width, layers; feed-forward width ``2/3 * 4d`` rounded to 256). The
estimates count what training keeps for the whole run, not the activations (which depend on
batch size, sequence length and gradient checkpointing):

- **full**: every weight and its gradient in bf16, AdamW's two moments in float32: 12 bytes per
  parameter (the accounting behind QLoRA's "more than 780 GB" for a 65B model).
- **lora**: the frozen weights in bf16 (2 bytes each), plus for each LoRA number its bf16 weight
  and gradient and float32 AdamW moments.
- **qlora**: the blocks' linear weights in NF4 with double quantisation (Dettmers et al., 2023):
  4 bits per weight, an 8-bit scale per block of 64 weights and a float32 constant per 256 scales,
  ``4 + 8/64 + 32/(64*256) = 4.127`` bits; embeddings, output head and norms stay in bf16; the
  LoRA numbers as in **lora**.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lora_tutorial import lowrank

# Touvron et al. (2023), Table 2; vocab 32,000; separate (untied) input embedding and output head.
LLAMA_CONFIGS: dict[str, dict[str, int]] = {
    "llama-7b": {"emb_dim": 4096, "n_layers": 32, "ff_dim": 11008, "vocab_size": 32000},
    "llama-13b": {"emb_dim": 5120, "n_layers": 40, "ff_dim": 13824, "vocab_size": 32000},
    "llama-33b": {"emb_dim": 6656, "n_layers": 60, "ff_dim": 17920, "vocab_size": 32000},
    "llama-65b": {"emb_dim": 8192, "n_layers": 80, "ff_dim": 22016, "vocab_size": 32000},
}
METHODS = ("full", "lora", "qlora")
NF4_BLOCK, SCALE_BLOCK = 64, 256  # weights per NF4 scale; scales per float32 constant
NF4_DQ_BITS = 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * SCALE_BLOCK)  # 4.127 bits per weight
BF16, FP32 = lowrank.bytes_per_param("bfloat16"), lowrank.bytes_per_param("float32")


def llama_linear_shapes(cfg: Mapping[str, int]) -> list[lowrank.LinearShape]:
    """The linear layers of LLaMA's blocks: q, k, v, o and gated feed-forward (gate, up, down)."""
    d, f = cfg["emb_dim"], cfg["ff_dim"]
    shapes = []
    for i in range(cfg["n_layers"]):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes.append(lowrank.LinearShape(f"layers.{i}.attn.{name}", d, d, False))
        shapes.append(lowrank.LinearShape(f"layers.{i}.mlp.gate_proj", d, f, False))
        shapes.append(lowrank.LinearShape(f"layers.{i}.mlp.up_proj", d, f, False))
        shapes.append(lowrank.LinearShape(f"layers.{i}.mlp.down_proj", f, d, False))
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
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    total, linear = llama_param_count(cfg)
    if method == "full":
        return MemoryEstimate(method, total, total, total * BF16, total * BF16, total * 2 * FP32)
    n_lora = lowrank.lora_params_for(llama_linear_shapes(cfg), rank)
    quantized = linear * NF4_DQ_BITS / 8 + (total - linear) * BF16
    base = total * BF16 if method == "lora" else quantized
    return MemoryEstimate(
        method, total + n_lora, n_lora, base + n_lora * BF16, n_lora * BF16, n_lora * 2 * FP32
    )


__all__ = [
    "LLAMA_CONFIGS",
    "METHODS",
    "NF4_DQ_BITS",
    "MemoryEstimate",
    "finetuning_memory",
    "llama_linear_shapes",
    "llama_param_count",
]
