"""Memory estimates for real models agree with the published counts and the QLoRA paper's checks."""

from __future__ import annotations

import pytest

from lora_tutorial import counting


def test_llama_7b_has_its_published_parameter_count() -> None:
    total, linear = counting.llama_param_count(counting.LLAMA_CONFIGS["llama-7b"])
    assert total == 6_738_415_616  # LLaMA-7B's parameter count
    assert linear == 32 * (4 * 4096**2 + 3 * 4096 * 11008)


def test_double_quantisation_costs_4_127_bits() -> None:
    assert abs(counting.NF4_DQ_BITS - 4.127) < 5e-4


def test_qlora_paper_checks_for_65b() -> None:
    cfg = counting.LLAMA_CONFIGS["llama-65b"]
    full, lora, qlora = (counting.finetuning_memory(cfg, m) for m in counting.SIZING_METHODS)
    assert full.total > 780e9  # "more than 780 GB of GPU memory" for 16-bit fine-tuning
    assert qlora.total < 48e9  # fits one 48 GB GPU
    assert qlora.total < lora.total < full.total
    assert full.total == pytest.approx(12 * full.params)


def test_lora_counts_rank_64_on_every_linear_layer() -> None:
    est = counting.finetuning_memory(counting.LLAMA_CONFIGS["llama-7b"], "lora", rank=64)
    assert est.trainable == 32 * 64 * (4 * 2 * 4096 + 3 * (4096 + 11008))
    assert est.optimizer == 8 * est.trainable  # two float32 moments
    assert counting.finetuning_memory(
        counting.LLAMA_CONFIGS["llama-7b"], "lora", rank=8
    ).trainable == (est.trainable // 8)


def test_unknown_method_is_named() -> None:
    with pytest.raises(ValueError, match="not one of"):
        counting.finetuning_memory(counting.LLAMA_CONFIGS["llama-7b"], "qlora4")
