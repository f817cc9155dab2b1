"""Measuring memory and time: peak memory, a measured training step, projections and run records."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lora_tutorial import counting, lora
from lora_tutorial.runtime import config, rehearsal


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))


def test_measured_state_bytes_match_the_prediction_after_a_step():
    model = _small_model()
    model[0].weight.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    x = torch.randn(8, 16)
    m = counting.measure_training_step(model, lambda net: net(x).square().mean(), opt, repeats=2)
    n_total, n_trainable = lora.count_parameters(model)
    assert n_trainable == sum(p.numel() for p in trainable)
    assert m.state == counting.training_state_bytes(n_total, n_trainable)
    assert m.seconds > 0 and m.device_peak_bytes is None
    assert m.activation_bytes > 0


def test_saved_activations_grow_with_the_batch_and_exclude_parameters():
    model = _small_model()
    counts = []
    for batch in (4, 40):
        with counting.count_saved_activations(model) as saved:
            model(torch.randn(batch, 16)).sum()
        counts.append(saved["bytes"])
    # Parameters (16*32 + 32*4 weights) would be counted in both; activations scale with the batch.
    assert counts[1] == 10 * counts[0]
    with counting.count_saved_activations(model) as saved, torch.no_grad():
        model(torch.randn(4, 16))
    assert saved["bytes"] == 0


def test_measure_training_step_needs_a_timed_step():
    model = _small_model()
    with pytest.raises(ValueError, match="repeats"):
        counting.measure_training_step(
            model,
            lambda n: n(torch.randn(2, 16)).sum(),
            torch.optim.SGD(model.parameters(), 0.1),
            repeats=1,
        )


PEAK_MEMORY_PROBE = """
import torch
from lora_tutorial import counting
from lora_tutorial.runtime import rehearsal
size = 200 * 2**20
with counting.PeakMemory(torch.device("cpu")) as peak:
    start = counting._rss_bytes()
    block = torch.ones(size // 4)  # written, so resident
print(peak.peak_bytes - start, rehearsal.peak_rss_bytes() - start)
"""


def test_peak_memory_sees_a_large_allocation() -> None:
    """In a fresh process, so that no freed memory the allocator kept can hide the allocation."""
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_PROBE], capture_output=True, text=True, check=True
    )
    sampled, high_water = (int(n) for n in result.stdout.split())
    assert sampled >= 0.9 * 200 * 2**20
    assert high_water >= 0.9 * 200 * 2**20  # getrusage's peak, as the run records report it


def test_median_step_time_leaves_out_the_warm_up_step() -> None:
    assert rehearsal.median_step_seconds([9.0, 1.0, 3.0, 2.0]) == 2.0
    assert rehearsal.median_step_seconds([9.0, 1.0]) == 1.0
    assert rehearsal.median_step_seconds([4.0]) == 4.0
    assert rehearsal.median_step_seconds([]) == 0.0


def test_projection_is_step_time_times_steps_plus_evaluation_time() -> None:
    p = rehearsal.Projection(
        steps_done=2,
        full_steps=1000,
        median_step_seconds=0.5,
        eval_batches_done=4,
        full_eval_batches=300,
        eval_seconds_per_batch=0.1,
    )
    assert p.projected_full_seconds == pytest.approx(1000 * 0.5 + 300 * 0.1)


@pytest.mark.parametrize(
    ("max_steps", "expected"),
    [
        # 3 epochs of 10 steps, a loss record every 4 steps (7 records, 2 batches each) and
        # accuracies after each epoch (5 batches): 30 steps, 7 * 2 + 3 * 5 evaluation batches.
        (None, (30, 7 * 2 + 3 * 5)),
        # stopped at step 14: records at 4, 8, 12 and the last step, two epochs begun
        (14, (14, 4 * 2 + 2 * 5)),
        (12, (12, 3 * 2 + 2 * 5)),
        (30, (30, 8 * 2 + 3 * 5)),  # max_steps reached at the run's end: one more record
        (100, (30, 7 * 2 + 3 * 5)),  # max_steps never reached: as without it
    ],
)
def test_full_run_counts(max_steps: int | None, expected: tuple[int, int]) -> None:
    counts = rehearsal.full_run_counts(
        10, 3, max_steps, eval_every=4, eval_batches=2, accuracy_batches=5
    )
    assert counts == expected


def test_record_lines_are_strict_json(tmp_path, monkeypatch) -> None:
    path = tmp_path / "runs.jsonl"
    monkeypatch.setenv(config.RECORD_ENV, str(path))
    monkeypatch.delenv(config.QUICK_ENV, raising=False)
    monkeypatch.delenv(config.REHEARSAL_ENV, raising=False)
    p = rehearsal.Projection(2, 100, 0.25, 2, 10, 0.5)
    for method in ("lora", None):
        rehearsal.record_run(p, method=method, elapsed_seconds=3.5, device=torch.device("cpu"))
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert first == {
        "mode": "full",
        "method": "lora",
        "steps_done": 2,
        "full_steps": 100,
        "median_step_seconds": 0.25,
        "projected_full_seconds": 30.0,
        "elapsed_seconds": 3.5,
        "peak_rss_bytes": first["peak_rss_bytes"],
        "cuda_peak_bytes": None,
        "device": "cpu",
    }
    assert first["peak_rss_bytes"] > 10 * 2**20 and second["method"] is None
    with pytest.raises(ValueError, match="JSON"):
        rehearsal.append_record(path, {"loss": float("nan")})


def test_timed_steps_times_and_records_a_chapters_own_loop(tmp_path, monkeypatch) -> None:
    path = tmp_path / "runs.jsonl"
    monkeypatch.setenv(config.RECORD_ENV, str(path))
    monkeypatch.delenv(config.QUICK_ENV, raising=False)
    monkeypatch.setenv(config.REHEARSAL_ENV, "1")
    assert list(rehearsal.timed_steps(50, desc="rehearsed", method="toy")) == [0, 1]
    monkeypatch.setenv(config.REHEARSAL_ENV, "0")
    assert list(rehearsal.timed_steps(3, desc="whole")) == [0, 1, 2]
    rehearsed, whole = (json.loads(line) for line in path.read_text().splitlines())
    assert (rehearsed["mode"], rehearsed["method"]) == ("rehearsal", "toy")
    assert (rehearsed["steps_done"], rehearsed["full_steps"]) == (2, 50)
    expected = 50 * rehearsed["median_step_seconds"]
    assert rehearsed["projected_full_seconds"] == pytest.approx(expected)
    assert (whole["mode"], whole["steps_done"], whole["full_steps"]) == ("full", 3, 3)


def test_repeats_are_recorded_in_a_rehearsal_only(tmp_path, monkeypatch) -> None:
    path = tmp_path / "runs.jsonl"
    monkeypatch.setenv(config.RECORD_ENV, str(path))
    monkeypatch.delenv(config.QUICK_ENV, raising=False)
    run = SimpleNamespace(full_steps=650, median_step_seconds=2.0, projected_full_seconds=1400.0)
    monkeypatch.setenv(config.REHEARSAL_ENV, "0")
    rehearsal.record_repeats(run, 2, method="lora", device="cpu")
    assert not path.exists()  # full mode trains every run: nothing to count
    monkeypatch.setenv(config.REHEARSAL_ENV, "1")
    rehearsal.record_repeats(run, 2, method="lora", device="cpu")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2
    assert all(
        line["repeat"] and line["steps_done"] == line["elapsed_seconds"] == 0 for line in lines
    )
    assert sum(line["projected_full_seconds"] for line in lines) == 2800.0
