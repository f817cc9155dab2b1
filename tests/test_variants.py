"""Tests of lora_tutorial.quantize (NF4, QLoRA's base) and lora_tutorial.variants, with PEFT peer checks."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, VeraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer as peft_loraplus
from torch import nn

from lora_tutorial import adapters, lora
from lora_tutorial.quantize import (
    LinearNF4,
    LinearWithQLoRA,
    model_weight_bytes,
    nf4_levels,
    quantization_error,
    quantize_blockwise,
    quantize_linear_layers,
)
from lora_tutorial.variants import (
    LinearWithDoRA,
    LinearWithPiSSA,
    LinearWithVeRA,
    create_loraplus_optimizer,
    fit_random_update,
    loraplus_param_groups,
    replace_linear_with_vera,
    share_vera_projections,
)

# The NF4 data type as published with QLoRA (Dettmers et al. 2023, appendix) and shipped in bitsandbytes.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip


def reference_round_trip(
    tensor: torch.Tensor, levels: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A slow, obvious block-by-block quantizer: (codes, dequantized) to compare with the package's."""
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
    with pytest.raises(TypeError, match="nn.Linear"):
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
    assert quantize_linear_layers(model, exclude=("3",)) == 2
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


# ----------------------------------------------------------------------------- adapter variants


class Tiny(nn.Module):
    """Two adaptable projections of one shape, one of another, and a head that stays plain."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.v = nn.Linear(16, 16)
        self.up = nn.Linear(16, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.q(x)) + torch.tanh(self.v(x))
        return self.head(torch.relu(self.up(h)))


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def randomize_(layer: nn.Module, seed: int = 5) -> None:
    """Give every adapter tensor random values, so that peer checks cannot pass by both being zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.startswith("linear."):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


