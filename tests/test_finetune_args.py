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


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a refused command line prints (after argparse's usage line, if any)."""
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()[-1]


@pytest.mark.parametrize("name", [".", ""])
def test_the_current_folder_or_an_empty_name_is_no_output_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    monkeypatch.chdir(tmp_path)  # an empty folder: before, the run trained, then lost its results
    line = _refused(["--quick", "--output-dir", name, "--data-dir", "d"], capsys)
    expected = "is the current folder or holds it" if name else "--output-dir: an empty name"
    assert expected in line
    inner = tmp_path / "inner"
    inner.mkdir()
    monkeypatch.chdir(inner)
    assert "holds it" in _refused(["--quick", "--output-dir", str(tmp_path)], capsys)
    assert list(tmp_path.iterdir()) == [inner] and list(inner.iterdir()) == []


def test_an_output_folder_that_holds_the_cache_or_the_data_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results"
    monkeypatch.setenv(config.CACHE_ENV, str(out / "cache"))  # the default data folder is in it
    line = _refused(["--quick", "--output-dir", str(out)], capsys)
    assert f"holds the cache folder ({config.CACHE_ENV}), {out / 'cache'}" in line
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "shared" / "data").mkdir(parents=True)
    monkeypatch.setenv(config.DATA_ENV, str(tmp_path / "shared" / "data"))
    line = _refused(["--quick", "--output-dir", str(tmp_path / "shared")], capsys)
    assert f"holds the offline data folder ({config.DATA_ENV})" in line


def test_an_empty_data_folder_name_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # before, the split CSVs landed in the current folder
    line = _refused(["--quick", "--data-dir", "", "--output-dir", "o"], capsys)
    assert "argument --data-dir: an empty name; give a folder" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        (config.RECORD_ENV, "{tmp}", "is a folder"),
        (config.RECORD_ENV, "{tmp}/no/such/folder/runs.jsonl", "which is no folder"),
        (config.CACHE_ENV, "{tmp}/a-file", "is a file, not a folder"),
        (config.CACHE_ENV, "{tmp}/locked", "cannot be read and written"),
        ("LORA_TUTORIAL_MIRROR", "ftp://example.org", "is not an http(s) base address"),
        ("LORA_TUTORIAL_MIRROR", "http://example.org", "plain http for a non-loopback host"),
        ("LORA_TUTORIAL_DOWNLOAD_DEADLINE", "soon", "is not a positive, finite number"),
        ("LORA_TUTORIAL_DOWNLOAD_DEADLINE", "0", "is not a positive, finite number"),
        (config.DATA_ENV, "{tmp}/nowhere", "is not a folder"),
    ],
)
def test_environment_variables_are_checked_before_any_work(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    problem: str,
) -> None:
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "locked").mkdir(mode=0o000)
    monkeypatch.setenv(variable, value.format(tmp=tmp_path))
    try:
        line = _refused(["--quick", "--output-dir", str(tmp_path / "o")], capsys)
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert line.startswith(f"python -m lora_tutorial.finetune: error: {variable}=")
    assert problem in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "locked"]


def test_lora_options_with_another_method_are_refused_not_recorded(
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = _refused(["--quick", "--method", "full", "--rank", "9999"], capsys)
    assert "--rank sets LoRA's adapter, but --method full trains none" in line
    line = _refused(["--method", "last-block", "--rank", "4", "--alpha", "8"], capsys)
    assert "--rank and --alpha set LoRA's adapter" in line
    args = finetune.parse_args(["--method", "full"])
    assert (args.rank, args.alpha) == (None, None)  # metrics.json records no adapter's settings
