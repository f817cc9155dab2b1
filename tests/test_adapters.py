"""Tests of lora_tutorial.adapters: adapter files, their integrity checks, and registered kinds."""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lora_tutorial import adapters
from lora_tutorial.adapters import AdapterFileError, load_adapter, read_adapter, save_adapter
from lora_tutorial.lora import (
    LinearWithLoRA,
    adapter_layers,
    mark_only_lora_as_trainable,
    merge_lora,
    replace_linear_with_lora,
)

X = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
HIDDEN = ["0", "2"]  # the adapted layers; "4" is the head


class Classifier(nn.Sequential):
    new_modules = ("4",)  # its head is new, as a GPTClassifier's is: adapter files may replace it


def base(seed: int = 0, width: int = 16) -> nn.Sequential:
    """Two hidden linear layers and a head ("4"): a stand-in for a pretrained base model."""
    torch.manual_seed(seed)
    return Classifier(
        nn.Linear(8, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 3)
    )


def trained(seed: int = 0, width: int = 16, **kwargs) -> nn.Sequential:
    """The base with rank-4 LoRA on its hidden layers and B made nonzero, as training would."""
    model = replace_linear_with_lora(base(seed, width), 4, 8, exclude="4", **kwargs)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora.B.copy_(0.1 * torch.randn(layer.lora.B.shape, generator=gen))
    return model


def contents(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata())  # noqa: SIM118


def rewrite(path: Path, tensors=None, **fields: str | None) -> None:
    """Rewrite an adapter file as an editor would: other tensors or fields (None: remove)."""
    old_tensors, metadata = contents(path)
    for key, value in fields.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    save_file(old_tensors if tensors is None else tensors, str(path), metadata=metadata)


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".linear." in k}


# ----------------------------------------------------------------------------- round trips


def test_save_load_into_fresh_base_gives_identical_outputs(tmp_path) -> None:
    model = mark_only_lora_as_trainable(trained(use_rslora=True), extra_modules="4")
    with torch.no_grad():
        model[4].weight.mul_(-2)  # a "trained" head
    path = save_adapter(model, tmp_path / "adapter.safetensors", extra_modules=["4"])
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]  # no temporary file

    fresh = load_adapter(base(), path)
    assert list(adapter_layers(fresh)) == HIDDEN
    assert fresh[0].config()["use_rslora"]
    assert torch.equal(fresh(X), model(X))


def test_load_accepts_the_same_base_in_another_dtype(tmp_path) -> None:
    path = save_adapter(trained(), tmp_path / "a.safetensors")
    fresh = load_adapter(base().to(torch.bfloat16), path)
    torch.testing.assert_close(fresh(X.bfloat16()).float(), trained()(X), atol=0.05, rtol=0.05)


