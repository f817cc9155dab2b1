"""Rehearsal mode's machinery: runs stopped early, their records, and the full runs they stand for.

A rehearsal (``LORA_TUTORIAL_REHEARSAL=1``) runs every full-mode cell at full size with random
weights, but stops each training run after :data:`TRAIN_STEPS` steps and each evaluation after
:data:`EVAL_BATCHES` batches. It proves that full mode works and measures what it would cost. The
training entry points (:func:`lora_tutorial.train.train_classifier`, :func:`timed_steps`) call
this module, so chapters never mention it:

- :func:`capped_steps`, :func:`step_limit`, :func:`eval_batch_limit`, :func:`capped`: the caps.
- :class:`Projection`: what a stopped run measured and how long the full run would take at that
  pace; :func:`record_run` appends it as one JSON line to ``$LORA_TUTORIAL_RECORD``, e.g.::

    {"mode": "rehearsal", "method": "lora", "steps_done": 2, "full_steps": 470,
     "median_step_seconds": 1.9, "projected_full_seconds": 1012.4, "elapsed_seconds": 9.8,
     "peak_rss_bytes": 2147483648, "cuda_peak_bytes": null, "device": "cpu"}

  ``full_steps``: the steps of the same call in full mode, per process; ``median_step_seconds``: a
  step's median time (batch loading included, warm-up step left out); ``projected_full_seconds``:
  that x ``full_steps`` + the measured time per evaluation batch x full mode's evaluation batches.
- :func:`repeat_of` and :func:`remember`: a run whose shapes repeat one already trained in this
  process (another seed, learning rate or scaling at the same layers and rank) costs the same, so
  a rehearsal trains it once and :func:`record_repeats` counts the others at the measured cost.
"""

from __future__ import annotations

import itertools
import json
import resource
import statistics
import sys
import time
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import torch
from tqdm import tqdm

from lora_tutorial.runtime import config

T = TypeVar("T")
TRAIN_STEPS = 2  # optimizer steps per training run in rehearsal mode
EVAL_BATCHES = 2  # batches per evaluation in rehearsal mode


def active() -> bool:
    """True in rehearsal mode."""
    return config.mode() == "rehearsal"


def capped_steps(steps: int) -> int:
    """``steps``, or at most :data:`TRAIN_STEPS` in rehearsal mode (a chapter's own loop)."""
    return min(steps, TRAIN_STEPS) if active() else steps


def step_limit(max_steps: int | None) -> int | None:
    """``max_steps`` (None: no limit); in rehearsal mode at most :data:`TRAIN_STEPS`."""
    if not active():
        return max_steps
    return TRAIN_STEPS if max_steps is None else min(max_steps, TRAIN_STEPS)


def eval_batch_limit(num_batches: int | None) -> int | None:
    """The batches an evaluation reads: ``num_batches`` (None: all); at most :data:`EVAL_BATCHES`
    in rehearsal mode."""
    if not active():
        return num_batches
    return EVAL_BATCHES if num_batches is None else min(num_batches, EVAL_BATCHES)


def capped(items: Iterable[T], n: int = EVAL_BATCHES) -> Iterator[T]:
    """All of ``items``, or only the first ``n`` in rehearsal mode (batches, layers, rounds)."""
    return itertools.islice(items, n if active() else None)


def peak_rss_bytes() -> int:
    """The most resident memory (RSS) this process has held so far, from ``getrusage``, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def median_step_seconds(step_seconds: Sequence[float]) -> float:
    """The typical time of a step: the median, leaving out the first (warm-up) step if others exist.

    The first step also allocates the optimizer state and warms caches: it is slower than the rest.
    """
    timed = list(step_seconds[1:]) or list(step_seconds)
    return statistics.median(timed) if timed else 0.0


@dataclass(frozen=True)
class Projection:
    """What a training run measured, and how long the run would take without being stopped early.

    ``full_steps`` and ``full_eval_batches`` count the optimizer steps and evaluation batches that
    the same call makes in full mode (per process); the projection multiplies them by the measured
    time of one step and of one evaluation batch.
    """

    steps_done: int
    full_steps: int
    median_step_seconds: float
    eval_batches_done: int
    full_eval_batches: int
    eval_seconds_per_batch: float

    @property
    def projected_full_seconds(self) -> float:
        """Median step time x full-mode steps + evaluation time per batch x full-mode batches."""
        training = self.median_step_seconds * self.full_steps
        return training + self.eval_seconds_per_batch * self.full_eval_batches


def full_run_counts(
    steps_per_epoch: int,
    epochs: int,
    max_steps: int | None,
    eval_every: int,
    eval_batches: int,
    accuracy_batches: int,
) -> tuple[int, int]:
    """Optimizer steps and evaluation batches of a training run that is not stopped early.

    The run trains ``epochs`` x ``steps_per_epoch`` steps (or ``max_steps``), records its losses
    every ``eval_every`` steps (and at ``max_steps``) reading ``eval_batches`` batches, and
    measures accuracy after each epoch reading ``accuracy_batches`` batches.
    """
    planned = epochs * steps_per_epoch
    steps = planned if max_steps is None else min(max_steps, planned)
    stops_early = max_steps is not None and max_steps <= planned
    records = steps // eval_every + int(stops_early and steps % eval_every > 0)
    epochs_run = -(-steps // steps_per_epoch) if steps_per_epoch else 0  # rounded up
    return steps, records * eval_batches + epochs_run * accuracy_batches


def run_record(
    projection: Projection,
    *,
    mode: str,
    method: str | None,
    elapsed_seconds: float,
    device: torch.device,
) -> dict[str, object]:
    """One training run's record: its mode, method, steps, times, peak memory and device."""
    return {
        "mode": mode,
        "method": method,
        "steps_done": projection.steps_done,
        "full_steps": projection.full_steps,
        "median_step_seconds": projection.median_step_seconds,
        "projected_full_seconds": projection.projected_full_seconds,
        "elapsed_seconds": elapsed_seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else None,
        "device": str(device),
    }


