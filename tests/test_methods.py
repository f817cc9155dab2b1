"""The three fine-tuning methods: what each trains, and the default settings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_tutorial import gpt, lora, train
from lora_tutorial.classify import GPTClassifier

TINY = gpt.GPT_CONFIGS["tiny"]


def tiny_classifier(seed: int = 0) -> GPTClassifier:
    torch.manual_seed(seed)
    return GPTClassifier(gpt.GPTModel("tiny"))


def test_prepare_model_trains_what_each_method_says() -> None:
    emb, hidden, layers = TINY["emb_dim"], 4 * TINY["emb_dim"], TINY["n_layers"]
    head = emb * 2 + 2
    linear = emb * emb + emb
    block = (
        4 * linear + (emb * hidden + hidden) + (hidden * emb + emb) + 2 * 2 * emb
    )  # + two LayerNorms
    rank = 4
    lora_per_block = 4 * rank * (emb + emb) + rank * (emb + hidden) + rank * (hidden + emb)

    full = train.prepare_model(tiny_classifier(), "full")
    counts = lora.count_parameters(full)
    assert counts.trainable == counts.total

    last = train.prepare_model(tiny_classifier(), "last-block")
    assert lora.count_parameters(last).trainable == block + 2 * emb + head
    assert not any(p.requires_grad for p in last.gpt.trf_blocks[0].parameters())

    adapted = train.prepare_model(tiny_classifier(), "lora", rank=rank, alpha=8)
    assert lora.count_parameters(adapted).trainable == layers * lora_per_block + head
    assert len(lora.adapter_layers(adapted)) == 6 * layers
    assert isinstance(adapted.gpt.out_head, nn.Linear) and adapted.gpt.out_head.weight.requires_grad

    only_query = train.prepare_model(
        tiny_classifier(), "lora", rank=rank, alpha=8, targets=("W_query",)
    )
    assert lora.count_parameters(only_query).trainable == layers * rank * 2 * emb + head

    with pytest.raises(ValueError, match="method='prefix'"):
        train.prepare_model(tiny_classifier(), "prefix")


def test_default_learning_rates_and_lora_settings() -> None:
    assert (
        train.default_lr("lora", quick=False) == train.DEFAULT_LR["lora"] > train.DEFAULT_LR["full"]
    )
    assert [train.default_lr(m, quick=False) for m in train.METHODS] == [
        train.DEFAULT_LR[m] for m in train.METHODS
    ]
    assert {train.default_lr(m, quick=True) for m in train.METHODS} == {train.QUICK_LR}
    with pytest.raises(ValueError, match="method='prefix'"):
        train.default_lr("prefix", quick=False)
    layer = train.prepare_model(tiny_classifier(), "lora").gpt.trf_blocks[0].att.W_query.lora
    assert (
        layer.A.shape[1] == train.LORA_RANK and layer.scaling == train.LORA_ALPHA / train.LORA_RANK
    )
    assert (train.default_alpha(quick=False), train.default_alpha(quick=True)) == (
        train.LORA_ALPHA,
        train.QUICK_LORA_ALPHA,
    )