@pytest.mark.skipif(os.name != "posix", reason="file modes and the umask are POSIX features")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_adapter_gets_the_permissions_of_a_new_file(tmp_path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        path = save_adapter(trained(), tmp_path / "a.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # 0o644 under the usual umask 022


def test_adapter_file_holds_only_adapter_tensors_and_metadata(tmp_path) -> None:
    model = trained()
    path = save_adapter(model, tmp_path / "a.safetensors", extra_modules="4")
    tensors, metadata = contents(path)
    assert set(tensors) == {f"{n}.lora.{ab}" for n in HIDDEN for ab in "AB"} | {
        "4.weight",
        "4.bias",
    }
    summary = (metadata["rank"], metadata["alpha"], metadata["scaling"], metadata["kind"])
    assert summary == ("4", "8", "alpha/rank", "lora")
    assert json.loads(metadata["extra_modules"]) == ["4"]
    layers = json.loads(metadata["layers"])
    assert list(layers) == HIDDEN
    assert layers["2"] == {
        "kind": "lora",
        "config": {"rank": 4, "alpha": 8, "use_rslora": False, "dropout": 0.0},
        "in_dim": 16,
        "out_dim": 16,
    }
    assert metadata["base_fingerprint"] == adapters.base_fingerprint(model)
    assert len(metadata["sha256"]) == 64
    assert read_adapter(path)[1]["layers"] == layers


def test_load_into_model_with_other_shapes_names_layer_and_shapes(tmp_path) -> None:
    path = save_adapter(trained(), tmp_path / "a.safetensors")
    wider = base(width=24)
    with pytest.raises(ValueError, match=r"layer '0'.*\(4, 16\) in the adapter file but \(4, 24\)"):
        load_adapter(wider, path)
    assert adapter_layers(wider) == {}  # the failed load left the model as it was


def test_load_into_model_with_other_rank_or_layers(tmp_path) -> None:
    path = save_adapter(trained(), tmp_path / "a.safetensors")
    other_rank = replace_linear_with_lora(base(), 2, 8, exclude="4")
    with pytest.raises(ValueError, match=r"'0' is already a lora adapter with .*'rank': 2"):
        load_adapter(other_rank, path)
    shallower = base()[:2]
    with pytest.raises(ValueError, match=r"adapted layer '2' is not a module"):
        load_adapter(shallower, path)
    assert adapter_layers(shallower) == {}


def test_load_refuses_merged_layers_and_save_refuses_merged_models(tmp_path) -> None:
    model = trained()
    path = save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="is merged; call unmerge_lora"):
        load_adapter(merge_lora(model), path)
    with pytest.raises(ValueError, match=r"is merged.*call unmerge_lora"):
        save_adapter(model, tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign"])
def test_unreadable_files_raise_clear_errors(tmp_path, damage: str) -> None:
    path = save_adapter(trained(), tmp_path / "a.safetensors")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 100])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01not a safetensors file" * 10)
    else:
        save_file({"w": torch.zeros(2)}, str(path))
    message = "not a lora_tutorial adapter" if damage == "foreign" else "truncated or corrupt"
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(base(), path)
    with pytest.raises(FileNotFoundError, match="no adapter file"):
        load_adapter(base(), tmp_path / "missing.safetensors")


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.safetensors"
    target.write_bytes(b"previous adapter")

    def failing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(trained(), target)
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
    assert target.read_bytes() == b"previous adapter"


def test_nothing_to_save() -> None:
    with pytest.raises(ValueError, match="save_adapter: the model has no adapter layers"):
        save_adapter(base(), "unused.safetensors")


def test_gpt2_small_adapter_is_under_two_percent_of_the_model(tmp_path) -> None:
    from lora_tutorial.gpt import GPT_CONFIGS, GPTModel

    with torch.device("meta"):  # GPT-2 small's shapes, memory allocated but never written: fast
        model = GPTModel(GPT_CONFIGS["gpt2-small"])
    model = model.to_empty(device="cpu")
    model.out_head.weight = model.tok_emb.weight  # to_empty unties the shared weight
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 120e6 < full_bytes / 4 < 130e6  # GPT-2 small has 124M parameters
    replace_linear_with_lora(model, rank=8, alpha=16, include=["att.*", "ff.*"])
    assert len(adapter_layers(model)) == 12 * 6
    path = save_adapter(model, tmp_path / "gpt2-small-r8.safetensors")
    size = path.stat().st_size
    adapter_bytes = 4 * 12 * 8 * (4 * (768 + 768) + 2 * (768 + 3072))
    assert adapter_bytes < size < adapter_bytes + 64_000  # the tensors plus a small header
    assert size / full_bytes < 0.02


# ----------------------------------------------------------------------------- integrity


def _data_offset(path: Path) -> int:
    """Where the tensor data starts: after the 8-byte header length and the JSON header."""
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_flipped_data_bytes_are_detected(tmp_path) -> None:
    path = save_adapter(trained(), tmp_path / "a.safetensors")
    data = bytearray(path.read_bytes())
    data[_data_offset(path)] ^= 0x01  # the lowest mantissa bit of the first value
    path.write_bytes(bytes(data))
    model = base()
    with pytest.raises(AdapterFileError, match="fails its checksum"):
        load_adapter(model, path)
    assert adapter_layers(model) == {}