def record_run(
    projection: Projection, *, method: str | None, elapsed_seconds: float, device: torch.device
) -> None:
    """Append the run's record to ``config.record_path()``, if that names a file."""
    path = config.record_path()
    if path is not None:
        record = run_record(
            projection,
            mode=config.mode(),
            method=method,
            elapsed_seconds=elapsed_seconds,
            device=device,
        )
        append_record(path, record)


def append_record(path: Path, record: dict[str, object]) -> None:
    """Append ``record`` to ``path`` as one line of strict JSON (the file is created if missing)."""
    line = json.dumps(record, allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


class Projected(Protocol):
    """What a finished run knows of its full-mode length (:class:`~lora_tutorial.train.History`)."""

    full_steps: int
    median_step_seconds: float
    projected_full_seconds: float


def record_repeats(
    run: Projected, times: int, *, method: str | None, device: torch.device | str
) -> None:
    """Record ``times`` more runs like ``run`` that this rehearsal does not train.

    Other seeds, or another learning rate at the same shapes, take as long as the run that was
    measured; a rehearsal trains one of them and counts the others here (0 steps done, 0 seconds
    elapsed, the measured run's projection), so that a chapter's projected full-mode time still
    counts every run that full mode trains. Outside rehearsal mode it records nothing.
    """
    path = config.record_path()
    if path is None or times < 1 or not active():
        return
    not_run = Projection(0, run.full_steps, run.median_step_seconds, 0, 0, 0.0)
    record = run_record(
        not_run, mode=config.mode(), method=method, elapsed_seconds=0.0, device=torch.device(device)
    )
    record.update(projected_full_seconds=run.projected_full_seconds, repeat=True)
    for _ in range(times):
        append_record(path, record)


def timed_steps(
    steps: int, *, desc: str, device: torch.device | str = "cpu", method: str | None = None
) -> Iterator[int]:
    """``range(steps)`` with a progress bar, for a chapter's own training loop; each pass is a step.

    In rehearsal mode it stops after ``TRAIN_STEPS`` steps. It times the steps and,
    when the loop ends, appends the run's record (see :func:`record_run`) with its projection to
    ``steps`` steps, as :func:`~lora_tutorial.train.train_classifier` does for its runs.
    """
    done = capped_steps(steps)
    seconds: list[float] = []
    start = tick = time.perf_counter()
    for step in tqdm(range(done), desc=desc):
        yield step
        now = time.perf_counter()
        seconds.append(now - tick)
        tick = now
    projection = Projection(
        steps_done=done,
        full_steps=steps,
        median_step_seconds=median_step_seconds(seconds),
        eval_batches_done=0,
        full_eval_batches=0,
        eval_seconds_per_batch=0.0,
    )
    elapsed = time.perf_counter() - start
    record_run(projection, method=method, elapsed_seconds=elapsed, device=torch.device(device))


_TRAINED: dict[Hashable, Projected] = {}  # runs trained in this process, by their shapes


def repeat_of(shapes: Hashable) -> Projected | None:
    """In a rehearsal, the run already trained with these ``shapes`` (None: train this one)."""
    return _TRAINED.get(shapes) if active() else None


def remember(shapes: Hashable, run: Projected) -> None:
    """Keep ``run`` as the measured run for ``shapes`` (rehearsal mode only)."""
    if active():
        _TRAINED[shapes] = run


def forget_trained() -> None:
    """Forget every run remembered so far (each test starts from none)."""
    _TRAINED.clear()