WRAPPERS = [lora.LinearWithLoRA, LinearWithDoRA, LinearWithPiSSA, LinearWithQLoRA]
X = torch.randn(6, 16, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_equal_to_the_base_model_at_initialisation(wrapper) -> None:
    base = tiny()
    model = lora.replace_linear_with_lora(
        copy.deepcopy(base), 4, 8, exclude="head", wrapper=wrapper
    )
    if wrapper is LinearWithQLoRA:  # QLoRA starts equal to its 4-bit base, not to the float model
        base = copy.deepcopy(base)
        assert quantize_linear_layers(base, exclude=("head",)) == 3
    torch.testing.assert_close(model(X), base(X), atol=1e-5, rtol=0)


def test_vera_equal_to_the_base_model_at_initialisation() -> None:
    base = tiny()
    model = replace_linear_with_vera(copy.deepcopy(base), 4, exclude="head")
    assert torch.equal(model(X), base(X))


@pytest.mark.parametrize("wrapper", [LinearWithDoRA, LinearWithPiSSA, "vera"])
def test_merge_equals_unmerged_and_unmerge_restores(wrapper) -> None:
    model = tiny()
    if wrapper == "vera":
        replace_linear_with_vera(model, 4, exclude="head")
    else:
        lora.replace_linear_with_lora(model, 4, 8, exclude="head", wrapper=wrapper)
    for layer in lora.adapter_layers(model).values():
        randomize_(layer)
    weights = {n: l.linear.weight.clone() for n, l in lora.adapter_layers(model).items()}
    expected = model(X)
    lora.merge_lora(model)
    lora.merge_lora(model)  # twice is harmless
    torch.testing.assert_close(model(X), expected, atol=1e-5, rtol=1e-5)
    lora.unmerge_lora(model)
    for name, layer in lora.adapter_layers(model).items():
        torch.testing.assert_close(layer.linear.weight, weights[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(X), expected, atol=1e-5, rtol=1e-5)
    plain = lora.merge_and_unload(model)
    assert not lora.adapter_layers(plain)
    torch.testing.assert_close(plain(X), expected, atol=1e-5, rtol=1e-5)


def test_qlora_refuses_to_merge_but_unloads_to_float() -> None:
    model = lora.replace_linear_with_lora(tiny(), 4, 8, exclude="head", wrapper=LinearWithQLoRA)
    for layer in lora.adapter_layers(model).values():
        randomize_(layer)
    expected = model(X)
    with pytest.raises(NotImplementedError, match="merged_linear"):
        lora.merge_lora(model)
    plain = lora.merge_and_unload(model)
    assert all(type(m) is nn.Linear for m in (plain.q, plain.v, plain.up))
    torch.testing.assert_close(plain(X), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("wrapper", [LinearWithDoRA, LinearWithPiSSA, LinearWithQLoRA, "vera"])
def test_only_the_intended_parameters_train(wrapper) -> None:
    model = tiny()
    if wrapper == "vera":
        replace_linear_with_vera(model, 4, exclude="head")
        trained = {"d", "b"}
    else:
        lora.replace_linear_with_lora(model, 4, 8, exclude="head", wrapper=wrapper)
        trained = {"lora.A", "lora.B", "m"} if wrapper is LinearWithDoRA else {"lora.A", "lora.B"}
    lora.mark_only_lora_as_trainable(model, extra="head")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {f"{n}.projections.{k}": b.clone() for n, l in lora.adapter_layers(model).items()
               if isinstance(l, LinearWithVeRA) for k, b in l.projections.named_buffers()}  # fmt: skip
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(X).square().mean().backward()
        optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    layers = lora.adapter_layers(model)
    expected = {f"{n}.{t}" for n in layers for t in trained} | {"head.weight", "head.bias"}
    assert changed == expected
    for key, value in buffers.items():  # VeRA's shared random matrices stay frozen
        layer_name, _, buffer = key.partition(".projections.")
        assert torch.equal(getattr(layers[layer_name].projections, buffer), value)


@pytest.mark.parametrize("wrapper", [LinearWithDoRA, LinearWithPiSSA, LinearWithQLoRA, "vera"])
def test_save_and_load_adapter_into_a_fresh_base(wrapper, tmp_path) -> None:
    model = tiny()
    if wrapper == "vera":
        replace_linear_with_vera(model, 4, exclude="head", seed=3)
    else:
        lora.replace_linear_with_lora(model, 4, 8, exclude="head", wrapper=wrapper)
    for layer in lora.adapter_layers(model).values():
        randomize_(layer)
    path = adapters.save_adapter(model, tmp_path / "adapter.safetensors", extra_modules="head")
    fresh = adapters.load_adapter(tiny(), path)
    assert {type(m) for m in lora.adapter_layers(fresh).values()} == {
        type(m) for m in lora.adapter_layers(model).values()
    }
    torch.testing.assert_close(fresh(X), model(X), atol=1e-5, rtol=1e-5)
    if wrapper == "vera":  # only d and b are stored: the seed regenerates A and B
        tensors, _ = adapters.read_adapter(path)
        assert {k.rsplit(".", 1)[-1] for k in tensors if not k.startswith("head.")} == {"d", "b"}
        assert share_vera_projections(fresh) == 2


def test_vera_shares_one_projection_per_shape_and_counts_few_parameters() -> None:
    model = replace_linear_with_vera(tiny(), 4, exclude="head")
    assert model.q.projections is model.v.projections
    assert model.up.projections is not model.q.projections
    model.to(torch.float64)  # sharing survives moves and casts: the module itself is shared
    assert (
        model.q.projections is model.v.projections and model.q.projections.A.dtype == torch.float64
    )
    lora.mark_only_lora_as_trainable(model)
    vera_count = lora.count_parameters(model).trainable
    assert vera_count == (4 + 16) * 2 + (4 + 24)
    lora_model = lora.mark_only_lora_as_trainable(
        lora.replace_linear_with_lora(tiny(), 4, 8, exclude="head")
    )
    assert lora.count_parameters(lora_model).trainable == 4 * (16 + 16) * 2 + 4 * (16 + 24)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="rank"):
        LinearWithVeRA(nn.Linear(4, 4), 0)
    with pytest.raises(ValueError, match="d_initial"):
        LinearWithVeRA(nn.Linear(4, 4), 2, d_initial=float("nan"))
    with pytest.raises(ValueError, match="PiSSA needs rank <= 3"):
        LinearWithPiSSA(nn.Linear(3, 8), 4, 8)
    with pytest.raises(TypeError, match="nn.Linear"):
        LinearWithDoRA(nn.Conv1d(2, 2, 1), 2, 4)
    with pytest.raises(ValueError, match="lr_ratio"):
        loraplus_param_groups(tiny(), 1e-3, lr_ratio=0)
    with pytest.raises(ValueError, match="no parameter requires a gradient"):
        loraplus_param_groups(tiny().requires_grad_(False), 1e-3)
    layer = LinearWithDoRA(nn.Linear(4, 4), 2, 4)
    layer.merge()
    with torch.no_grad():
        layer.m[0] = 0.0
    with pytest.raises(ValueError, match="magnitudes"):
        layer.unmerge()


# ----------------------------------------------------------------------------- PEFT peer checks


def peft_layer(model: nn.Module, name: str) -> nn.Module:
    return model.base_model.model.get_submodule(name)


def copy_lora_into_peft(ours: lora.LinearWithLoRA, theirs: nn.Module) -> None:
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora.A.T)
        theirs.lora_B["default"].weight.copy_(ours.lora.B.T)
        if isinstance(ours, LinearWithDoRA):
            theirs.lora_magnitude_vector["default"].weight.copy_(ours.m)


def assert_same_outputs_and_gradients(
    ours: nn.Module, theirs: nn.Module, pairs: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    out_ours, out_theirs = ours(X), theirs(X)
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-6, rtol=1e-5)
    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    for mine, peer in pairs:
        assert mine.grad is not None and mine.grad.abs().sum() > 0
        torch.testing.assert_close(mine.grad, peer.grad.reshape(mine.grad.shape) if mine.ndim == 1 else peer.grad.T,
                                   atol=1e-5, rtol=1e-4)  # fmt: skip


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("wrapper", [lora.LinearWithLoRA, LinearWithDoRA])
def test_peer_lora_rslora_and_dora_match_peft(wrapper, use_rslora: bool) -> None:
    ours = lora.replace_linear_with_lora(
        tiny(), 4, 8, exclude="head", wrapper=wrapper, use_rslora=use_rslora
    )
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "up"], use_rslora=use_rslora,
                        use_dora=wrapper is LinearWithDoRA)  # fmt: skip
    theirs = get_peft_model(tiny(), config)
    pairs = []
    for name, layer in lora.adapter_layers(ours).items():
        randomize_(layer)
        peer = peft_layer(theirs, name)
        assert peer.scaling["default"] == pytest.approx(layer.lora.scaling)
        if wrapper is LinearWithDoRA:  # PEFT initialises the magnitude to the same row norms
            torch.testing.assert_close(
                layer.linear.weight.norm(dim=1), peer.lora_magnitude_vector["default"].weight
            )
        copy_lora_into_peft(layer, peer)
        pairs += [
            (layer.lora.A, peer.lora_A["default"].weight),
            (layer.lora.B, peer.lora_B["default"].weight),
        ]
        if wrapper is LinearWithDoRA:
            pairs.append((layer.m, peer.lora_magnitude_vector["default"].weight))
    assert_same_outputs_and_gradients(ours, theirs, pairs)


