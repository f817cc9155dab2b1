"""Tests of lora_tutorial.variants (DoRA, PiSSA, VeRA, LoRA+), with PEFT peer checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_tutorial import adapters, lora
from lora_tutorial.quantize import LinearWithQLoRA, quantize_linear_layers
from lora_tutorial.variants import (
    LinearWithDoRA,
    LinearWithPiSSA,
    LinearWithVeRA,
    create_loraplus_optimizer,
    linear_with_init,
    loraplus_param_groups,
    milora_init,
    olora_init,
    replace_linear_with_vera,
    share_vera_projections,
)

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
    """Give every adapter tensor random values, so that peer checks cannot pass by both being 0."""
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
        assert quantize_linear_layers(base, exclude="head") == 3
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
    weights = {n: layer.linear.weight.clone() for n, layer in lora.adapter_layers(model).items()}
    model.eval()
    expected = model(X)
    lora.merge_lora(model)
    lora.merge_lora(model)  # twice is harmless
    torch.testing.assert_close(model(X), expected, atol=1e-5, rtol=1e-5)
    lora.unmerge_lora(model)
    for name, layer in lora.adapter_layers(model).items():
        assert torch.equal(layer.linear.weight, weights[name])
    assert torch.equal(model(X), expected)
    plain = lora.merge_and_unload(model)
    assert not lora.adapter_layers(plain)
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
    lora.mark_only_lora_as_trainable(model, extra_modules="head")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {
        f"{name}.projections.{key}": buffer.clone()
        for name, layer in lora.adapter_layers(model).items()
        if isinstance(layer, LinearWithVeRA)
        for key, buffer in layer.projections.named_buffers()
    }
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
    fresh = adapters.load_adapter(tiny(), path, replace_modules="head")
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
    with pytest.raises(ValueError, match=r"at most min\(in_dim, out_dim\) = 3 for PiSSA, got 4"):
        LinearWithPiSSA(nn.Linear(3, 8), 4, 8)
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        LinearWithDoRA(nn.Conv1d(2, 2, 1), 2, 4)
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        LinearWithPiSSA(nn.Conv1d(2, 2, 1), 2, 4)
    with pytest.raises(ValueError, match="seed must be an integer"):
        LinearWithVeRA(nn.Linear(4, 4), 2, seed=1.5)
    with pytest.raises(ValueError, match="lr_ratio"):
        loraplus_param_groups(tiny(), 1e-3, lr_ratio=0)
    with pytest.raises(ValueError, match="no parameter requires a gradient"):
        loraplus_param_groups(tiny().requires_grad_(False), 1e-3)


def test_dora_with_an_all_zero_weight_row_gives_no_nan() -> None:
    linear = nn.Linear(6, 4)
    with torch.no_grad():
        linear.weight[2] = 0.0
    layer = LinearWithDoRA(linear, 2, 4)
    x = torch.randn(3, 6)
    out = layer(x)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, linear(x))  # equal to the base at the start, row 2 included
    with torch.no_grad():
        layer.lora.B.normal_()
    layer(x).sum().backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in layer.adapter_parameters())
    layer.eval().merge()
    assert bool(torch.isfinite(layer.merged_weight).all())


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
        expected = peer.grad.reshape(mine.grad.shape) if mine.ndim == 1 else peer.grad.T
        torch.testing.assert_close(mine.grad, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("wrapper", [lora.LinearWithLoRA, LinearWithDoRA])
def test_peer_lora_rslora_and_dora_match_peft(wrapper, use_rslora: bool) -> None:
    peft = pytest.importorskip("peft")
    ours = lora.replace_linear_with_lora(
        tiny(), 4, 8, exclude="head", wrapper=wrapper, use_rslora=use_rslora
    )
    dora = wrapper is LinearWithDoRA
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q", "v", "up"], use_rslora=use_rslora, use_dora=dora
    )
    theirs = peft.get_peft_model(tiny(), config)
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
    peft = pytest.importorskip("peft")
    ours = lora.replace_linear_with_lora(tiny(), 4, 8, exclude="head", wrapper=LinearWithPiSSA)
    theirs = peft.get_peft_model(
        tiny(),
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q", "v", "up"], init_lora_weights="pissa"
        ),
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
    peft = pytest.importorskip("peft")
    # PEFT draws one pair for the largest shape and slices it; for one shape both agree exactly.
    ours = replace_linear_with_vera(tiny(), 4, include=["q", "v"], seed=7)
    theirs = peft.get_peft_model(
        tiny(), peft.VeraConfig(r=4, target_modules=["q", "v"], projection_prng_key=7)
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
    peft = pytest.importorskip("peft")
    ours = lora.replace_linear_with_lora(tiny(), 4, 8, exclude="head")
    lora.mark_only_lora_as_trainable(ours, extra_modules="head")
    theirs = peft.get_peft_model(
        tiny(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "up"])
    )
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
    peer = pytest.importorskip("peft.optimizers").create_loraplus_optimizer(
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


# ----------------------------------------------------------------------------- OLoRA and MiLoRA


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])  # (in, out): more inputs, then more outputs
def test_peer_olora_matches_peft_initialisation(shape, use_rslora: bool) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(*shape))
    original = model[0].weight.detach().clone()
    A, B, residual = olora_init(model[0], 3, 6, use_rslora=use_rslora)
    config = peft.LoraConfig(
        r=3, lora_alpha=6, target_modules=["0"], init_lora_weights="olora", use_rslora=use_rslora
    )
    peer = peft.get_peft_model(copy.deepcopy(model), config).base_model.model[0]
    # Our A (in, r) is PEFT's lora_A.weight (r, in) transposed; our B (r, out) its lora_B.weight.
    torch.testing.assert_close(A, peer.lora_A["default"].weight.T, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(B, peer.lora_B["default"].weight.T, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(residual, peer.base_layer.weight, atol=1e-6, rtol=1e-6)
    assert torch.equal(model[0].weight, original), "olora_init must not modify the given layer"
    torch.testing.assert_close(B @ B.T, torch.eye(3), atol=1e-5, rtol=0)  # orthonormal rows


@pytest.mark.parametrize("init", [olora_init, milora_init])
def test_olora_and_milora_start_exactly_at_the_base_layer(init) -> None:
    torch.manual_seed(4)
    base = nn.Linear(12, 7).requires_grad_(False)  # frozen, as a pretrained layer is
    A, B, residual = init(base, 3, 6)
    torch.testing.assert_close(residual + 2.0 * (A @ B).T, base.weight.detach(), atol=1e-5, rtol=0)
    layer = linear_with_init(base, 3, 6, init)
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), base(x), atol=1e-5, rtol=0)
    assert layer.linear is not base and not layer.linear.weight.requires_grad
    assert {n for n, p in layer.named_parameters() if p.requires_grad} >= {"lora.A", "lora.B"}


def test_milora_adapter_holds_the_smallest_singular_directions() -> None:
    torch.manual_seed(5)
    base = nn.Linear(12, 7, bias=False)
    rank, alpha = 3, 12  # scaling 4: the singular values are divided between A, B and s
    A, B, residual = milora_init(base, rank, alpha)
    S = torch.linalg.svdvals(base.weight.detach())
    torch.testing.assert_close(torch.linalg.svdvals(4.0 * (A @ B).T)[:rank], S[-rank:])
    torch.testing.assert_close(torch.linalg.svdvals(residual)[: 7 - rank], S[: 7 - rank])
    torch.testing.assert_close(A.norm(dim=0), B.norm(dim=1))  # sqrt(S / s) on each side


def test_new_initialisations_refuse_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rank"):
        olora_init(nn.Linear(12, 7), 8, 16)  # more than min(in, out)
    with pytest.raises(ValueError, match="alpha"):
        milora_init(nn.Linear(12, 7), 2, 0)
    with pytest.raises(TypeError, match="nn.Linear"):
        olora_init(nn.Conv1d(3, 3, 1), 2, 4)  # type: ignore[arg-type]
