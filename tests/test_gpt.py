"""lora_tutorial.gpt: our GPT-2 must reproduce transformers' GPT-2 from the same weights."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_tutorial import gpt
from lora_tutorial.gpt import (
    GPTModel,
    generate,
    load_hf_state_dict,
    text_to_token_ids,
    token_ids_to_text,
)
from lora_tutorial.runtime import config, download

transformers = pytest.importorskip("transformers")

SMALL_HF = dict(vocab_size=300, n_positions=32, n_embd=48, n_layer=2, n_head=4)
SMALL_OURS = dict(
    vocab_size=300,
    context_length=32,
    emb_dim=48,
    n_layers=2,
    n_heads=4,
    drop_rate=0.0,
    qkv_bias=True,
)


def _hf_model(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**kwargs, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg).eval()


def _as_published_file(hf_model: nn.Module) -> dict[str, torch.Tensor]:
    """The layout of the published model.safetensors: no prefix, no lm_head, causal-mask buffers."""
    sd = {
        k.removeprefix("transformer."): v.contiguous()
        for k, v in hf_model.state_dict().items()
        if k != "lm_head.weight"
    }
    n = hf_model.config.n_positions
    for i in range(hf_model.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    return sd


def _max_logit_gap(ours: GPTModel, hf_model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(ids) - hf_model(ids).logits).abs().max().item()


def _serve(http_server, monkeypatch, hf_model: nn.Module, name: str) -> None:
    """Publish ``hf_model`` as ``name.safetensors`` on the loopback server, registered as known."""
    path = http_server.root / f"{name}.safetensors"
    save_file(_as_published_file(hf_model), str(path))
    data = path.read_bytes()
    remote = download.RemoteFile(
        f"https://example.org/{path.name}", path.name, len(data), hashlib.sha256(data).hexdigest()
    )
    monkeypatch.setitem(download.KNOWN_FILES, name, remote)
    monkeypatch.setenv(download.MIRROR_ENV, http_server.base_url)


def test_fetched_safetensors_reproduce_transformers_logits(http_server, monkeypatch) -> None:
    hf_model = _hf_model(**SMALL_HF)
    _serve(http_server, monkeypatch, hf_model, "test-gpt")

    local = download.fetch("test-gpt", progress=False)
    ours = load_hf_state_dict(GPTModel(SMALL_OURS), load_file(local)).eval()

    ids = torch.randint(
        0, SMALL_HF["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1)
    )
    assert _max_logit_gap(ours, hf_model, ids) < 1e-5
    assert (
        _max_logit_gap(GPTModel(SMALL_OURS).eval(), hf_model, ids) > 1e-3
    )  # a fresh model really differs


def test_load_gpt2_fetches_and_returns_eval_model(http_server, monkeypatch) -> None:
    hf_model = _hf_model(**SMALL_HF)
    _serve(http_server, monkeypatch, hf_model, "test-gpt")
    monkeypatch.setitem(gpt.GPT_CONFIGS, "test-gpt", SMALL_OURS)

    model = gpt.load_gpt2("test-gpt", progress=False)
    assert not model.training
    assert _max_logit_gap(model, hf_model, torch.arange(10).unsqueeze(0)) < 1e-5
    with pytest.raises(ValueError, match="no pretrained weights for 'tiny'"):
        gpt.load_gpt2("tiny")


def test_gpt2_small_shapes_match_transformers(http_server, monkeypatch) -> None:
    hf_model = _hf_model()  # GPT2Config() defaults are gpt2-small's shapes
    ours = GPTModel("gpt2-small")
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(ours) == count(hf_model)

    _serve(http_server, monkeypatch, hf_model, "test-gpt2-small")
    load_hf_state_dict(ours, load_file(download.fetch("test-gpt2-small", progress=False)))
    ours.eval()
    ids = torch.tensor([[15496, 11, 995, 13, 314, 716, 257, 3303]])
    assert _max_logit_gap(ours, hf_model, ids) < 1e-5


def test_prefixed_keys_and_lm_head_are_accepted() -> None:
    hf_model = _hf_model(**SMALL_HF)
    assert any(key.startswith("transformer.") for key in hf_model.state_dict())
    ours = load_hf_state_dict(GPTModel(SMALL_OURS), hf_model.state_dict()).eval()
    assert _max_logit_gap(ours, hf_model, torch.arange(20).unsqueeze(0)) < 1e-5


def test_structure_uses_linear_layers_and_tied_head() -> None:
    model = GPTModel("tiny")
    block = model.trf_blocks[0]
    att, ff = block.att, block.ff
    for layer in (
        att.W_query,
        att.W_key,
        att.W_value,
        att.out_proj,
        ff.layers[0],
        ff.layers[2],
        model.out_head,
    ):
        assert type(layer) is nn.Linear
    assert isinstance(model.final_norm, nn.LayerNorm) and len(model.trf_blocks) == 2
    assert model.out_head.weight is model.tok_emb.weight
    ids = torch.randint(0, 50257, (3, 7))
    assert model.hidden_states(ids).shape == (3, 7, 64)
    assert model(ids).shape == (3, 7, 50257)


def test_attention_is_causal() -> None:
    model = GPTModel(SMALL_OURS).eval()
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 300
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_dropout_only_in_training() -> None:
    model = GPTModel({**SMALL_OURS, "drop_rate": 0.5})
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        assert not torch.equal(model(ids), model(ids))
        model.eval()
        assert torch.equal(model(ids), model(ids))


def test_bad_config_and_too_long_input_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown GPT preset 'gpt5'"):
        GPTModel("gpt5")
    with pytest.raises(ValueError, match="missing"):
        GPTModel({"emb_dim": 64})
    with pytest.raises(ValueError, match="divisible"):
        GPTModel({**SMALL_OURS, "n_heads": 5})
    with pytest.raises(ValueError, match="context_length=32"):
        GPTModel(SMALL_OURS)(torch.zeros(1, 33, dtype=torch.long))


@pytest.fixture(scope="module")
def published_small() -> dict[str, torch.Tensor]:
    return _as_published_file(_hf_model(**SMALL_HF))


def test_missing_key_is_named(published_small) -> None:
    sd = dict(published_small)
    del sd["h.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"missing key 'h\.1\.mlp\.c_fc\.bias'"):
        load_hf_state_dict(GPTModel(SMALL_OURS), sd)


def test_unexpected_key_is_named(published_small) -> None:
    sd = {**published_small, "h.0.attn.rotary.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"unexpected key 'h\.0\.attn\.rotary\.weight'"):
        load_hf_state_dict(GPTModel(SMALL_OURS), sd)
    with pytest.raises(
        ValueError, match=r"unexpected key 'h\.0\.attn\.c_attn\.bias'.*qkv_bias=False"
    ):
        load_hf_state_dict(GPTModel({**SMALL_OURS, "qkv_bias": False}), published_small)


def test_wrong_shape_is_named(published_small) -> None:
    sd = {**published_small, "wpe.weight": torch.zeros(16, 48)}
    with pytest.raises(
        ValueError, match=r"'wpe\.weight' has shape \(16, 48\), expected \(32, 48\)"
    ):
        load_hf_state_dict(GPTModel(SMALL_OURS), sd)
    sd = {
        **published_small,
        "h.0.attn.c_attn.weight": published_small["h.0.attn.c_attn.weight"].t(),
    }
    with pytest.raises(
        ValueError,
        match=r"'h\.0\.attn\.c_attn\.weight' has shape \(144, 48\), expected \(48, 144\)",
    ):
        load_hf_state_dict(GPTModel(SMALL_OURS), sd)


def test_tokenizer_round_trip(gpt2_tokenizer) -> None:
    ids = text_to_token_ids("Hello, world", gpt2_tokenizer)
    assert ids.tolist() == [[15496, 11, 995]]
    assert token_ids_to_text(ids, gpt2_tokenizer) == "Hello, world"
    assert text_to_token_ids("<|endoftext|>", gpt2_tokenizer).tolist() == [[50256]]


def test_get_tokenizer_works_offline(data_dir) -> None:
    assert gpt.get_tokenizer().encode("Hello, world") == [15496, 11, 995]


def test_greedy_generation_is_deterministic() -> None:
    torch.manual_seed(0)
    model = GPTModel(SMALL_OURS)
    model.train()  # generate() must switch dropout off itself and restore the mode
    prompt = torch.tensor([[1, 2, 3]])
    first = generate(model, prompt, max_new_tokens=6)
    assert model.training
    assert first.shape == (1, 9) and torch.equal(first[:, :3], prompt)
    assert torch.equal(first, generate(model, prompt, max_new_tokens=6))
    with torch.no_grad():
        model.eval()
        assert first[0, 3].item() == model(prompt)[0, -1].argmax().item()
    # top_k=1 sampling can only pick the greedy token
    assert torch.equal(first, generate(model, prompt, max_new_tokens=6, temperature=1.0, top_k=1))
    # stops at eos_id
    assert generate(model, prompt, max_new_tokens=6, eos_id=first[0, 3].item()).shape == (1, 4)


def test_generation_crops_to_context_length() -> None:
    model = GPTModel({**SMALL_OURS, "context_length": 8}).eval()
    prompt = torch.arange(1, 11).unsqueeze(0)  # 10 tokens > context 8
    out = generate(model, prompt, max_new_tokens=3)
    assert out.shape == (1, 13)
    with torch.no_grad():
        assert out[0, 10].item() == model(prompt[:, -8:])[0, -1].argmax().item()
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt, 1, temperature=-1.0)


def test_rehearsal_builds_gpt2_with_random_weights_and_downloads_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("rehearsal mode must not download")

    monkeypatch.delenv(config.QUICK_ENV, raising=False)
    monkeypatch.setenv(config.REHEARSAL_ENV, "1")
    monkeypatch.setattr(download, "fetch", no_download)
    model = gpt.load_gpt2("gpt2-small")
    assert type(model) is GPTModel and model.cfg == gpt.GPT_CONFIGS["gpt2-small"]
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == 124_439_808  # GPT-2 small's "124M"
    (line,) = capsys.readouterr().out.splitlines()
    assert "REHEARSAL" in line and "124,439,808" in line and "random weights" in line
    with pytest.raises(ValueError, match="no pretrained weights for 'tiny'"):
        gpt.load_gpt2("tiny")
    # Like a checkpoint, the random weights are drawn once: every call returns a copy of them.
    again = gpt.load_gpt2("gpt2-small")
    assert again is not model and torch.equal(again.tok_emb.weight, model.tok_emb.weight)
    assert again.out_head.weight is again.tok_emb.weight  # the copy keeps the tied head
    with torch.no_grad():
        model.trf_blocks[0].att.W_query.weight.zero_()
    assert gpt.load_gpt2("gpt2-small").trf_blocks[0].att.W_query.weight.abs().sum() > 0


def test_eval_mode_switches_dropout_and_gradients_off_and_restores_the_mode() -> None:
    model = GPTModel(SMALL_OURS).train()
    with gpt.eval_mode(model):
        assert not model.training and not torch.is_grad_enabled()
    assert model.training and torch.is_grad_enabled()
    with pytest.raises(RuntimeError), gpt.eval_mode(model):
        raise RuntimeError("inside")
    assert model.training
