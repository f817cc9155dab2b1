"""Tests of lora_tutorial.lora: layers, replacement, freezing, merging, and a PEFT peer check."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lora_tutorial.lora import (
    LinearWithLoRA,
    LoRALayer,
    adapter_layers,
    count_parameters,
    mark_only_lora_as_trainable,
    merge_and_unload,
    merge_lora,
    replace_linear_with_lora,
    unmerge_lora,
)

# ----------------------------------------------------------------------------- a tiny GPT-shaped model


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


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(1))


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


# ----------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("use_rslora, expected", [(False, 16 / 4), (True, 16 / 2)])
def test_scaling_conventions(use_rslora: bool, expected: float) -> None:
    layer = LoRALayer(6, 5, rank=4, alpha=16, use_rslora=use_rslora)
    assert layer.scaling == expected
    assert layer.A.shape == (6, 4) and layer.B.shape == (4, 5)
    x = torch.randn(3, 6)
    with torch.no_grad():
        layer.B.normal_()
    torch.testing.assert_close(layer(x), expected * (x @ layer.A @ layer.B))


def test_a_is_drawn_like_a_linear_weight_and_b_is_zero() -> None:
    torch.manual_seed(0)
    layer = LoRALayer(768, 3072, rank=8, alpha=16)
    bound = 1 / math.sqrt(768)  # nn.Linear(768, 8) draws uniform(-bound, bound)
    assert layer.A.abs().max() <= bound
    assert layer.A.abs().max() > 0.95 * bound
    assert torch.count_nonzero(layer.B) == 0


def test_dropout_is_identity_at_zero_and_dropout_otherwise() -> None:
    assert isinstance(LoRALayer(4, 4, 2, 2).dropout, nn.Identity)
    layer = LoRALayer(4, 4, 2, 2, dropout=0.25)
    assert isinstance(layer.dropout, nn.Dropout) and layer.dropout.p == 0.25


def test_wrapped_layer_starts_equal_to_base_even_with_dropout() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(8, 5)
    x = torch.randn(2, 3, 8)
    expected = linear(x)
    wrapped = LinearWithLoRA(linear, rank=2, alpha=4, dropout=0.5).train()
    assert torch.equal(wrapped(x), expected)


def test_wrapped_model_starts_equal_to_base(tokens: torch.Tensor) -> None:
    base = tiny_model()
    expected = base(tokens)
    model = replace_linear_with_lora(copy.deepcopy(base), rank=4, alpha=8)
    assert len(adapter_layers(model)) == N_LINEAR
    assert torch.equal(model(tokens), expected)


def test_adapter_follows_base_dtype() -> None:
    wrapped = LinearWithLoRA(nn.Linear(4, 3).to(torch.float64), 2, 2)
    assert wrapped.lora.A.dtype == torch.float64 and wrapped.lora.B.dtype == torch.float64


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("rank", [0, -2, 2.5, True, "8", None])
def test_bad_rank(rank: object) -> None:
    with pytest.raises(ValueError, match=rf"rank must be a positive integer, got {rank!r}"):
        LinearWithLoRA(nn.Linear(4, 4), rank, 8)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf"), "16"])
def test_bad_alpha(alpha: object) -> None:
    with pytest.raises(ValueError, match=rf"alpha must be a positive number, got {alpha!r}"):
        LinearWithLoRA(nn.Linear(4, 4), 4, alpha)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_bad_dropout(dropout: float) -> None:
    with pytest.raises(
        ValueError, match=rf"dropout must be a probability in \[0, 1\), got {dropout!r}"
    ):
        LinearWithLoRA(nn.Linear(4, 4), 4, 8, dropout=dropout)


def test_wrapping_something_else_than_linear() -> None:
    with pytest.raises(TypeError, match="linear must be an nn.Linear, got Conv1d"):
        LinearWithLoRA(nn.Conv1d(4, 4, 1), 4, 8)
    with pytest.raises(TypeError, match="model is itself an nn.Linear"):
        replace_linear_with_lora(nn.Linear(4, 4), 4, 8)


def test_bad_arguments_leave_model_unchanged() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="rank"):
        replace_linear_with_lora(model, 0, 8)
    assert adapter_layers(model) == {}


# ----------------------------------------------------------------------------- choosing layers


def test_include_patterns_match_full_names_and_suffixes() -> None:
    model = replace_linear_with_lora(tiny_model(), 4, 8, include=["W_query", "W_value"])
    assert list(adapter_layers(model)) == [
        f"trf_blocks.{i}.att.{name}" for i in range(2) for name in ("W_query", "W_value")
    ]
    model = replace_linear_with_lora(tiny_model(), 4, 8, include="trf_blocks.1.ff.*")
    assert list(adapter_layers(model)) == ["trf_blocks.1.ff.layers.0", "trf_blocks.1.ff.layers.2"]


def test_exclude_and_predicate() -> None:
    model = replace_linear_with_lora(tiny_model(), 4, 8, exclude="out_head")
    assert len(adapter_layers(model)) == N_LINEAR - 1
    assert isinstance(model.out_head, nn.Linear) and not isinstance(model.out_head, LinearWithLoRA)
    model = replace_linear_with_lora(
        tiny_model(), 4, 8, include=lambda name, m: m.out_features > 16
    )
    assert list(adapter_layers(model)) == ["trf_blocks.0.ff.layers.0", "trf_blocks.1.ff.layers.0"]


def test_verbose_reports_the_count(capsys: pytest.CaptureFixture[str]) -> None:
    replace_linear_with_lora(tiny_model(), 4, 8, exclude="out_head", verbose=True)
    assert (
        f"Wrapped {N_LINEAR - 1} of {N_LINEAR} linear layers with LinearWithLoRA"
        in capsys.readouterr().out
    )


def test_nothing_matched_lists_linear_layers() -> None:
    with pytest.raises(
        ValueError, match=r"no linear layer matched include='W_nope'.*trf_blocks\.0\.att\.W_query"
    ):
        replace_linear_with_lora(tiny_model(), 4, 8, include="W_nope")
    with pytest.raises(ValueError, match="has no nn.Linear layers"):
        replace_linear_with_lora(nn.Sequential(nn.ReLU()), 4, 8)


def test_refuses_to_wrap_twice_but_extends() -> None:
    model = replace_linear_with_lora(tiny_model(), 4, 8, include="att.*")
    with pytest.raises(
        ValueError, match=r"'trf_blocks\.0\.att\.W_query' is already a LinearWithLoRA"
    ):
        replace_linear_with_lora(model, 4, 8)
    replace_linear_with_lora(model, 2, 2, include="ff.*")
    assert len(adapter_layers(model)) == N_LINEAR - 1
    assert isinstance(model.trf_blocks[0].att.W_query.linear, nn.Linear)  # not wrapped again inside


# ----------------------------------------------------------------------------- freezing and training


def test_count_parameters_after_freezing() -> None:
    d, r, classes = 16, 4, 3
    base_total = count_parameters(tiny_model()).total
    model = mark_only_lora_as_trainable(lora_model(), extra=("out_head",))
    per_block = 4 * r * (d + d) + r * (d + 4 * d) + r * (4 * d + d)
    lora_params = 2 * per_block
    head = d * classes + classes
    assert count_parameters(model) == (base_total + lora_params, lora_params + head)
    assert count_parameters(mark_only_lora_as_trainable(model)).trainable == lora_params


def test_unknown_extra_module_is_named() -> None:
    with pytest.raises(ValueError, match="extra module 'head' is not a module of this model"):
        mark_only_lora_as_trainable(lora_model(), extra="head")


def test_training_changes_only_adapters_and_extras(tokens: torch.Tensor) -> None:
    model = mark_only_lora_as_trainable(lora_model(), extra="out_head")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    targets = torch.randint(0, 3, tokens.shape, generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    expected = {name for name in before if ".lora." in name or name.startswith("out_head.")}
    assert changed == expected


# ----------------------------------------------------------------------------- merging


def test_merge_equals_unmerged_and_unmerge_restores(tokens: torch.Tensor) -> None:
    model = lora_model().eval()
    weights = {
        name: layer.linear.weight.detach().clone() for name, layer in adapter_layers(model).items()
    }
    expected = model(tokens)
    merge_lora(model)
    merge_lora(model)  # a second merge must not add the update again
    assert all(layer.merged for layer in adapter_layers(model).values())
    torch.testing.assert_close(model(tokens), expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(
        model.trf_blocks[0].att.W_query.linear.weight, weights["trf_blocks.0.att.W_query"]
    )
    unmerge_lora(model)
    unmerge_lora(model)
    for name, layer in adapter_layers(model).items():
        torch.testing.assert_close(layer.linear.weight, weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(tokens), expected, rtol=1e-6, atol=1e-6)


def test_merged_layer_is_its_base_layer() -> None:
    layer = lora_model().trf_blocks[0].ff.layers[0]
    x = torch.randn(3, 16)
    layer.merge()
    assert torch.equal(layer(x), layer.linear(x))


def test_merge_and_unload_gives_plain_linears(tokens: torch.Tensor) -> None:
    model = lora_model().eval()
    expected = model(tokens)
    plain = merge_and_unload(model)
    assert adapter_layers(plain) == {}
    assert type(plain.trf_blocks[1].att.W_value) is nn.Linear
    torch.testing.assert_close(plain(tokens), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no adapter layers"):
        merge_lora(plain)


# ----------------------------------------------------------------------------- peer check against PEFT


@pytest.mark.parametrize(
    "rank, alpha, use_rslora", [(4, 8, False), (4, 8, True), (8, 4, False), (16, 32, True)]
)
def test_matches_peft_lora_linear(rank: int, alpha: float, use_rslora: bool) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Linear(24, 20)
    ours = LinearWithLoRA(copy.deepcopy(base), rank, alpha, use_rslora=use_rslora)
    with torch.no_grad():
        ours.lora.B.normal_()

    holder = nn.Module()
    holder.fc = copy.deepcopy(base)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, use_rslora=use_rslora, target_modules=["fc"])
    theirs = peft.get_peft_model(holder, config).base_model.model.fc
    lora_A, lora_B = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
    with torch.no_grad():  # PEFT stores A as (r, in) and B as (out, r): the transposes of ours
        lora_A.copy_(ours.lora.A.T)
        lora_B.copy_(ours.lora.B.T)
    assert theirs.scaling["default"] == pytest.approx(ours.lora.scaling)

    x = torch.randn(3, 5, 24)
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(y_ours)
    (y_ours * upstream).sum().backward()
    (y_theirs * upstream).sum().backward()
    torch.testing.assert_close(ours.lora.A.grad, lora_A.grad.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.lora.B.grad, lora_B.grad.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        ours.delta_weight(), theirs.get_delta_weight("default"), rtol=1e-5, atol=1e-6
    )