def test_peer_pissa_matches_peft_initialisation_and_gradients() -> None:
    ours = lora.replace_linear_with_lora(tiny(), 4, 8, exclude="head", wrapper=LinearWithPiSSA)
    theirs = get_peft_model(
        tiny(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "up"], init_lora_weights="pissa"),
    )
    pairs = []
    for name, layer in lora.adapter_layers(ours).items():
        peer = peft_layer(theirs, name)
        torch.testing.assert_close(
            layer.lora.A, peer.lora_A["default"].weight.T, atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            layer.lora.B, peer.lora_B["default"].weight.T, atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            layer.linear.weight, peer.base_layer.weight, atol=1e-5, rtol=1e-5
        )
        pairs += [
            (layer.lora.A, peer.lora_A["default"].weight),
            (layer.lora.B, peer.lora_B["default"].weight),
        ]
    assert_same_outputs_and_gradients(ours, theirs, pairs)


def test_peer_vera_matches_peft_projections_init_and_gradients() -> None:
    # PEFT draws one pair for the largest shape and slices it; with layers of one shape both agree exactly.
    ours = replace_linear_with_vera(tiny(), 4, include=["q", "v"], seed=7)
    theirs = get_peft_model(
        tiny(), VeraConfig(r=4, target_modules=["q", "v"], projection_prng_key=7)
    )
    pairs = []
    for name, layer in lora.adapter_layers(ours).items():
        peer = peft_layer(theirs, name)
        assert torch.equal(layer.projections.A, peer.vera_A["default"].T)
        assert torch.equal(layer.projections.B, peer.vera_B["default"].T)
        assert torch.equal(layer.b, peer.vera_lambda_b["default"]) and torch.equal(
            layer.d, peer.vera_lambda_d["default"]
        )
        randomize_(layer)
        with torch.no_grad():
            peer.vera_lambda_b["default"].copy_(layer.b)
            peer.vera_lambda_d["default"].copy_(layer.d)
        pairs += [
            (layer.d, peer.vera_lambda_d["default"]),
            (layer.b, peer.vera_lambda_b["default"]),
        ]
    assert_same_outputs_and_gradients(ours, theirs, pairs)


