"""The command line end to end (in a subprocess, as users run it, and in-process where that is enough):
quick mode, baseline methods, missing inputs, and two processes under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_tutorial import adapters, config, data, download, finetune, gpt, train
from lora_tutorial.classify import GPTClassifier
from lora_tutorial.finetune import QUICK_SIZES

OUTPUTS = {"adapter.safetensors", "metrics.json", "loss.png", "accuracy.png"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env(data_dir: Path | str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != config.QUICK_ENV}
    return {**env, config.DATA_ENV: str(data_dir), "OMP_NUM_THREADS": "1", **extra}


def _run(
    args: list[str], env: dict[str, str], launcher: list[str] | None = None
) -> subprocess.CompletedProcess:
    command = [*(launcher or [sys.executable, "-m"]), "lora_tutorial.finetune", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def test_quick_run_writes_adapter_metrics_and_plots(
    tmp_path: Path, data_dir: Path, gpt2_tokenizer
) -> None:
    out, splits_dir = tmp_path / "out", tmp_path / "splits"
    args = [
        "--quick",
        "--max-steps",
        "8",
        "--output-dir",
        str(out),
        "--data-dir",
        str(splits_dir),
        "--no-progress",
    ]
    result = _run(args, _env(data_dir))
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == OUTPUTS
    assert all(
        (out / name).read_bytes().startswith(PNG_MAGIC) for name in ("loss.png", "accuracy.png")
    )

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["examples"] == QUICK_SIZES
    assert metrics["weights"]["file"] == "adapter.safetensors"
    assert metrics["summary"]["trainable_params"] < metrics["summary"]["total_params"] / 10
    history = metrics["history"]
    assert len(history["train_losses"]) == len(history["steps"]) > 0

    # The adapter, loaded into the same tiny base model, reproduces the reported test scores.
    train.set_seed(123)
    model = GPTClassifier(gpt.GPTModel("tiny"))
    adapters.load_adapter(model, out / "adapter.safetensors")
    splits = data.load_splits(splits_dir)
    test = data.subset(splits.test, QUICK_SIZES["test"], seed=123)
    loaders = data.make_loaders(
        splits.train, splits.validation, test, gpt2_tokenizer, max_length=metrics["max_length"]
    )
    evaluation = train.evaluate(model, loaders.test)
    assert evaluation.confusion == metrics["test"]["confusion"]
    assert train.weights_digest(model) == metrics["weights_digest_per_rank"][0]


def test_learning_rate_defaults_to_the_methods_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.QUICK_ENV, raising=False)
    for method in train.METHODS:
        assert finetune.parse_args(["--method", method]).lr == train.DEFAULT_LR[method]
        assert finetune.parse_args(["--method", method, "--quick"]).lr == train.QUICK_LR
    assert finetune.parse_args(["--method", "full", "--lr", "2e-4"]).lr == 2e-4
    args = finetune.parse_args([])
    assert (args.method, args.lr, args.rank, args.alpha) == (
        "lora",
        train.DEFAULT_LR["lora"],
        train.LORA_RANK,
        train.LORA_ALPHA,
    )
    assert finetune.parse_args(["--quick"]).alpha == train.QUICK_LORA_ALPHA
    assert finetune.parse_args(["--quick", "--alpha", "8"]).alpha == 8


def test_bad_alpha_is_rejected_before_anything_is_fetched(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        finetune.parse_args(["--quick", "--alpha", "0"])
    assert exit_info.value.code == 2
    assert "--alpha: alpha must be a positive number, got 0.0" in capsys.readouterr().err
    assert (
        finetune.parse_args(["--quick", "--method", "full", "--alpha", "0"]).alpha == 0
    )  # unused by full


@pytest.fixture
def one_thread() -> Iterator[None]:
    """In-process runs of a tiny model: one thread beats cores shared with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_quick_mode_from_the_environment_and_baseline_weights(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    monkeypatch.setenv(config.QUICK_ENV, "1")
    out = tmp_path / "out"
    args = [
        "--method",
        "last-block",
        "--max-steps",
        "2",
        "--output-dir",
        str(out),
        "--data-dir",
        str(tmp_path / "d"),
        "--no-progress",
    ]
    assert finetune.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["quick"] is True and metrics["history"]["steps"][-1] == 2
    assert metrics["weights"]["file"] == "weights.safetensors"
    names = set(load_file(out / "weights.safetensors"))
    assert names and all(
        n.startswith(("gpt.trf_blocks.1.", "gpt.final_norm.", "gpt.out_head.")) for n in names
    )


def test_offline_without_weights_stops_with_advice(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv(download.MIRROR_ENV, "http://127.0.0.1:9")  # nothing listens there
    out = tmp_path / "out"
    assert finetune.main(["--output-dir", str(out), "--data-dir", str(tmp_path / "d")]) != 0
    message = capsys.readouterr().err
    assert "gpt2-small.safetensors" in message and "--quick" in message
    assert not out.exists()


def test_offline_without_data_stops_with_advice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv(config.DATA_ENV, str(empty))
    monkeypatch.setenv(download.MIRROR_ENV, "http://127.0.0.1:9")
    assert (
        finetune.main(
            ["--quick", "--output-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "d")]
        )
        != 0
    )
    message = capsys.readouterr().err
    assert data.SMS_FILE in message and str(tmp_path / "d") in message


def test_torchrun_two_processes_end_with_identical_weights(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "out"
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
    ]
    args = ["--quick", "--output-dir", str(out), "--data-dir", str(tmp_path / "d"), "--no-progress"]
    result = _run(args, _env(data_dir), launcher)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == OUTPUTS
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    digests = metrics["weights_digest_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # Each step saw a batch per process, and training moved the LoRA matrices away from B = 0.
    steps, seen = metrics["history"]["steps"], metrics["history"]["examples_seen"]
    assert seen == [2 * 8 * s for s in steps]
    tensors, _ = adapters.read_adapter(out / "adapter.safetensors")
    assert any(
        name.endswith("lora.B") and torch.count_nonzero(t) > 0 for name, t in tensors.items()
    )