@pytest.mark.parametrize("field, value", [("alpha", 80), ("rank", 8), ("dropout", 0.5)])
def test_edited_config_is_detected(tmp_path, field: str, value: float) -> None:
    path = save_adapter(trained(), tmp_path / "a.safetensors")
    layers = json.loads(contents(path)[1]["layers"])
    layers["0"]["config"][field] = value
    rewrite(path, layers=json.dumps(layers))
    with pytest.raises(AdapterFileError, match="fails its checksum"):
        read_adapter(path)


@pytest.mark.parametrize(
    "field, value",
    [("alpha", "-8"), ("alpha", "NaN"), ("alpha", '"8"'), ("rank", "0"), ("rank", "true")],
)
def test_invalid_rank_or_alpha_is_named(tmp_path, field: str, value: str) -> None:
    path = save_adapter(trained(), tmp_path / "a.safetensors")
    layers = contents(path)[1]["layers"]
    edited = layers.replace(f'"{field}": {4 if field == "rank" else 8}', f'"{field}": {value}', 1)
    assert edited != layers
    rewrite(path, layers=edited)
    with pytest.raises(AdapterFileError, match=rf"'layers\.0\.config\.{field}'"):
        load_adapter(base(), path)


def test_config_that_does_not_fit_the_tensors_is_refused(tmp_path, monkeypatch) -> None:
    """A kind whose config() misreports its rank writes a file whose checksum is right."""

    class MisreportedRank(LinearWithLoRA):
        def config(self) -> dict:
            return {**super().config(), "rank": 8}

    monkeypatch.setitem(adapters.ADAPTER_KINDS, "misreported", MisreportedRank)
    model = trained(wrapper=MisreportedRank)
    path = save_adapter(model, tmp_path / "a.safetensors")
    fresh = base()
    with pytest.raises(AdapterFileError, match=r"'layers\.0\.config'.*does not fit its tensors"):
        load_adapter(fresh, path)
    assert adapter_layers(fresh) == {}


def test_unknown_kind_is_named(tmp_path) -> None:
    path = save_adapter(trained(), tmp_path / "a.safetensors")
    rewrite(path, layers=contents(path)[1]["layers"].replace('"lora"', '"mystery"', 1))
    with pytest.raises(AdapterFileError, match=r"'layers\.0\.kind' is 'mystery', not one of"):
        read_adapter(path)


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("layers", "{not json", "layers"),
        ("layers", "[]", "layers"),
        ("layers", '{"0": {"kind": "lora"}}', "layers.0"),
        (
            "layers",
            '{"0": {"kind": "lora", "config": [], "in_dim": 8, "out_dim": 16}}',
            "layers.0.c",
        ),
        (
            "layers",
            '{"0": {"kind": "lora", "config": {}, "in_dim": 0, "out_dim": 16}}',
            "layers.0.i",
        ),
        ("extra_modules", '"4"', "extra_modules"),
        ("extra_modules", "[4]", "extra_modules"),
        ("extra_modules", None, "extra_modules"),
        ("sha256", None, "sha256"),
        ("sha256", "abc", "sha256"),
        ("base_fingerprint", None, "base_fingerprint"),
    ],
)
def test_malformed_metadata_is_an_adapter_file_error_naming_the_field(
    tmp_path, field: str, value: str | None, named: str
) -> None:
    path = save_adapter(trained(), tmp_path / "a.safetensors", extra_modules="4")
    rewrite(path, **{field: value})
    with pytest.raises(AdapterFileError, match=f"metadata field '{named}"):
        load_adapter(base(), path)


