"""Tests of lora_tutorial.variants: chapter 7's one-layer playground."""

from __future__ import annotations

import torch

from lora_tutorial.lora import LinearWithLoRA
from lora_tutorial.variants import fit_random_update, fit_target, low_rank_task


def test_low_rank_task_is_seeded_and_its_change_decays_geometrically() -> None:
    base, target = low_rank_task(32, decay=0.9, seed=4)
    again, same = low_rank_task(32, decay=0.9, seed=4)
    assert torch.equal(base.weight, again.weight) and torch.equal(target, same)
    assert not base.weight.requires_grad
    singular = torch.linalg.svdvals(target - base.weight)
    torch.testing.assert_close(singular, 0.9 ** torch.arange(32.0), atol=1e-4, rtol=1e-4)


def test_fit_target_trains_only_the_adapter_towards_the_target() -> None:
    base, target = low_rank_task(16, seed=1)
    weight = base.weight.clone()
    torch.manual_seed(0)
    layer = LinearWithLoRA(base, 16, 16)
    losses = fit_target(layer, target, steps=60, lr=1e-2, seed=2)
    assert len(losses) == 60 and losses[-1] < 0.1 * losses[0]
    assert torch.equal(base.weight, weight)


def test_fit_random_update_is_seeded_and_rank_one_scalings_agree() -> None:
    plain = fit_random_update(1, use_rslora=False, dim=32, steps=20)
    rs = fit_random_update(1, use_rslora=True, dim=32, steps=20)
    assert plain == rs  # alpha / 1 == alpha / sqrt(1): the same run
    assert fit_random_update(1, use_rslora=False, dim=32, steps=20) == plain
    high_rank = fit_random_update(16, use_rslora=True, dim=32, steps=20)
    assert high_rank[-1] < high_rank[0]
    assert fit_random_update(16, use_rslora=False, dim=32, steps=20) != high_rank
