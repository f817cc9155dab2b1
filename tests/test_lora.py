"""Tests of lora_tutorial.lora: layers, replacement, freezing, merging, adapter files, and a PEFT peer check."""

from __future__ import annotations

import copy
import json
import math
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lora_tutorial import adapters, lora
from lora_tutorial.adapters import AdapterFileError, load_adapter, read_adapter, save_adapter
from lora_tutorial.lora import (
    ADAPTER_KINDS,
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


# ----------------------------------------------------------------------------- adapters on disk


def test_save_load_into_fresh_base_gives_identical_outputs(tmp_path, tokens: torch.Tensor) -> None:
    model = mark_only_lora_as_trainable(lora_model(use_rslora=True), extra="out_head")
    with torch.no_grad():
        model.out_head.weight.mul_(-2)  # a "trained" head
    path = save_adapter(model, tmp_path / "adapter.safetensors", extra_modules=["out_head"])
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]  # no temporary file left

    fresh = load_adapter(tiny_model(), path)
    assert list(adapter_layers(fresh)) == list(adapter_layers(model))
    assert fresh.trf_blocks[0].att.W_key.lora.use_rslora
    assert torch.equal(fresh(tokens), model(tokens))


@pytest.mark.skipif(os.name != "posix", reason="file modes and the umask are POSIX features")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_adapter_gets_the_permissions_of_a_new_file(tmp_path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        path = save_adapter(lora_model(), tmp_path / "a.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # 0o644 under the usual umask 022


def test_adapter_file_holds_only_adapter_tensors_and_metadata(tmp_path) -> None:
    model = lora_model()
    path = save_adapter(model, tmp_path / "a.safetensors", extra_modules="out_head")
    with safe_open(str(path), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert keys == {f"{name}.lora.{ab}" for name in adapter_layers(model) for ab in "AB"} | {
        "out_head.weight",
        "out_head.bias",
    }
    summary = (metadata["rank"], metadata["alpha"], metadata["scaling"], metadata["kind"])
    assert summary == ("4", "8", "alpha/rank", "lora")
    assert json.loads(metadata["extra_modules"]) == ["out_head"]
    layers = json.loads(metadata["layers"])
    assert list(layers) == list(adapter_layers(model))
    assert layers["trf_blocks.0.att.W_query"] == {
        "kind": "lora",
        "config": {"rank": 4, "alpha": 8, "use_rslora": False, "dropout": 0.0},
    }
    assert read_adapter(path)[1]["layers"] == layers


def test_load_into_model_with_other_shapes_names_layer_and_shapes(tmp_path) -> None:
    path = save_adapter(lora_model(), tmp_path / "a.safetensors")
    torch.manual_seed(0)
    wider = TinyGPT(d=24)
    expected = r"layer 'trf_blocks\.0\.att\.W_query'.*\(16, 4\) in the adapter file but \(24, 4\) in the model"
    with pytest.raises(ValueError, match=expected):
        load_adapter(wider, path)
    assert adapter_layers(wider) == {}  # the failed load left the model as it was


def test_load_into_model_with_other_rank_or_layers(tmp_path) -> None:
    path = save_adapter(lora_model(), tmp_path / "a.safetensors")
    other_rank = replace_linear_with_lora(tiny_model(), 2, 8, include=ATTENTION_AND_FF)
    with pytest.raises(
        ValueError,
        match=r"'trf_blocks\.0\.att\.W_query' is already a lora adapter with .*'rank': 2",
    ):
        load_adapter(other_rank, path)
    torch.manual_seed(0)
    shallower = TinyGPT(n_layers=1)
    with pytest.raises(
        ValueError, match=r"adapted layer 'trf_blocks\.1\.att\.W_query' is not a module"
    ):
        load_adapter(shallower, path)
    assert adapter_layers(shallower) == {}


def test_load_names_a_missing_tensor(tmp_path) -> None:
    path = save_adapter(lora_model(), tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {
            key: f.get_tensor(key) for key in f.keys() if key != "trf_blocks.1.ff.layers.2.lora.B"
        }
    save_file(tensors, str(path), metadata=metadata)
    model = tiny_model()
    with pytest.raises(
        ValueError, match=r"'trf_blocks\.1\.ff\.layers\.2': the adapter file has no tensor"
    ):
        load_adapter(model, path)
    assert adapter_layers(model) == {}


def test_load_refuses_merged_layers(tmp_path) -> None:
    model = lora_model()
    path = save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="is merged; call unmerge_lora"):
        load_adapter(merge_lora(model), path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign"])
def test_unreadable_files_raise_clear_errors(tmp_path, damage: str) -> None:
    path = save_adapter(lora_model(), tmp_path / "a.safetensors")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 100])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01not a safetensors file" * 10)
    else:
        save_file({"w": torch.zeros(2)}, str(path))
    message = "not a lora_tutorial adapter" if damage == "foreign" else "truncated or corrupt"
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(tiny_model(), path)
    with pytest.raises(FileNotFoundError, match="no adapter file"):
        load_adapter(tiny_model(), tmp_path / "missing.safetensors")


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.safetensors"
    target.write_bytes(b"previous adapter")

    def failing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(lora_model(), target)
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
    assert target.read_bytes() == b"previous adapter"


def test_nothing_to_save() -> None:
    with pytest.raises(ValueError, match="save_adapter: the model has no adapter layers"):
        save_adapter(tiny_model(), "unused.safetensors")


def gpt2_small_uninitialised() -> nn.Module:
    """GPTModel with GPT-2 small's shapes, its memory allocated but never written (fast, no download)."""
    from lora_tutorial.gpt import GPT_CONFIGS, GPTModel

    with torch.device("meta"):
        model = GPTModel(GPT_CONFIGS["gpt2-small"])
    model = model.to_empty(device="cpu")
    model.out_head.weight = model.tok_emb.weight  # to_empty unties the shared weight; GPT-2 ties it
    return model


def test_gpt2_small_adapter_is_under_two_percent_of_the_model(tmp_path) -> None:
    model = gpt2_small_uninitialised()
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 120e6 < full_bytes / 4 < 130e6  # GPT-2 small has 124M parameters
    replace_linear_with_lora(model, rank=8, alpha=16, include=ATTENTION_AND_FF)
    assert len(adapter_layers(model)) == 12 * 6
    path = save_adapter(model, tmp_path / "gpt2-small-r8.safetensors")
    size = path.stat().st_size
    adapter_bytes = 4 * 12 * 8 * (4 * (768 + 768) + 2 * (768 + 3072))
    assert adapter_bytes < size < adapter_bytes + 64_000  # the tensors plus a small header
    assert size / full_bytes < 0.02


# ----------------------------------------------------------------------------- the extension point


class LinearWithGatedLoRA(LinearWithLoRA):
    """A toy adapter kind: LoRA with an extra trainable scalar gate on the update."""

    kind = "test-gated-lora"

    def __init__(
        self, linear: nn.Linear, rank: int, alpha: float, *, gate: float = 1.0, **kwargs
    ) -> None:
        super().__init__(linear, rank, alpha, **kwargs)
        self.gate = nn.Parameter(torch.tensor(gate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) if self.merged else self.linear(x) + self.gate * self.lora(x)

    def config(self) -> dict:
        return {**super().config(), "gate": 1.0}

    def delta_weight(self) -> torch.Tensor:
        return self.gate * super().delta_weight()


def test_new_adapter_kinds_register_replace_save_and_load(tmp_path, tokens: torch.Tensor) -> None:
    assert ADAPTER_KINDS["test-gated-lora"] is LinearWithGatedLoRA
    assert ADAPTER_KINDS["lora"] is LinearWithLoRA
    model = replace_linear_with_lora(
        tiny_model(), 4, 8, include="ff.*", wrapper=LinearWithGatedLoRA, gate=1.0
    )
    randomize_adapters(model)
    mark_only_lora_as_trainable(model)
    assert count_parameters(model).trainable == 2 * 2 * (
        4 * (16 + 64) + 1
    )  # 2 blocks x 2 layers x (A, B, gate)
    with torch.no_grad():
        model.trf_blocks[0].ff.layers[0].gate.fill_(0.5)
    path = save_adapter(model, tmp_path / "gated.safetensors")
    fresh = load_adapter(tiny_model(), path)
    assert type(fresh.trf_blocks[0].ff.layers[0]) is LinearWithGatedLoRA
    assert fresh.trf_blocks[0].ff.layers[0].gate.item() == 0.5
    assert torch.equal(fresh(tokens), model(tokens))
    expected = fresh(tokens)
    torch.testing.assert_close(merge_lora(fresh)(tokens), expected, rtol=1e-6, atol=1e-6)


def test_subclass_without_its_own_kind_cannot_be_saved(tmp_path) -> None:
    class Unnamed(LinearWithLoRA):
        pass

    model = replace_linear_with_lora(tiny_model(), 4, 8, include="W_query", wrapper=Unnamed)
    with pytest.raises(
        TypeError, match="Unnamed has kind 'lora', which is registered to LinearWithLoRA"
    ):
        save_adapter(model, tmp_path / "a.safetensors")
    assert ADAPTER_KINDS["lora"] is LinearWithLoRA


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