def test_a_config_that_cannot_build_its_layer_is_named(tmp_path, monkeypatch) -> None:
    class MisspelledConfig(LinearWithLoRA):
        def config(self) -> dict:
            return {**super().config(), "droput": 0.1}

    monkeypatch.setitem(adapters.ADAPTER_KINDS, "misspelled", MisspelledConfig)
    path = save_adapter(trained(wrapper=MisspelledConfig), tmp_path / "a.safetensors")
    with pytest.raises(AdapterFileError, match=r"'layers\.0\.config' has keys .*'droput'"):
        load_adapter(base(), path)


def test_adapter_from_another_base_is_refused_unless_allowed(tmp_path) -> None:
    path = save_adapter(trained(seed=0), tmp_path / "a.safetensors")
    other = base(seed=1)
    with pytest.raises(ValueError, match=r"trained on another base model.*allow_other_base=True"):
        load_adapter(other, path)
    assert adapter_layers(other) == {}
    loaded = load_adapter(other, path, allow_other_base=True)
    assert list(adapter_layers(loaded)) == HIDDEN


def test_extra_modules_inside_adapter_layers_are_refused_at_save(tmp_path) -> None:
    model = trained()
    for extra in ["0.linear", "0.lora", "0", ""]:
        with pytest.raises((ValueError, TypeError), match="extra"):
            save_adapter(model, tmp_path / "a.safetensors", extra_modules=extra)
    holder = nn.Sequential(model)  # a module that holds adapter layers, frozen bases included
    with pytest.raises(ValueError, match="overlaps the adapter layer"):
        save_adapter(holder, tmp_path / "a.safetensors", extra_modules="0")
    assert not (tmp_path / "a.safetensors").exists()


