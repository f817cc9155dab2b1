"""Tests of lora_tutorial.quantize: NF4 levels, block-wise quantization, LinearNF4 and QLoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_tutorial import lora
from lora_tutorial.quantize import (
    LinearNF4,
    LinearWithQLoRA,
    model_weight_bytes,
    nf4_levels,
    quantization_error,
    quantize_blockwise,
    quantize_linear_layers,
)

# The NF4 data type as published with QLoRA (Dettmers et al. 2023, appendix), as in bitsandbytes.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip


def reference_round_trip(
    tensor: torch.Tensor, levels: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A slow, obvious block-by-block quantizer: (codes, dequantized) to compare with ours."""
    flat = tensor.flatten().double()
    codes, values = [], []
    for start in range(0, flat.numel(), blocksize):
        block = flat[start : start + blocksize]
        absmax = block.abs().max()
        for v in block:
            scaled = v / absmax if absmax > 0 else v * 0
            i = int((scaled - levels.double()).abs().argmin())
            codes.append(i)
            values.append(float(levels[i]) * float(absmax))
    return torch.tensor(codes), torch.tensor(values).view(tensor.shape)


# ----------------------------------------------------------------------------- NF4


def test_nf4_levels_match_the_published_table() -> None:
    levels = nf4_levels()
    assert levels.shape == (16,)
    torch.testing.assert_close(levels, torch.tensor(PUBLISHED_NF4), atol=1e-6, rtol=0)
    assert levels[7] == 0.0 and levels[0] == -1.0 and levels[-1] == 1.0


def test_nf4_levels_use_each_code_about_equally_often_for_normal_data() -> None:
    torch.manual_seed(0)
    q = quantize_blockwise(torch.randn(64 * 2000), blocksize=64)
    counts = torch.bincount(q.codes().long(), minlength=16).float()
    uniform = quantize_blockwise(torch.randn(64 * 2000), torch.linspace(-1, 1, 16), blocksize=64)
    uniform_counts = torch.bincount(uniform.codes().long(), minlength=16).float()
    # Quantile levels spread the values far more evenly than evenly spaced levels do.
    assert counts.std() / counts.mean() < 0.6 * uniform_counts.std() / uniform_counts.mean()


@pytest.mark.parametrize("shape, blocksize", [((40, 24), 64), ((7, 9), 16), ((129,), 64)])
def test_round_trip_matches_a_reference_quantizer(shape: tuple[int, ...], blocksize: int) -> None:
    torch.manual_seed(1)
    w = torch.randn(shape) * 0.02
    w.view(-1)[3] = 0.5  # an outlier: it must only affect its own block
    q = quantize_blockwise(w, blocksize=blocksize)
    codes, values = reference_round_trip(w, nf4_levels(), blocksize)
    assert torch.equal(q.codes().long(), codes)
    torch.testing.assert_close(q.dequantize(), values.float(), atol=1e-7, rtol=1e-6)
    # Round-trip error: at most half the widest gap between levels, times the block's absmax.
    half_gap = nf4_levels().diff().max() / 2
    absmax = (
        torch.nn.functional.pad(w.flatten().abs(), (0, (-w.numel()) % blocksize))
        .view(-1, blocksize)
        .amax(1)
    )
    bound = (half_gap * absmax).repeat_interleave(blocksize)[: w.numel()].view(shape)
    assert bool(((q.dequantize() - w).abs() <= bound + 1e-7).all())


def test_error_and_memory_numbers() -> None:
    torch.manual_seed(2)
    w = torch.randn(256, 128)
    q = quantize_blockwise(w)
    # 4 bits per code plus one float32 scale per 64 values.
    assert q.nbytes == w.numel() // 2 + 4 * (w.numel() // 64)
    assert q.bits_per_value == pytest.approx(4.5)
    err = quantization_error(w, q)
    diff = q.dequantize() - w
    assert err["mean_abs_error"] == pytest.approx(diff.abs().mean().item())
    assert err["relative_error"] == pytest.approx((diff.norm() / w.norm()).item())
    # NF4 beats 16 evenly spaced levels on normally distributed weights.
    uniform = quantize_blockwise(w, torch.linspace(-1, 1, 16))
    assert err["relative_error"] < quantization_error(w, uniform)["relative_error"]


def test_zeros_survive_and_odd_sizes_pack() -> None:
    w = torch.zeros(3, 5)
    w[0, 0] = 1.0
    q = quantize_blockwise(w, blocksize=4)
    assert q.packed.numel() == 8  # 15 codes, two per byte
    assert torch.equal(q.dequantize(), w)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="blocksize"):
        quantize_blockwise(torch.randn(8), blocksize=0)
    with pytest.raises(ValueError, match="16 increasing"):
        quantize_blockwise(torch.randn(8), torch.linspace(-1, 1, 8))
    with pytest.raises(TypeError, match="floating-point"):
        quantize_blockwise(torch.arange(8))
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        LinearNF4(nn.Conv1d(2, 2, 1))


def test_linear_nf4_is_a_frozen_dequantizing_linear() -> None:
    torch.manual_seed(3)
    linear = nn.Linear(48, 20)
    layer = LinearNF4(linear)
    assert list(layer.parameters()) == []
    x = torch.randn(5, 48, requires_grad=True)
    expected = torch.nn.functional.linear(
        x, quantize_blockwise(linear.weight).dequantize(), linear.bias
    )
    out = layer(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()  # gradients reach the input (and so any adapter below)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_quantize_linear_layers_saves_memory_and_skips_excluded() -> None:
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.Linear(256, 2))
    before = model_weight_bytes(model)
    assert quantize_linear_layers(model, exclude="3") == 2
    assert (
        isinstance(model[0], LinearNF4)
        and isinstance(model[2], LinearNF4)
        and isinstance(model[3], nn.Linear)
    )
    after = model_weight_bytes(model)
    assert after < 0.2 * before


