"""Tests for lora_tutorial.lowrank: SVD helpers, Eckart-Young, parameter and memory arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_tutorial import counting, gpt, lora, lowrank

GPT2_SMALL = gpt.GPT_CONFIGS["gpt2-small"]


def _matrix(rows: int = 30, cols: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randn(
        rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def test_singular_values_are_sorted_and_match_numpy_convention():
    W = _matrix()
    s = lowrank.singular_values(W)
    assert s.shape == (20,)
    assert torch.all(s[:-1] >= s[1:])
    assert torch.allclose(s.square().sum(), W.square().sum())


def test_numerical_rank_of_a_product_is_its_inner_size():
    W = _matrix(30, 3) @ _matrix(3, 20, seed=1)
    assert lowrank.numerical_rank(W) == 3
    assert lowrank.numerical_rank(torch.zeros(4, 5)) == 0


@pytest.mark.parametrize("r", [0, 1, 5, 20])
def test_eckart_young_error_equals_tail_singular_values(r):
    W = _matrix()
    approx = lowrank.best_rank_r(W, r)
    s = lowrank.singular_values(W)
    assert lowrank.numerical_rank(approx) == r
    fro = torch.linalg.matrix_norm(W - approx).item()
    assert fro == pytest.approx(s[r:].square().sum().sqrt().item(), rel=1e-9, abs=1e-9)
    assert lowrank.rank_r_error(W, r) == pytest.approx(fro, rel=1e-9, abs=1e-9)
    spectral = torch.linalg.matrix_norm(W - approx, ord=2).item()
    assert lowrank.rank_r_error(W, r, norm="2") == pytest.approx(spectral, rel=1e-9, abs=1e-9)


def test_truncated_svd_beats_other_rank_r_matrices():
    W = _matrix()
    best = lowrank.rank_r_error(W, 4)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        other = torch.randn(30, 4, generator=g, dtype=W.dtype) @ torch.randn(
            4, 20, generator=g, dtype=W.dtype
        )
        scale = (other * W).sum() / other.square().sum()  # best multiple of that rank-4 matrix
        assert torch.linalg.matrix_norm(W - scale * other).item() > best


def test_low_rank_factors_have_lora_shapes_and_reproduce_the_approximation():
    W = _matrix()  # (out_dim, in_dim) = (30, 20), like nn.Linear(20, 30).weight
    A, B = lowrank.low_rank_factors(W, 5)
    assert A.shape == (20, 5) and B.shape == (5, 30)  # appendix E's layout, as in lora.py
    assert torch.allclose((A @ B).T, lowrank.best_rank_r(W, 5))
    x = torch.randn(3, 20, dtype=W.dtype)
    assert torch.allclose(x @ A @ B, x @ lowrank.best_rank_r(W, 5).T)  # the update of a LoRA layer
    assert torch.allclose(lowrank.best_rank_r(W, 20), W)


def test_energy_and_rank_for_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert lowrank.energy_captured(s, 1) == pytest.approx(9 / 14)
    assert lowrank.energy_captured(s, 3) == pytest.approx(1.0)
    assert lowrank.energy_captured(s, 0) == 0.0
    assert lowrank.rank_for_energy(s, 9 / 14) == 1
    assert lowrank.rank_for_energy(s, 0.9) == 2
    assert lowrank.rank_for_energy(s, 1.0) == 3
    with pytest.raises(ValueError, match="fraction"):
        lowrank.rank_for_energy(s, 1.5)
    with pytest.raises(ValueError, match="zero"):
        lowrank.energy_captured(torch.zeros(3), 1)


def test_random_like_has_same_shape_and_norm_but_flat_spectrum():
    W = lowrank.best_rank_r(_matrix(64, 64), 2)
    R = lowrank.random_like(W)
    assert R.shape == W.shape
    assert torch.linalg.matrix_norm(R).item() == pytest.approx(torch.linalg.matrix_norm(W).item())
    assert lowrank.energy_captured(lowrank.singular_values(W), 2) == pytest.approx(1.0)
    assert lowrank.energy_captured(lowrank.singular_values(R), 2) < 0.2


def test_bad_matrix_and_rank_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="2-D"):
        lowrank.singular_values(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        lowrank.singular_values([[1.0, 2.0]])
    with pytest.raises(ValueError, match="at most 20"):
        lowrank.best_rank_r(_matrix(), 21)
    with pytest.raises(ValueError, match="non-negative integer"):
        lowrank.best_rank_r(_matrix(), 2.5)
    with pytest.raises(ValueError, match="non-negative integer"):
        lowrank.rank_r_error(_matrix(), -1)
    with pytest.raises(ValueError, match="norm"):
        lowrank.rank_r_error(_matrix(), 2, norm="nuclear")


def test_parameter_counts():
    assert counting.full_param_count(768, 768) == 589_824
    assert counting.lora_param_count(768, 768, 8) == 8 * 1536
    assert counting.lora_param_count(768, 3072, 16) == 61_440
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        counting.lora_param_count(768, 768, 0)
    with pytest.raises(ValueError, match="in_dim"):
        counting.full_param_count(-1, 3)


def test_gpt2_small_counts_match_the_published_figures():
    # GPT-2 small without query/key/value biases and an untied vocabulary head: 163,009,536
    # (LLMs-from-scratch, chapter 4); with those biases (as the released weights have) and a
    # 2-class head: 124,441,346, and rank-16 LoRA on every Linear: 2,666,528 (appendix E).
    assert (
        counting.gpt_param_count({**GPT2_SMALL, "qkv_bias": False}, tied_head=False) == 163_009_536
    )
    assert counting.gpt_param_count(GPT2_SMALL) == 124_439_808  # tied head: the published "124M"
    assert counting.gpt_param_count(GPT2_SMALL, num_classes=2) == 124_441_346
    shapes = counting.gpt_linear_shapes(GPT2_SMALL, num_classes=2)
    assert len(shapes) == 12 * 6 + 1
    assert counting.lora_params_for(shapes, 16) == 2_666_528
    qv = counting.lora_params_for(shapes, 4, select=lambda n: n.endswith(("W_query", "W_value")))
    assert qv == 12 * 2 * 4 * (768 + 768)


def test_gpt_counts_match_a_built_model():
    cfg = dict(gpt.GPT_CONFIGS["tiny"])
    model = gpt.GPTModel(cfg)
    assert counting.gpt_param_count(cfg) == lora.count_parameters(model).total
    built = {
        n: (m.in_features, m.out_features, m.bias is not None)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }
    assert built == {s.name: (s.in_dim, s.out_dim, s.bias) for s in counting.gpt_linear_shapes(cfg)}
    model.out_head = nn.Linear(cfg["emb_dim"], 2)
    assert counting.gpt_param_count(cfg, num_classes=2) == lora.count_parameters(model).total


def test_bytes_arithmetic():
    assert counting.bytes_per_param(torch.float32) == 4
    assert counting.bytes_per_param("bfloat16") == 2
    assert counting.adapter_bytes(1000, "bf16") == 2000
    assert counting.adamw_state_bytes(10) == 80
    state = counting.training_state_bytes(100, 10)
    assert (state.weights, state.grads, state.optimizer, state.total) == (400, 40, 80, 520)
    with pytest.raises(ValueError, match="unknown dtype name 'fp8'"):
        counting.bytes_per_param("fp8")
    with pytest.raises(ValueError, match="n_trainable"):
        counting.training_state_bytes(10, 11)
    assert counting.megabytes(2_000_000) == 2.0 and counting.gigabytes(3e9) == 3.0