def test_file_naming_a_base_layer_as_extra_module_is_refused_at_load(tmp_path) -> None:
    path = save_adapter(trained(), tmp_path / "a.safetensors")
    tensors, _ = contents(path)
    tensors["0.linear.weight"] = torch.zeros(16, 8)  # would overwrite the frozen base weight
    rewrite(path, tensors, extra_modules='["0.linear"]')
    model = replace_linear_with_lora(base(), 4, 8, exclude="4")
    before = base_weights(model)
    with pytest.raises(AdapterFileError, match=r"'extra_modules' names '0\.linear'"):
        load_adapter(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_extra_module_that_is_a_base_layer_under_another_name_is_refused_at_load(tmp_path) -> None:
    donor = trained()
    donor.alias = nn.Linear(8, 16)  # a real extra module in the model that saved the adapter
    path = save_adapter(donor, tmp_path / "a.safetensors", extra_modules="alias")
    model = replace_linear_with_lora(base(), 4, 8, exclude="4")
    model.alias = model[0].linear  # here the same name reaches a frozen base layer
    with pytest.raises(AdapterFileError, match="'alias' overlaps the adapter layer '0'"):
        load_adapter(model, path, replace_modules="alias")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_is_refused_at_save(tmp_path, bad: float) -> None:
    model = trained()
    with torch.no_grad():
        model[2].lora.B[0, 0] = bad
    with pytest.raises(ValueError, match=r"'2\.lora\.B' holds NaN or inf.*diverged"):
        save_adapter(model, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_nan_in_a_file_is_refused_at_load(tmp_path) -> None:
    path = save_adapter(trained(), tmp_path / "a.safetensors")
    data = bytearray(path.read_bytes())
    offset = _data_offset(path)
    data[offset : offset + 4] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match="holds NaN or inf"):
        load_adapter(base(), path)


# ----------------------------------------------------------------------------- adapter kinds


class LinearWithGatedLoRA(LinearWithLoRA):
    """A toy adapter kind: LoRA with an extra trainable scalar gate on the update."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, *, gate: float = 1.0, **kw):
        super().__init__(linear, rank, alpha, **kw)
        self.gate = nn.Parameter(torch.tensor(gate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) if self.merged else self.linear(x) + self.gate * self.lora(x)

    def config(self) -> dict:
        return {**super().config(), "gate": 1.0}


def test_a_registered_kind_is_saved_and_rebuilt(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(adapters.ADAPTER_KINDS, "test-gated-lora", LinearWithGatedLoRA)
    model = trained(wrapper=LinearWithGatedLoRA, gate=1.0)
    with torch.no_grad():
        model[0].gate.fill_(0.5)
    path = save_adapter(model, tmp_path / "gated.safetensors")
    assert json.loads(contents(path)[1]["layers"])["0"]["kind"] == "test-gated-lora"
    fresh = load_adapter(base(), path)
    assert type(fresh[0]) is LinearWithGatedLoRA and fresh[0].gate.item() == 0.5
    assert torch.equal(fresh(X), model(X))


def test_an_unregistered_subclass_cannot_be_saved(tmp_path) -> None:
    class Unnamed(LinearWithLoRA):
        pass

    model = replace_linear_with_lora(base(), 4, 8, include="0", wrapper=Unnamed)
    with pytest.raises(TypeError, match=r"Unnamed, which is not in adapters\.ADAPTER_KINDS"):
        save_adapter(model, tmp_path / "a.safetensors")
    assert adapters.ADAPTER_KINDS["lora"] is LinearWithLoRA


# ----------------------------------------------------------------------------- what a user meets


def gpt_classifier(seed: int = 0):
    from lora_tutorial import classify, gpt

    torch.manual_seed(seed)
    return classify.GPTClassifier(gpt.GPTModel("tiny"), num_classes=2)


def tokens() -> torch.Tensor:
    return torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(5))


def test_a_model_in_eval_mode_gets_its_new_layers_in_eval_mode(tmp_path) -> None:
    from lora_tutorial import train

    model = train.prepare_model(gpt_classifier(), "lora", rank=4, alpha=8, dropout=0.1)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora.B.normal_(std=0.1)
    path = save_adapter(model, tmp_path / "a.safetensors", extra_modules="gpt.out_head")
    fresh = load_adapter(gpt_classifier().eval(), path)
    assert not any(m.training for m in fresh.modules())
    with torch.no_grad():
        assert torch.equal(fresh(tokens()), fresh(tokens()))  # no dropout at inference
        assert torch.equal(fresh(tokens()), model.eval()(tokens()))


def test_a_file_replacing_a_pretrained_module_needs_the_callers_consent(tmp_path) -> None:
    from lora_tutorial import train

    model = train.prepare_model(gpt_classifier(), "lora", rank=4, alpha=8)
    extras = ["gpt.out_head", "gpt.final_norm"]
    with torch.no_grad():
        model.gpt.final_norm.weight.fill_(3.0)  # trained in full, say
    path = save_adapter(model, tmp_path / "a.safetensors", extra_modules=extras)
    fresh = gpt_classifier()
    with pytest.raises(
        ValueError,
        match=r"replace the model's module 'gpt\.final_norm'.*"
        r"replace_modules=\['gpt\.final_norm'\]",
    ):
        load_adapter(fresh, path)
    assert adapter_layers(fresh) == {} and bool((fresh.gpt.final_norm.weight == 1).all())
    load_adapter(fresh, path, replace_modules=["gpt.final_norm"])  # the head is new: allowed
    assert bool((fresh.gpt.final_norm.weight == 3).all())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(tokens()), model.eval()(tokens()))


def test_the_fingerprint_sees_a_change_to_any_single_base_weight(tmp_path) -> None:
    path = save_adapter(trained(), tmp_path / "a.safetensors")
    other = base()
    with torch.no_grad():
        other[2].weight[7, 13] += 0.5  # one value of 256 in one layer
    with pytest.raises(ValueError, match="trained on another base model"):
        load_adapter(other, path)
    loaded = load_adapter(base(), path)
    assert len(adapter_layers(loaded)) == 2
    with torch.no_grad():
        loaded[0].linear.weight[3, 3] += 0.5  # written in place after a first (cached) check
    with pytest.raises(ValueError, match="trained on another base model"):
        load_adapter(loaded, path)


def test_a_file_with_the_old_sampled_fingerprint_is_refused_clearly(tmp_path) -> None:
    path = save_adapter(trained(), tmp_path / "a.safetensors")
    tensors, metadata = contents(path)
    metadata.pop("fingerprint_version")
    metadata["sha256"] = adapters._checksum(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(AdapterFileError, match="older lora_tutorial.*save it again"):
        load_adapter(base(), path)
    assert len(adapter_layers(load_adapter(base(), path, allow_other_base=True))) == 2


def resaved(path: Path, layers=None, tensors=None, **fields: str) -> None:
    """Rewrite a file as a careful forger would: new metadata, a checksum that matches it."""
    old_tensors, metadata = contents(path)
    tensors = old_tensors if tensors is None else tensors
    if layers is not None:
        metadata["layers"] = json.dumps(layers)
    metadata.update(fields)
    metadata["sha256"] = adapters._checksum(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize(
    "key, value, named",
    [
        ("alpha", "1e308", "computes an update with inf or NaN"),
        ("use_rslora", '"false"', r"'layers\.0\.config\.use_rslora' is 'false', not true or false"),
        ("rank", "4.0", r"'layers\.0\.config\.rank' is 4\.0, not a positive integer"),
        ("alpha", "true", r"'layers\.0\.config\.alpha' is True, not a positive finite number"),
        ("dropout", '"0.1"', r"'layers\.0\.config\.dropout' is '0\.1', not a number in \[0, 1\)"),
        ("rank", "1000000000", r"'layers\.0\.config\.rank' is 1000000000, more than its tensors"),
    ],
)
def test_config_values_are_type_and_range_checked(tmp_path, key, value, named) -> None:
    path = save_adapter(trained(), tmp_path / "a.safetensors")
    layers = json.loads(contents(path)[1]["layers"])
    for record in layers.values():
        record["config"][key] = json.loads(value)
    summary = adapters._summary(layers)
    resaved(path, layers, **summary)
    model = base()
    with pytest.raises(ValueError, match=named) as error:
        load_adapter(model, path)
    assert "\n" not in str(error.value)
    assert adapter_layers(model) == {}


def test_the_summary_fields_must_agree_with_the_layers(tmp_path) -> None:
    path = save_adapter(trained(), tmp_path / "a.safetensors")
    resaved(path, rank="64")
    with pytest.raises(
        AdapterFileError, match=r"metadata field 'rank' is '64', but the layers say '4'"
    ):
        read_adapter(path)


def test_an_integer_adapter_tensor_is_refused_not_truncated(tmp_path) -> None:
    path = save_adapter(trained(), tmp_path / "a.safetensors")
    tensors = contents(path)[0]
    tensors["0.lora.B"] = (tensors["0.lora.B"] * 100).to(torch.int64)
    resaved(path, tensors=tensors)
    with pytest.raises(AdapterFileError, match=r"layer '0' holds a torch\.int64 tensor"):
        load_adapter(base(), path)


def test_deeply_nested_or_huge_metadata_is_refused_clearly(tmp_path) -> None:
    path = save_adapter(trained(), tmp_path / "a.safetensors")
    resaved(path, extra_modules="[" * 200_000)
    with pytest.raises(AdapterFileError, match="'extra_modules' (is nested too deeply|holds)"):
        read_adapter(path)
    resaved(path, extra_modules="[" + " " * 2_000_000 + "]")
    with pytest.raises(AdapterFileError, match="'extra_modules' holds 2,000,002 characters"):
        read_adapter(path)


def test_a_rank_above_a_layers_smaller_side_saves_and_loads(tmp_path) -> None:
    with pytest.warns(UserWarning, match="exceeds"):
        model = trained()  # rank 4 on the hidden layers; now the 3-class head too:
        replace_linear_with_lora(model, 8, 8, include="4")
    path = save_adapter(model, tmp_path / "a.safetensors")
    with pytest.warns(UserWarning, match=r"rank 8 exceeds .* = 3"):
        fresh = load_adapter(base(), path)
    assert torch.equal(fresh(X), model(X))
