"""Tests of lora_tutorial.lora: layers, choosing layers, freezing, merging, PEFT peer check."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from tinygpt import N_LINEAR, lora_model, tiny_model
from torch import nn

from lora_tutorial.lora import (
    LinearWithLoRA,
    LoRALayer,
    adapter_layers,
    count_parameters,
    mark_only_lora_as_trainable,
    replace_linear_with_lora,
)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(1))


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
    model = replace_linear_with_lora(copy.deepcopy(base), rank=3, alpha=8)
    assert len(adapter_layers(model)) == N_LINEAR
    assert torch.equal(model(tokens), expected)


def test_adapter_follows_base_dtype() -> None:
    wrapped = LinearWithLoRA(nn.Linear(4, 3).to(torch.float64), 2, 2)
    assert wrapped.lora.A.dtype == torch.float64 and wrapped.lora.B.dtype == torch.float64


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("rank", [0, -2, 2.5, True, "8", None])
def test_bad_rank(rank: object) -> None:
    with pytest.raises(ValueError, match=rf"rank must be a positive integer.*, got {rank!r}"):
        LinearWithLoRA(nn.Linear(4, 4), rank, 8)


def test_rank_above_the_layer_dimensions_is_accepted_with_a_warning() -> None:
    with pytest.warns(UserWarning, match=r"rank 4 exceeds min\(in_dim, out_dim\) = 3"):
        layer = LinearWithLoRA(nn.Linear(8, 3), 4, 8)
    assert layer.lora.A.shape == (8, 4) and layer.lora.B.shape == (4, 3)
    with torch.no_grad():
        layer.lora.B.normal_()
    assert torch.linalg.matrix_rank(layer.delta_weight()) <= 3  # capped by the layer
    model = tiny_model()  # its head has 3 outputs
    with pytest.warns(UserWarning, match="exceeds"):
        replace_linear_with_lora(model, 4, 8)
    assert len(adapter_layers(model)) == N_LINEAR


def test_appendix_e_call_on_the_two_class_gpt2_classifier_counts_2_666_528() -> None:
    from lora_tutorial import classify, gpt

    torch.manual_seed(0)
    with torch.device("meta"):  # shapes only: counting needs no weights
        model = classify.GPTClassifier(gpt.GPTModel("gpt2-small"), num_classes=2)
    assert count_parameters(model).trainable == 124_441_346
    model.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"rank 16 exceeds .* = 2 of a 768->2 layer"):
        replace_linear_with_lora(model, rank=16, alpha=16)  # appendix E's call; out_head 768->2
    assert count_parameters(model).trainable == 2_666_528


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf"), "16"])
def test_bad_alpha(alpha: object) -> None:
    with pytest.raises(ValueError, match=rf"alpha must be a positive number, got {alpha!r}"):
        LinearWithLoRA(nn.Linear(4, 4), 4, alpha)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, "0.1"])
def test_bad_dropout(dropout: float) -> None:
    with pytest.raises(
        ValueError, match=rf"dropout must be a probability in \[0, 1\), got {dropout!r}"
    ):
        LinearWithLoRA(nn.Linear(4, 4), 4, 8, dropout=dropout)


def test_wrapping_something_else_than_linear() -> None:
    with pytest.raises(TypeError, match=r"linear must be an nn\.Linear .*got Conv1d"):
        LinearWithLoRA(nn.Conv1d(4, 4, 1), 4, 8)
    with pytest.raises(TypeError, match=r"model is itself an nn\.Linear"):
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
    with pytest.raises(ValueError, match=r"has no nn\.Linear layers"):
        replace_linear_with_lora(nn.Sequential(nn.ReLU()), 4, 8)


@pytest.mark.parametrize("argument", ["include", "exclude"])
def test_selector_of_the_wrong_type_is_named(argument: str) -> None:
    model = tiny_model()
    with pytest.raises(TypeError, match=rf"{argument} must be a name pattern.*got 123"):
        replace_linear_with_lora(model, 4, 8, **{argument: 123})
    with pytest.raises(
        TypeError, match=rf"{argument} must be a name pattern.*got \['W_query', 7\]"
    ):
        replace_linear_with_lora(model, 4, 8, **{argument: ["W_query", 7]})
    assert adapter_layers(model) == {}


def test_refuses_to_wrap_twice_but_extends() -> None:
    model = replace_linear_with_lora(tiny_model(), 4, 8, include="att.*")
    with pytest.raises(
        ValueError, match=r"'trf_blocks\.0\.att\.W_query' is already a LinearWithLoRA"
    ):
        replace_linear_with_lora(model, 4, 8)
    replace_linear_with_lora(model, 2, 2, include="ff.*")
    assert len(adapter_layers(model)) == N_LINEAR - 1
    assert isinstance(model.trf_blocks[0].att.W_query.linear, nn.Linear)  # not wrapped again inside


# ----------------------------------------------------------------------------- freezing


def test_count_parameters_after_freezing() -> None:
    d, r, classes = 16, 4, 3
    base_total = count_parameters(tiny_model()).total
    model = mark_only_lora_as_trainable(lora_model(), extra_modules=("out_head",))
    per_block = 4 * r * (d + d) + r * (d + 4 * d) + r * (4 * d + d)
    lora_params = 2 * per_block
    head = d * classes + classes
    assert count_parameters(model) == (base_total + lora_params, lora_params + head)
    assert count_parameters(mark_only_lora_as_trainable(model)).trainable == lora_params


def test_unknown_extra_module_is_named() -> None:
    with pytest.raises(ValueError, match="extra module 'head' is not a module of this model"):
        mark_only_lora_as_trainable(lora_model(), extra_modules="head")


def test_training_changes_only_adapters_and_extras(tokens: torch.Tensor) -> None:
    model = mark_only_lora_as_trainable(lora_model(), extra_modules="out_head")
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


# ----------------------------------------------------------------------------- PEFT peer


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


# ----------------------------------------------------------------------------- line budget


def test_the_classes_chapter_3_displays_fit_in_110_lines() -> None:
    """LoRALayer, LinearWithLoRA and what they inherit from in the package: at most 110 lines."""
    classes = {LoRALayer, *LinearWithLoRA.__mro__}
    ours = [c for c in classes if c.__module__.startswith("lora_tutorial")]
    assert {c.__name__ for c in ours} == {"LoRALayer", "LinearWithLoRA", "AdapterLayer"}
    lines = sum(len(inspect.getsource(c).splitlines()) for c in ours)
    assert lines <= 110, f"the displayed classes take {lines} lines"
    longest = max(len(line) for c in ours for line in inspect.getsource(c).splitlines())
    assert longest <= 100
