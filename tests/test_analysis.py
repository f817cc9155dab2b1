"""What fine-tuning changed: language-model loss through a given head, and ΔW's directions."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lora_tutorial import analysis, lora
from lora_tutorial.gpt import GPTModel

CFG = {
    "vocab_size": 50,
    "context_length": 16,
    "emb_dim": 16,
    "n_heads": 2,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
}


def test_language_model_loss_is_the_mean_over_real_tokens() -> None:
    torch.manual_seed(0)
    model = GPTModel(CFG).eval()
    texts = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11]]
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in texts:
            logits = model(torch.tensor([ids]))[0]
            total += F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
            count += len(ids) - 1
    loss = analysis.language_model_loss(model, model.tok_emb.weight, texts, batch_size=2)
    assert loss == pytest.approx(total / count, rel=1e-5)
    # another head gives another loss: the head is really the one passed in
    other = analysis.language_model_loss(model, torch.randn(50, 16), texts)
    assert other != pytest.approx(loss, rel=1e-3)
    with pytest.raises(ValueError, match="two tokens"):
        analysis.language_model_loss(model, model.tok_emb.weight, [[1], []])


def test_weight_updates_of_lora_and_of_full_fine_tuning() -> None:
    torch.manual_seed(0)
    base = GPTModel(CFG)
    adapted = lora.replace_linear_with_lora(copy.deepcopy(base), 2, 4, include="W_value")
    layer = adapted.trf_blocks[1].att.W_value
    torch.nn.init.normal_(layer.lora.B)
    updates = analysis.weight_updates(adapted)
    assert [u.name for u in updates] == ["trf_blocks.0.att.W_value", "trf_blocks.1.att.W_value"]
    torch.testing.assert_close(updates[1].delta, layer.delta_weight().detach())
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.trf_blocks[0].ff.layers[0].weight.add_(0.5)
    full = analysis.weight_updates(tuned, base, include=["ff.layers.0"])
    assert [u.name for u in full] == ["trf_blocks.0.ff.layers.0", "trf_blocks.1.ff.layers.0"]
    assert torch.allclose(full[0].delta, torch.full_like(full[0].delta, 0.5))
    assert not full[1].delta.any()
    with pytest.raises(ValueError, match="without base"):
        analysis.weight_updates(adapted, base)


def test_amplification_of_a_direction_w0_hardly_uses() -> None:
    W0 = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.1]))
    delta = torch.zeros(4, 4)
    delta[3, 3] = 2.0  # ΔW lives where W0 is weakest
    amp = analysis.subspace_amplification(analysis.WeightUpdate("w", W0, delta), 1)
    assert amp.w0_in_delta_directions == pytest.approx(0.1)
    assert amp.w0_in_own_directions == pytest.approx(10.0)
    assert amp.factor == pytest.approx(20.0)
    assert 0 < amp.w0_in_random_directions < 10.0
