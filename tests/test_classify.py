"""The classifier head, last-real-token pooling and classify_text."""

from __future__ import annotations

import pytest
import torch

from lora_tutorial import data, gpt
from lora_tutorial.classify import GPTClassifier, classify_text, pool


@pytest.fixture
def classifier() -> GPTClassifier:
    torch.manual_seed(0)
    return GPTClassifier(gpt.GPTModel("tiny")).eval()


def test_pool_reads_the_last_real_position() -> None:
    hidden = torch.arange(3 * 5 * 2, dtype=torch.float).view(3, 5, 2)
    lengths = torch.tensor([1, 5, 3])
    assert torch.equal(pool(hidden, lengths, "last_real"), hidden[[0, 1, 2], [0, 4, 2]])
    assert torch.equal(pool(hidden, lengths, "last"), hidden[:, 4])
    assert torch.equal(pool(hidden, None, "last_real"), hidden[:, 4])  # no lengths: no padding


@pytest.mark.parametrize("lengths", [[0, 2, 2], [1, 6, 2], [1, 2]])
def test_pool_rejects_impossible_lengths(lengths: list[int]) -> None:
    with pytest.raises(ValueError, match="lengths"):
        pool(torch.zeros(3, 5, 2), torch.tensor(lengths), "last_real")


def test_unknown_pooling_is_refused() -> None:
    with pytest.raises(ValueError, match="pooling='mean'"):
        GPTClassifier(gpt.GPTModel("tiny"), pooling="mean")


def test_head_replaces_the_language_model_head(classifier: GPTClassifier) -> None:
    head = classifier.gpt.out_head
    assert (head.in_features, head.out_features) == (64, 2)
    assert head.weight is not classifier.gpt.tok_emb.weight  # the tie to the embedding is gone


def test_head_is_built_where_the_backbone_lives() -> None:
    head = GPTClassifier(gpt.GPTModel("tiny").to(torch.float64)).gpt.out_head
    assert head.weight.dtype == torch.float64 and head.bias.dtype == torch.float64


@torch.no_grad()
def test_padded_batch_gives_each_message_its_own_logits(classifier: GPTClassifier) -> None:
    """With last-real pooling, padding changes nothing; with position -1 it does."""
    messages = [[10, 11, 12, 13, 14, 15], [20, 21], [30, 31, 32, 33]]
    alone = torch.cat([classifier(torch.tensor([ids])) for ids in messages])
    width = max(map(len, messages))
    batch = torch.tensor([ids + [data.PAD_TOKEN_ID] * (width - len(ids)) for ids in messages])
    lengths = torch.tensor([len(ids) for ids in messages])
    torch.testing.assert_close(classifier(batch, lengths), alone, rtol=1e-5, atol=1e-5)

    classifier.pooling = "last"
    naive = classifier(batch, lengths)
    torch.testing.assert_close(
        naive[0], alone[0], rtol=1e-5, atol=1e-5
    )  # the longest row has no padding
    assert not torch.allclose(naive[1:], alone[1:], atol=1e-4)  # the others read a padding token


def test_classify_text_matches_the_model(classifier: GPTClassifier, gpt2_tokenizer) -> None:
    text = "WINNER!! Call 09061701461 to claim your prize"
    label, probability = classify_text(classifier, gpt2_tokenizer, text)
    with torch.no_grad():
        probs = torch.softmax(classifier(torch.tensor([gpt2_tokenizer.encode(text)])), dim=-1)[0]
    assert label == data.LABELS[int(probs.argmax())]
    assert probability == pytest.approx(float(probs.max()), abs=1e-6)
    assert 0.5 <= probability <= 1.0


def test_classify_text_truncates_to_max_length(classifier: GPTClassifier, gpt2_tokenizer) -> None:
    text = "one two three four five six seven eight"
    first_three = gpt2_tokenizer.decode(gpt2_tokenizer.encode(text)[:3])
    label, probability = classify_text(classifier, gpt2_tokenizer, text, max_length=3)
    expected_label, expected_probability = classify_text(classifier, gpt2_tokenizer, first_three)
    assert label == expected_label and probability == pytest.approx(expected_probability, abs=1e-6)
    classifier.train()
    classify_text(classifier, gpt2_tokenizer, text)
    assert classifier.training  # the model's mode is restored


@pytest.mark.parametrize("max_length", [0, -1, 2.5, True])
def test_classify_text_refuses_impossible_max_length(
    classifier: GPTClassifier, gpt2_tokenizer, max_length: object
) -> None:
    with pytest.raises(ValueError, match=r"max_length=.*at least 1"):
        classify_text(classifier, gpt2_tokenizer, "hi there", max_length=max_length)  # type: ignore[arg-type]
