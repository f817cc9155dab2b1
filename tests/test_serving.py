"""Serving many adapters: the batched multi-adapter forward pass equals each adapter on its own."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import SMALL_GPT

from lora_tutorial import lora, serving
from lora_tutorial.classify import GPTClassifier
from lora_tutorial.gpt import GPTModel
from lora_tutorial.variants import LinearWithDoRA

CFG = SMALL_GPT
HEAD = "gpt.out_head"


def base_model() -> GPTClassifier:
    torch.manual_seed(0)
    return GPTClassifier(GPTModel(CFG)).eval()


def adapted_copy(base: GPTClassifier, rank: int, include: list[str], seed: int) -> GPTClassifier:
    """A copy of ``base`` with LoRA on ``include`` and random (trained-looking) factors and head."""
    model = copy.deepcopy(base)
    lora.replace_linear_with_lora(model, rank, 2 * rank, include=include, exclude=HEAD)
    lora.mark_only_lora_as_trainable(model, HEAD)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.fixture
def setup() -> tuple[GPTClassifier, list[GPTClassifier], torch.Tensor, torch.Tensor]:
    base = base_model()
    adapted = [
        adapted_copy(base, 4, ["W_query", "W_value"], seed=1),
        adapted_copy(base, 2, ["W_query", "W_key", "W_value", "out_proj"], seed=2),
        adapted_copy(base, 8, ["ff.layers.0", "ff.layers.2"], seed=3),
    ]
    g = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, CFG["vocab_size"], (7, 10), generator=g)
    lengths = torch.tensor([10, 3, 7, 10, 1, 5, 9])
    return base, adapted, input_ids, lengths


def per_row(adapted, input_ids, lengths, ids) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [adapted[k](input_ids[i : i + 1], lengths[i : i + 1]) for i, k in enumerate(ids)]
        )


def test_each_row_gets_its_own_adapter(setup) -> None:
    base, adapted, input_ids, lengths = setup
    ids = [0, 2, 1, 1, 0, 2, 2]
    served = serving.MultiAdapterModel(base, adapted, extra_modules=HEAD)
    with torch.no_grad():
        out = served(input_ids, lengths, adapter_ids=ids)
    expected = per_row(adapted, input_ids, lengths, ids)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # the rows really differ by adapter: another adapter gives another answer
    assert not torch.allclose(out[0], per_row(adapted, input_ids[:1], lengths[:1], [1])[0])


def test_alternatives_agree_and_leave_the_models_as_they_were(setup) -> None:
    _, adapted, input_ids, lengths = setup
    ids = [2, 2, 0, 1, 0, 1, 2]
    expected = per_row(adapted, input_ids, lengths, ids)
    before = [copy.deepcopy(m.state_dict()) for m in adapted]
    merged = serving.forward_merging_per_request(adapted, input_ids, lengths, adapter_ids=ids)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    copies = serving.merged_copies(adapted)
    assert not lora.adapter_layers(copies[0])
    per_task = serving.forward_per_task_models(copies, input_ids, lengths, adapter_ids=ids)
    torch.testing.assert_close(per_task, expected, atol=1e-5, rtol=1e-5)
    for model, state in zip(adapted, before, strict=True):
        assert not any(layer.merged for layer in lora.adapter_layers(model).values())
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, state[key], atol=1e-6, rtol=0)


def test_base_model_is_not_changed(setup) -> None:
    base, adapted, _, _ = setup
    state = copy.deepcopy(base.state_dict())
    serving.MultiAdapterModel(base, adapted, extra_modules=HEAD)
    assert not lora.adapter_layers(base)
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())


def test_multi_lora_delta_matches_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 5, 2, generator=g), torch.randn(3, 2, 4, generator=g)
    x, ids = torch.randn(4, 6, 5, generator=g), torch.tensor([2, 0, 0, 1])
    expected = torch.stack([x[i] @ A[k] @ B[k] for i, k in enumerate(ids.tolist())])
    torch.testing.assert_close(serving.multi_lora_delta(x, A, B, ids), expected)


def test_bad_inputs_are_explained(setup) -> None:
    base, adapted, input_ids, lengths = setup
    served = serving.MultiAdapterModel(base, adapted, extra_modules=HEAD)
    with pytest.raises(ValueError, match=r"adapter_ids must lie in 0\.\.2"):
        served(input_ids, lengths, adapter_ids=[0, 1, 2, 3, 0, 0, 0])
    with pytest.raises(ValueError, match="one adapter index per row"):
        served(input_ids, lengths, adapter_ids=[0, 1])
    other_base = copy.deepcopy(base)
    with torch.no_grad():
        other_base.gpt.trf_blocks[0].norm1.weight.add_(1.0)
    with pytest.raises(ValueError, match="same frozen base"):
        serving.MultiAdapterModel(other_base, adapted, extra_modules=HEAD)
    with pytest.raises(ValueError, match="same frozen base"):  # the heads differ: name them
        serving.MultiAdapterModel(base, adapted)
    lora.merge_lora(adapted[0])
    with pytest.raises(ValueError, match="is merged"):
        serving.MultiAdapterModel(base, adapted, extra_modules=HEAD)
    dora = copy.deepcopy(base)
    lora.replace_linear_with_lora(dora, 2, 4, include="W_query", wrapper=LinearWithDoRA)
    with pytest.raises(TypeError, match="LinearWithLoRA"):
        serving.MultiAdapterModel(base, [dora])


@pytest.mark.parametrize("ids", [[0.2] * 7, [1.9] * 7, [True] * 7, [-1] * 7, torch.ones(7)])
def test_adapter_ids_must_be_whole_numbers_in_range(setup, ids) -> None:
    base, adapted, input_ids, lengths = setup
    served = serving.MultiAdapterModel(base, adapted, extra_modules=HEAD)
    merged = serving.merged_copies(adapted)
    with pytest.raises(
        ValueError, match=r"adapter_ids must (be one whole number|hold integers|lie)"
    ):
        served(input_ids, lengths, adapter_ids=ids)
    with pytest.raises(ValueError, match=r"adapter_ids must"):
        serving.forward_merging_per_request(adapted, input_ids, lengths, adapter_ids=ids)
    with pytest.raises(ValueError, match=r"adapter_ids must"):
        serving.forward_per_task_models(merged, input_ids, lengths, adapter_ids=ids)


def test_an_empty_batch_is_explained(setup) -> None:
    base, adapted, input_ids, lengths = setup
    served = serving.MultiAdapterModel(base, adapted, extra_modules=HEAD)
    for call in (
        lambda: served(input_ids[:0], lengths[:0], adapter_ids=[]),
        lambda: serving.forward_merging_per_request(adapted, input_ids[:0], adapter_ids=[]),
        lambda: serving.forward_per_task_models(adapted, input_ids[:0], adapter_ids=[]),
    ):
        with pytest.raises(ValueError, match="adapter_ids is empty"):
            call()


def test_a_nan_adapter_is_refused_as_merge_refuses_it(setup) -> None:
    base, adapted, _, _ = setup
    with torch.no_grad():
        lora.adapter_layers(adapted[1])["gpt.trf_blocks.0.att.W_key"].lora.B[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"adapted\[1\]\.gpt\.trf_blocks\.0\.att\.W_key: .*NaN"):
        serving.MultiAdapterModel(base, adapted, extra_modules=HEAD)


def test_heads_of_two_and_three_classes_are_served_apart(setup) -> None:
    base, adapted, input_ids, lengths = setup
    three = copy.deepcopy(adapted[0])
    three.gpt.out_head = torch.nn.Linear(CFG["emb_dim"], 3)
    with pytest.raises(
        ValueError, match=r"'gpt\.out_head' has different shapes .*\[\(2, 16\), \(3, 16\)\]"
    ):
        serving.MultiAdapterModel(base, [adapted[0], three], extra_modules=HEAD)
    three_base = GPTClassifier(copy.deepcopy(base.gpt), num_classes=3).eval()
    threes = [adapted_copy(three_base, 2, ["W_query"], seed=s) for s in (1, 2)]
    served = serving.MultiAdapterModel(three_base, threes, extra_modules=HEAD)
    with torch.no_grad():
        out = served(input_ids, lengths, adapter_ids=[0, 1, 1, 0, 0, 1, 0])
    assert out.shape == (7, 3)
    torch.testing.assert_close(out, per_row(threes, input_ids, lengths, [0, 1, 1, 0, 0, 1, 0]))


@pytest.mark.parametrize(("warm_up", "calls"), [(True, 4), (False, 3)])
def test_time_interleaved_alternates_the_functions_and_takes_medians(
    warm_up: bool, calls: int
) -> None:
    order: list[str] = []
    fns = {name: (lambda name=name: order.append(name)) for name in ("a", "b")}
    seconds = serving.time_interleaved(fns, rounds=3, warm_up=warm_up)
    assert order == ["a", "b"] * calls
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())
    with pytest.raises(ValueError, match="at least one round"):
        serving.time_interleaved(fns, rounds=0)
