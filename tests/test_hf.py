"""Our GPT-2 weights run unchanged in transformers; PEFT counts what we count on the same layers."""

from __future__ import annotations

import pytest
import torch

from lora_tutorial import hf, lora
from lora_tutorial.gpt import GPTModel

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CFG = {
    "vocab_size": 80,
    "context_length": 16,
    "emb_dim": 32,
    "n_heads": 4,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
}


def hf_model() -> torch.nn.Module:
    return transformers.GPT2Model(transformers.GPT2Config(**hf.gpt2_config_kwargs(CFG))).eval()


def test_weights_give_the_same_hidden_states_in_transformers() -> None:
    torch.manual_seed(0)
    ours = GPTModel(CFG).eval()
    theirs = hf_model()
    theirs.load_state_dict(hf.to_hf_state_dict(ours))
    ids = torch.randint(0, CFG["vocab_size"], (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(ids).last_hidden_state, ours.hidden_states(ids), atol=1e-5, rtol=1e-5
        )


def test_adapted_models_are_refused() -> None:
    model = lora.replace_linear_with_lora(GPTModel(CFG), 2, 4, include="W_query")
    with pytest.raises(ValueError, match="adapter layers"):
        hf.to_hf_state_dict(model)
    with pytest.raises(ValueError, match="qkv_bias"):
        hf.gpt2_config_kwargs({**CFG, "qkv_bias": False})


def test_peft_targets_and_counts_match_ours() -> None:
    assert hf.peft_target_modules(["W_query", "W_value", "out_proj"]) == [
        "attn.c_attn",
        "attn.c_proj",
    ]
    with pytest.raises(ValueError, match="no GPT-2 module"):
        hf.peft_target_modules(["norm1"])
    same = ("out_proj", "ff.layers.0", "ff.layers.2")
    ours = lora.replace_linear_with_lora(GPTModel(CFG), 4, 8, include=list(same))
    lora.mark_only_lora_as_trainable(ours)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=hf.peft_target_modules(same))
    theirs = peft.get_peft_model(hf_model(), config)
    assert theirs.get_nb_trainable_parameters()[0] == lora.count_parameters(ours).trainable


def test_a_transformers_classifier_trains_and_evaluates_like_ours() -> None:
    from torch.utils.data import DataLoader

    from lora_tutorial import sweeps, train

    torch.manual_seed(0)
    config = transformers.GPT2Config(**hf.gpt2_config_kwargs(CFG), num_labels=2, pad_token_id=0)
    net = transformers.GPT2ForSequenceClassification(config)
    ids = torch.randint(1, CFG["vocab_size"], (16, 6))
    ids[::2, 4:] = 0  # right padding: the last real token is read, as in GPTClassifier
    labels = (ids[:, 0] % 2).long()
    rows = [(ids[i], labels[i], torch.tensor(6)) for i in range(16)]
    loader = DataLoader(rows, batch_size=4)
    model = hf.TransformersClassifier(net)
    with torch.no_grad():
        expected = net(input_ids=ids).logits.argmax(-1)
    assert train.evaluate(model, loader).accuracy == (expected == labels).float().mean().item()
    counter = sweeps.CountingAdamW(1e-3)
    train.train_classifier(
        model, loader, loader, epochs=2, progress=False, make_optimizer=counter, eval_every=100
    )
    assert counter.steps == 2 * len(loader)