def test_quantize_linear_layers_leaves_the_base_of_adapters_alone() -> None:
    model = nn.Sequential(lora.LinearWithLoRA(nn.Linear(8, 8), 2, 4), nn.Linear(8, 8))
    assert quantize_linear_layers(model) == 1
    assert type(model[0].linear) is nn.Linear and isinstance(model[1], LinearNF4)


def test_a_non_finite_value_is_refused_with_its_position() -> None:
    w = torch.randn(4, 64)
    w[1, 5] = float("nan")
    with pytest.raises(ValueError, match=r"1 NaN or inf values \(the first at flat index 69;"):
        quantize_blockwise(w)
    w[1, 5] = float("inf")
    with pytest.raises(ValueError, match="would spoil its block of 64"):
        quantize_blockwise(w)


def test_quantize_linear_layers_chooses_by_fnmatch_patterns_like_lora() -> None:
    def model() -> nn.Module:
        torch.manual_seed(0)
        block = nn.ModuleDict({"q": nn.Linear(8, 8), "v": nn.Linear(8, 8), "ff": nn.Linear(8, 8)})
        return nn.ModuleDict(
            {"blocks": nn.ModuleList([block, copy.deepcopy(block)]), "head": nn.Linear(8, 2)}
        )

    def quantized(m: nn.Module) -> list[str]:
        return [name for name, layer in m.named_modules() if isinstance(layer, LinearNF4)]

    m = model()
    assert quantize_linear_layers(m, include=["q", "v"]) == 4
    assert quantized(m) == ["blocks.0.q", "blocks.0.v", "blocks.1.q", "blocks.1.v"]
    m = model()
    assert quantize_linear_layers(m, exclude="head") == 6 and "head" not in quantized(m)
    m = model()
    assert (
        quantize_linear_layers(m, include="blocks.1.*", exclude=lambda n, _: n.endswith("ff")) == 2
    )
    with pytest.raises(TypeError, match="exclude must be a name pattern"):
        quantize_linear_layers(model(), exclude=3)


def test_multihead_attention_out_proj_is_not_quantized() -> None:
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "ff": nn.Linear(8, 8)})
    with pytest.warns(UserWarning, match=r"skipped 'attn\.out_proj'"):
        assert quantize_linear_layers(model) == 1
    x = torch.randn(5, 3, 8)
    model["attn"](x, x, x)  # still works: out_proj is a float nn.Linear
    assert isinstance(model["ff"], LinearNF4)


def tiny_qlora() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 3)
    )
    lora.replace_linear_with_lora(model, 4, 8, exclude="4", wrapper=LinearWithQLoRA)
    with torch.no_grad():
        for layer in lora.adapter_layers(model).values():
            layer.lora.B.normal_(std=0.3)
    return model.eval()


def test_qlora_merges_to_float_weights_and_unloads_to_float_linears() -> None:
    model = tiny_qlora()
    x = torch.randn(6, 16)
    expected = model(x)
    codes = model[0].linear.packed.clone()
    lora.merge_lora(model)
    assert model[0].merged_weight.dtype == torch.float32
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(model[0].linear.packed, codes)  # the 4-bit base is never rewritten
    assert torch.equal(lora.unmerge_lora(model)(x), expected)
    plain = lora.merge_and_unload(model)
    assert all(type(m) is nn.Linear for m in (plain[0], plain[2], plain[4]))
    torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-5)


def test_a_float64_value_beyond_float32s_range_is_refused_not_stored_as_inf() -> None:
    w = torch.randn(4, 64, dtype=torch.float64)
    w[2, 3] = 1e300
    with pytest.raises(
        ValueError,
        match=r"1 NaN or inf values \(the first at flat index 131; "
        r"values beyond float32's range count as inf\)",
    ):
        quantize_blockwise(w)


@pytest.mark.parametrize("blocksize", [2**40, 0, -64, 64.0, True, "64"])
def test_a_bad_blocksize_is_refused_clearly(blocksize) -> None:
    with pytest.raises(ValueError, match=r"blocksize must be an integer from 1 to 1048576, got"):
        quantize_blockwise(torch.randn(8, 8), blocksize=blocksize)
    with pytest.raises(ValueError, match="blocksize must be an integer"):
        LinearWithQLoRA(nn.Linear(8, 8), 2, 4, blocksize=blocksize)


def test_the_4bit_base_is_a_frozen_linear_like_nn_linear() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    layer = LinearWithQLoRA(linear, 2, 4)
    assert isinstance(layer.linear, lora.FrozenLinear) and isinstance(layer.linear, LinearNF4)
    assert (layer.linear.in_features, layer.linear.out_features) == (16, 8)
    assert layer.linear.weight.shape == linear.weight.shape  # dequantized on each read
    assert torch.allclose(layer.linear.weight, linear.weight, atol=0.05)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), x @ layer.linear.weight.T + linear.bias)
    with torch.no_grad():
        layer.lora.B.normal_()
    expected = layer(x)
    layer.eval().merge()
    torch.testing.assert_close(layer(x), expected)
