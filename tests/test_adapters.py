"""Tests of lora_tutorial.adapters: adapter files written, read and loaded; new adapter kinds."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tinygpt import ATTENTION_AND_FF, TinyGPT, lora_model, randomize_adapters, tiny_model
from torch import nn

from lora_tutorial import adapters
from lora_tutorial.adapters import (
    ADAPTER_KINDS,
    AdapterFileError,
    load_adapter,
    read_adapter,
    save_adapter,
)
from lora_tutorial.lora import (
    LinearWithLoRA,
    adapter_layers,
    count_parameters,
    mark_only_lora_as_trainable,
    merge_lora,
    replace_linear_with_lora,
)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- adapters on disk


def test_save_load_into_fresh_base_gives_identical_outputs(tmp_path, tokens: torch.Tensor) -> None:
    model = mark_only_lora_as_trainable(lora_model(use_rslora=True), extra_modules="out_head")
    with torch.no_grad():
        model.out_head.weight.mul_(-2)  # a "trained" head
    path = save_adapter(model, tmp_path / "adapter.safetensors", extra_modules=["out_head"])
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]  # no temporary file left

    fresh = load_adapter(tiny_model(), path)
    assert list(adapter_layers(fresh)) == list(adapter_layers(model))
    assert fresh.trf_blocks[0].att.W_key.config()["use_rslora"]
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
    expected = (
        r"layer 'trf_blocks\.0\.att\.W_query'.*"
        r"\(16, 4\) in the adapter file but \(24, 4\) in the model"
    )
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
            key: f.get_tensor(key)
            for key in f.keys()  # noqa: SIM118 (safe_open objects are not iterable)
            if key != "trf_blocks.1.ff.layers.2.lora.B"
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
    """GPTModel with GPT-2 small's shapes, its memory allocated but never written (no download)."""
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
        if self.merged:
            return self.merged_forward(x)
        return self.linear(x) + self.gate * self.lora(x)

    def config(self) -> dict:
        return {**super().config(), "gate": 1.0}

    def delta_weight(self) -> torch.Tensor:
        return self.gate * super().delta_weight()


def test_new_adapter_kinds_register_replace_save_and_load(
    tmp_path, tokens: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ADAPTER_KINDS["lora"] is LinearWithLoRA
    assert "test-gated-lora" not in ADAPTER_KINDS  # no class registers itself by being defined
    monkeypatch.setitem(ADAPTER_KINDS, "test-gated-lora", LinearWithGatedLoRA)
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
    torch.testing.assert_close(merge_lora(fresh).eval()(tokens), expected, rtol=1e-6, atol=1e-6)


def test_subclass_without_its_own_kind_cannot_be_saved(tmp_path) -> None:
    class Unnamed(LinearWithLoRA):
        pass

    model = replace_linear_with_lora(tiny_model(), 4, 8, include="W_query", wrapper=Unnamed)
    with pytest.raises(
        TypeError, match="Unnamed has kind 'lora', which is registered to LinearWithLoRA"
    ):
        save_adapter(model, tmp_path / "a.safetensors")
    assert ADAPTER_KINDS["lora"] is LinearWithLoRA
