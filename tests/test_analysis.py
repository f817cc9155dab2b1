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


# ----------------------------------------------------------------------------- intruder dimensions


def test_an_unchanged_weight_has_no_intruder() -> None:
    W0 = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    assert analysis.intruder_dimensions(W0, W0.clone(), k=3) == 0
    assert float(analysis.max_cosines(W0, W0, k=3).min()) > 0.999


def test_intruders_appear_where_w0_has_no_direction() -> None:
    W0 = torch.diag(torch.tensor([5.0, 4.0, 3.0, 0.0]))[:, :3]  # (4, 3): output 4 is unused
    W0 = W0.double()
    U0 = torch.linalg.svd(W0, full_matrices=False)[0]  # 3 directions: e1, e2, e3
    assert U0.shape == (4, 3)
    new = torch.zeros(4, 3, dtype=torch.float64)
    new[3, 0] = 10.0  # a large singular value along e4, which W0 never uses
    assert analysis.intruder_dimensions(W0, W0 + new, k=1, eps=0.5) == 1
    assert analysis.intruder_dimensions(W0, W0 + 0.01 * new, k=1, eps=0.5) == 0
    counts = analysis.intruder_counts([analysis.WeightUpdate("layer", W0, new)], k=1)
    assert counts == {"layer": 1}


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.eye(3), torch.eye(4)), "one shape"),
        ((torch.eye(3), torch.eye(3), 4), "k=4"),
        ((torch.eye(3), torch.eye(3), 2, 0.0), "eps=0.0"),
    ],
)
def test_intruder_dimensions_refuses_bad_input(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        analysis.intruder_dimensions(*args)


def test_spearman_and_similarity_structure() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert analysis.spearman(x, x**3) == pytest.approx(1.0)
    assert analysis.spearman(x, -x) == pytest.approx(-1.0)
    assert analysis.spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == (
        pytest.approx(0.8660254)
    )  # ties share their mean rank (scipy.stats.spearmanr gives the same)
    g = torch.Generator().manual_seed(1)
    e = torch.randn(6, 5, generator=g)
    assert analysis.similarity_structure(e, 3 * e) == pytest.approx(1.0)  # length is ignored
    shuffled = analysis.similarity_structure(e, torch.randn(6, 5, generator=g))
    assert -1 <= shuffled < 0.9
    with pytest.raises(ValueError, match="same n"):
        analysis.similarity_structure(e, e[:4])
