"""A tiny GPT-shaped model (attention, feed-forward, head) for the tests of lora and adapters."""

from __future__ import annotations

import math

import torch
from torch import nn

from lora_tutorial.lora import adapter_layers, replace_linear_with_lora


class Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.W_query, self.W_key, self.W_value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(x.shape[-1]), dim=-1)
        return self.out_proj(weights @ v)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.att = Attention(d)
        self.ff = nn.Module()
        self.ff.layers = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.att(self.norm(x))
        return x + self.ff.layers(self.norm(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 16, n_layers: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.trf_blocks = nn.Sequential(*[Block(d) for _ in range(n_layers)])
        self.out_head = nn.Linear(d, classes)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out_head(self.trf_blocks(self.tok_emb(idx)))


ATTENTION_AND_FF = ("att.*", "ff.*")
N_LINEAR = 2 * 6 + 1


def tiny_model(seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT()


def randomize_adapters(model: nn.Module, seed: int = 2) -> None:
    """Give B nonzero values, as training would, so that the update is visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=gen) * 0.1)


def lora_model(seed: int = 0, **kwargs) -> TinyGPT:
    model = replace_linear_with_lora(tiny_model(seed), 4, 8, include=ATTENTION_AND_FF, **kwargs)
    randomize_adapters(model)
    return model
