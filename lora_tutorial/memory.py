"""Measuring memory and time: the peak memory of a block of code and one training step, measured.

- :class:`PeakMemory`: the peak memory of the code inside a ``with`` block (GPU tensors on CUDA,
  the process's resident memory elsewhere).
- :func:`measure_training_step`: time, training-state bytes and activation bytes of a training step,
  to set beside chapter 2's predictions in :mod:`lora_tutorial.lowrank`.
- :class:`Projection`: what a run that was stopped early (rehearsal mode) measured, and how long
  the full run would take at that pace; :func:`run_record` and :func:`append_record` write it as one
  JSON line (the format is described in :mod:`lora_tutorial.train`); :func:`record_repeats` counts
  runs that a rehearsal did not repeat.
- :func:`timed_steps`: the steps of a chapter's own training loop, timed and recorded the same way.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm

from lora_tutorial import config
from lora_tutorial.lowrank import TrainingStateBytes


def peak_rss_bytes() -> int:
    """The most resident memory (RSS) this process has held so far, from ``getrusage``, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def _rss_bytes() -> int:
    """Resident memory of this process now (Linux), or its high-water mark elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


class PeakMemory:
    """Context manager measuring the peak memory of the code inside it; read ``.peak_bytes``.

    On CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, weights included). Elsewhere:
    the process's resident memory (RSS), sampled every 5 ms by a thread; it includes Python,
    the libraries and memory the allocator kept from earlier work, so compare methods in
    fresh processes. ``.measure`` says which of the two was used.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self.measure = (
            "torch.cuda.max_memory_allocated (tensor memory on the GPU)"
            if device.type == "cuda"
            else "process resident memory (RSS), sampled every 5 ms"
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())


def _storage_key(t: Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def measured_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainingStateBytes:
    """Bytes held right now by the model's parameters, their gradients and the optimizer state."""
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    state = sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, Tensor) and v.ndim > 0  # AdamW's step counter is a 0-d tensor
    )
    return TrainingStateBytes(weights, grads, state)


@contextmanager
def count_saved_activations(model: nn.Module) -> Iterator[dict[str, int]]:
    """Count the bytes autograd saves for the backward pass (the activations) inside the block.

    Tensors that share storage are counted once, and the model's own parameters are not counted.
    The result is in ``counter["bytes"]`` when the block ends.
    """
    param_keys = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[tuple[int, int]] = set()
    counter = {"bytes": 0}

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key[0] not in param_keys and key not in seen:
            seen.add(key)
            counter["bytes"] += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield counter


@dataclass(frozen=True)
class StepMeasurement:
    """One measured training step: time, state and activation bytes, device peak if known."""

    seconds: float
    state: TrainingStateBytes
    activation_bytes: int
    device_peak_bytes: int | None  # torch.cuda.max_memory_allocated on CUDA, None elsewhere


def measure_training_step(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    repeats: int = 3,
) -> StepMeasurement:
    """Measure ``repeats`` training steps (``loss_fn(model)``, backward, ``optimizer.step()``).

    The first step is a warm-up (it creates the optimizer state); the time is the median of the
    others. On CUDA the peak of allocated memory during the steps is recorded too.
    """
    if repeats < 2:
        raise ValueError(f"repeats must be at least 2 (one warm-up step, one timed), got {repeats}")
    device = next(model.parameters()).device
    on_cuda = device.type == "cuda"
    times, activations = [], 0
    for i in range(repeats):
        optimizer.zero_grad(set_to_none=True)
        if on_cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with count_saved_activations(model) as saved:
            loss = loss_fn(model)
        loss.backward()
        optimizer.step()
        if on_cuda:
            torch.cuda.synchronize(device)
        if i > 0:
            times.append(time.perf_counter() - start)
        activations = saved["bytes"]
    peak = torch.cuda.max_memory_allocated(device) if on_cuda else None
    return StepMeasurement(
        seconds=sorted(times)[len(times) // 2],
        state=measured_state_bytes(model, optimizer),
        activation_bytes=activations,
        device_peak_bytes=peak,
    )


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
    if path is None or times < 1 or not config.is_rehearsal():
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

    In rehearsal mode it stops after ``config.REHEARSAL_TRAIN_STEPS`` steps. It times the steps and,
    when the loop ends, appends the run's record (see :func:`record_run`) with its projection to
    ``steps`` steps, as :func:`~lora_tutorial.train.train_classifier` does for its runs.
    """
    done = config.rehearsal_steps(steps)
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