def test_peer_loraplus_matches_peft_groups_and_one_step() -> None:
    ours = lora.replace_linear_with_lora(tiny(), 4, 8, exclude="head")
    lora.mark_only_lora_as_trainable(ours, extra="head")
    theirs = get_peft_model(tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "up"]))
    theirs.base_model.model.head.requires_grad_(True)
    for name, layer in lora.adapter_layers(ours).items():
        randomize_(layer)
        copy_lora_into_peft(layer, peft_layer(theirs, name))

    def role(name: str) -> str:  # the same parameter under our name and PEFT's
        for key, value in (("lora_A", "A"), ("lora.A", "A"), ("lora_B", "B"), ("lora.B", "B")):
            if key in name:
                return name.split(".")[-4 if "lora_" in name else -3] + "." + value
        return name.removeprefix("base_model.model.")

    def lrs(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, tuple[float, float]]:
        by_id = {
            id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]
        }
        return {role(n): by_id[id(p)] for n, p in model.named_parameters() if p.requires_grad}

    mine = create_loraplus_optimizer(
        ours, torch.optim.AdamW, lr=1e-3, lr_ratio=16, weight_decay=0.01
    )
    peer = peft_loraplus(
        theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.01
    )
    assert lrs(ours, mine) == lrs(theirs, peer)
    assert lrs(ours, mine)["q.B"] == (16e-3, 0.01) and lrs(ours, mine)["q.A"] == (1e-3, 0.01)
    for model, optimizer in ((ours, mine), (theirs, peer)):
        model(X).square().mean().backward()
        optimizer.step()
    for name, layer in lora.adapter_layers(ours).items():
        peer_layer = peft_layer(theirs, name)
        torch.testing.assert_close(
            layer.lora.B, peer_layer.lora_B["default"].weight.T, atol=1e-6, rtol=1e-5
        )
        torch.testing.assert_close(
            layer.lora.A, peer_layer.lora_A["default"].weight.T, atol=1e-6, rtol=1e-5
        )


# ----------------------------------------------------------------------------- the rsLoRA experiment


def test_fit_random_update_is_seeded_and_rank_one_scalings_agree() -> None:
    plain = fit_random_update(1, use_rslora=False, dim=32, steps=20)
    rs = fit_random_update(1, use_rslora=True, dim=32, steps=20)
    assert plain == rs  # alpha / 1 == alpha / sqrt(1): the same run
    assert fit_random_update(1, use_rslora=False, dim=32, steps=20) == plain
    high_rank = fit_random_update(16, use_rslora=True, dim=32, steps=20)
    assert high_rank[-1] < high_rank[0]
    assert fit_random_update(16, use_rslora=False, dim=32, steps=20) != high_rank
