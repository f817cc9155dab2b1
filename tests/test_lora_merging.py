"""Tests of merging in lora_tutorial.lora: exact unmerge, tied weights, shared layers, NaN updates,
training a merged model, layers that must not be wrapped, a bfloat16 base."""

from __future__ import annotations

import copy

import pytest
import torch
from tinygpt import N_LINEAR, lora_model
from torch import nn

from lora_tutorial.gpt import GPTModel
from lora_tutorial.lora import (
    LinearWithLoRA,
    adapter_layers,
    mark_only_lora_as_trainable,
    merge_and_unload,
    merge_lora,
    replace_linear_with_lora,
    unmerge_lora,
)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- merging


def test_merge_equals_unmerged_and_unmerge_restores_exactly(tokens: torch.Tensor) -> None:
    model = lora_model().eval()
    weights = {name: layer.linear.weight.clone() for name, layer in adapter_layers(model).items()}
    expected = model(tokens)
    merge_lora(model)
    merge_lora(model)  # a second merge must not add the update again
    assert all(layer.merged for layer in adapter_layers(model).values())
    torch.testing.assert_close(model(tokens), expected, rtol=1e-6, atol=1e-6)
    layer = model.trf_blocks[0].att.W_query
    assert not torch.equal(layer.merged_weight, weights["trf_blocks.0.att.W_query"])
    unmerge_lora(model)
    unmerge_lora(model)
    for name, layer in adapter_layers(model).items():
        assert not layer.merged and torch.equal(layer.linear.weight, weights[name])
    assert torch.equal(model(tokens), expected)


def test_merged_layer_costs_one_product() -> None:
    layer = lora_model().trf_blocks[0].ff.layers[0].eval()
    x = torch.randn(3, 16)
    expected = layer(x)
    layer.merge()
    assert torch.equal(layer(x), nn.functional.linear(x, layer.merged_weight, layer.linear.bias))
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_merge_and_unload_gives_plain_linears(tokens: torch.Tensor) -> None:
    model = lora_model().eval()
    expected = model(tokens)
    plain = merge_and_unload(model)
    assert adapter_layers(plain) == {}
    assert type(plain.trf_blocks[1].att.W_value) is nn.Linear
    torch.testing.assert_close(plain(tokens), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no adapter layers"):
        merge_lora(plain)


def test_non_finite_update_is_refused_and_nothing_merges() -> None:
    model = lora_model().eval()
    weights = {name: layer.linear.weight.clone() for name, layer in adapter_layers(model).items()}
    layer = model.trf_blocks[1].ff.layers[2]
    with torch.no_grad():
        layer.lora.B[0, 0] = float("nan")
    message = r"cannot merge layer 'trf_blocks\.1\.ff\.layers\.2': its update holds NaN or inf"
    for merge in (merge_lora, merge_and_unload):
        with pytest.raises(ValueError, match=message):
            merge(model)
        layers = adapter_layers(model)
        assert len(layers) == N_LINEAR - 1 and not any(layer.merged for layer in layers.values())
        assert all(torch.equal(layer.linear.weight, weights[n]) for n, layer in layers.items())
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge()  # the layer itself refuses too
    assert not layer.merged


def test_training_a_merged_model_raises(tokens: torch.Tensor) -> None:
    model = mark_only_lora_as_trainable(lora_model())
    merge_lora(model)
    with pytest.raises(
        RuntimeError, match=r"a merged layer cannot train: unmerge_lora\(model\) first"
    ):
        model(tokens)
    with torch.no_grad():
        model(tokens)  # inference is fine
    model.eval()(tokens)
    unmerge_lora(model).train()(tokens).sum().backward()
    assert model.trf_blocks[0].att.W_query.lora.B.grad is not None


def test_tied_head_and_embedding_merge_to_what_the_unmerged_model_computes() -> None:
    torch.manual_seed(0)
    model = GPTModel("tiny").eval()
    assert model.out_head.weight is model.tok_emb.weight  # GPT-2's weight tying
    embedding = model.tok_emb.weight.clone()
    replace_linear_with_lora(model, 4, 8)  # the head too: its weight is the embedding's
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora.B.normal_(std=0.1)
    tokens = torch.randint(model.cfg["vocab_size"], (2, 9))
    with torch.no_grad():
        expected = model(tokens)
        torch.testing.assert_close(merge_lora(model)(tokens), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(model.tok_emb.weight, embedding)
        assert torch.equal(unmerge_lora(model)(tokens), expected)
        plain = merge_and_unload(model)
        torch.testing.assert_close(plain(tokens), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(plain.tok_emb.weight, embedding)
    assert type(plain.out_head) is nn.Linear


def test_one_linear_at_two_places_is_refused() -> None:
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), nn.Sequential(shared))
    with pytest.raises(
        ValueError, match=r"nn\.Linear at '0' is also at \['2\.0'\].*copy\.deepcopy"
    ):
        replace_linear_with_lora(model, 2, 4)
    assert adapter_layers(model) == {}
    twice = nn.Sequential(shared, shared)  # named_children() shows only the first
    with pytest.raises(ValueError, match=r"is also at \['1'\]"):
        replace_linear_with_lora(twice, 2, 4)
    untied = nn.Sequential(shared, nn.ReLU(), nn.Sequential(copy.deepcopy(shared)))
    assert len(adapter_layers(replace_linear_with_lora(untied, 2, 4))) == 2


class AttentionBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)  # its forward reads out_proj.weight directly
        self.ff = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(self.attn(x, x, x, need_weights=False)[0])


def test_multihead_attention_out_proj_is_skipped_with_a_warning() -> None:
    torch.manual_seed(0)
    block = AttentionBlock().eval()
    x = torch.randn(5, 3, 8)
    expected = block(x)
    with pytest.warns(UserWarning, match=r"skipped 'attn\.out_proj': MultiheadAttention reads"):
        replace_linear_with_lora(block, 2, 4.0)
    assert list(adapter_layers(block)) == ["ff"]
    assert torch.equal(block(x), expected)
    block.train()(x).sum().backward()  # and it trains


@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_encoder_layer_is_refused_clearly_and_left_working(batch_first: bool) -> None:
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=batch_first).eval()
    x = torch.randn(5, 3, 8)
    with torch.no_grad():
        expected = layer(x)  # batch_first and eval: the fast path reads linear1.weight directly
    with (
        pytest.warns(UserWarning, match=r"skipped 'linear1': TransformerEncoderLayer reads"),
        pytest.raises(ValueError, match="no linear layer matched"),
    ):
        replace_linear_with_lora(layer, 2, 4.0)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)


def test_float32_adapter_on_a_bfloat16_base() -> None:
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(16, 8).to(torch.bfloat16), 4, 8)
    layer.lora.float()  # QLoRA-style: the adapter in higher precision than the base
    with torch.no_grad():
        layer.lora.B.normal_()
    x = torch.randn(3, 16).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = layer.linear(x).float() + 2 * (x.float() @ layer.lora.A @ layer.lora.B)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
