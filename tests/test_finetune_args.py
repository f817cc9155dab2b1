"""The command line's options and the checks that run before any work (``finetune_args``):
mode defaults, numeric ranges, modes that exclude each other, the output and data folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_tutorial import finetune, train
from lora_tutorial.runtime import config


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
    assert "argument --alpha: '0' is not a positive, finite number" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--lr", "inf"),
        ("--lr", "nan"),
        ("--lr", "0"),
        ("--lr", "-1e-3"),
        ("--weight-decay", "-0.1"),
        ("--weight-decay", "nan"),
        ("--seed", "-1"),
        ("--seed", str(2**32)),
        ("--seed", "1.5"),
        ("--epochs", "0"),
        ("--batch-size", "-8"),
        ("--rank", "0"),
        ("--alpha", "nan"),
        ("--max-steps", "0"),
        ("--eval-every", "0"),
    ],
)
def test_bad_numbers_are_usage_errors_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    out, data_folder = tmp_path / "out", tmp_path / "d"
    argv = [
        "--quick",
        f"{option}={value}",
        "--output-dir",
        str(out),
        "--data-dir",
        str(data_folder),
    ]
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(argv)
    assert exit_info.value.code == 2
    assert f"argument {option}: '{value}'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no data prepared, no folder made


def test_quick_and_rehearsal_are_one_mode_each(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(config.QUICK_ENV, raising=False)
    monkeypatch.delenv(config.REHEARSAL_ENV, raising=False)
    assert finetune.parse_args(["--rehearsal"]).mode == "rehearsal"
    assert finetune.parse_args([]).mode == "full"
    with pytest.raises(SystemExit):
        finetune.parse_args(["--quick", "--rehearsal"])
    assert "not allowed with argument --quick" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune.parse_args(["--quick", "--rank", "65"])  # the tiny model's layers are 64 wide
    assert "--rank 65 exceeds the model's layer width 64" in capsys.readouterr().err
    monkeypatch.setenv(config.REHEARSAL_ENV, "1")
    args = finetune.parse_args([])
    assert (args.mode, args.rehearsal, args.quick) == ("rehearsal", True, False)
    assert args.lr == train.DEFAULT_LR["lora"]  # rehearsal takes full mode's settings
    with pytest.raises(SystemExit):
        finetune.parse_args(["--quick"])
    assert "ask for two modes" in capsys.readouterr().err


def test_a_data_folder_that_is_a_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "d").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(
            ["--quick", "--output-dir", str(tmp_path / "o"), "--data-dir", str(tmp_path / "d")]
        )
    assert exit_info.value.code == 2 and "--data-dir:" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    inside = ["--output-dir", str(tmp_path / "o"), "--data-dir", str(tmp_path / "o" / "data")]
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(["--quick", *inside])
    assert "holds --data-dir" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def _output_problem(tmp_path: Path, kind: str) -> Path:
    if kind == "a file":
        (tmp_path / "results").write_text("mine")
        return tmp_path / "results"
    if kind == "under a file":
        (tmp_path / "results").write_text("mine")
        return tmp_path / "results" / "run1"
    folder = tmp_path / "results"
    folder.mkdir()
    if kind == "read-only":
        folder.chmod(0o555)
    else:
        (folder / "notes.txt").write_text("my notes")
    return folder


@pytest.mark.parametrize("kind", ["a file", "under a file", "read-only", "holds a user's file"])
def test_output_folder_problems_stop_the_run_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    out = _output_problem(tmp_path, kind)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(["--quick", "--output-dir", str(out), "--data-dir", str(tmp_path / "d")])
    if kind == "read-only":
        out.chmod(0o755)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--output-dir:" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()  # stopped before the data was prepared
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
