"""runtime.config: the mode switches, the data and cache folders, the device choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_tutorial.book import provenance
from lora_tutorial.runtime import config, rehearsal
from lora_tutorial.runtime.rehearsal import EVAL_BATCHES, TRAIN_STEPS


@pytest.mark.parametrize(
    ("quick", "rehearsal", "mode"),
    [
        (None, None, "full"),
        ("1", None, "quick"),
        ("TRUE", None, "quick"),
        (" yes ", "0", "quick"),
        ("on", "off", "quick"),
        (None, "1", "rehearsal"),
        ("", "true", "rehearsal"),
        ("0", "no", "full"),
        ("false", "", "full"),
    ],
)
def test_mode_follows_the_two_switches(
    monkeypatch: pytest.MonkeyPatch, quick: str | None, rehearsal: str | None, mode: str
) -> None:
    for name, value in ((config.QUICK_ENV, quick), (config.REHEARSAL_ENV, rehearsal)):
        if value is not None:
            monkeypatch.setenv(name, value)
    assert config.mode() == mode
    assert config.is_quick() == (mode == "quick")
    assert config.is_rehearsal() == (mode == "rehearsal")


@pytest.mark.parametrize("value", ["y", "2", "quick", "enabled"])
def test_a_switch_it_does_not_understand_is_an_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(config.QUICK_ENV, value)
    with pytest.raises(ValueError, match=f"LORA_TUTORIAL_QUICK='{value}' is not understood"):
        config.mode()
    with pytest.raises(ValueError, match="set it to 1"):
        config.is_quick()


def test_both_modes_on_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.QUICK_ENV, "1")
    monkeypatch.setenv(config.REHEARSAL_ENV, "1")
    with pytest.raises(ValueError, match="both on; choose one mode"):
        config.mode()
    with pytest.raises(ValueError, match="choose one mode"):
        provenance.mode_banner()


def test_the_banner_names_the_mode_and_what_its_numbers_mean(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    full = provenance.mode_banner()
    assert full.startswith("FULL MODE") and "LORA_TUTORIAL_QUICK=1" in full
    monkeypatch.setenv(config.QUICK_ENV, "1")
    quick = provenance.mode_banner()
    assert quick.startswith("QUICK MODE") and "not the book's full results" in quick
    monkeypatch.setenv(config.QUICK_ENV, "0")
    monkeypatch.setenv(config.REHEARSAL_ENV, "1")
    rehearsal = provenance.mode_banner()
    assert rehearsal.startswith("REHEARSAL MODE") and "meaningless" in rehearsal
    assert f"stopped after {TRAIN_STEPS} steps" in rehearsal


def test_data_dir_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "sms").mkdir()
    (tmp_path / "sms" / "SMSSpamCollection").write_text("ham\thello\n")
    monkeypatch.setenv(config.DATA_ENV, str(tmp_path))
    assert config.data_dir() == tmp_path
    assert config.shared_file("sms", "SMSSpamCollection") == tmp_path / "sms" / "SMSSpamCollection"
    assert config.shared_file("sms", "missing.txt") is None


def test_data_dir_that_does_not_exist_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(config.DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="LORA_TUTORIAL_DATA=.*nowhere.* is not a folder"):
        config.data_dir()


def test_data_dir_defaults_to_shared_data_beside_the_repository(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(config.DATA_ENV, raising=False)
    monkeypatch.setattr(config, "repo_root", lambda: tmp_path / "repo")
    assert config.data_dir() is None
    assert config.shared_file("anything") is None
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert config.data_dir() == tmp_path / "shared" / "data"


def test_cache_dir_is_created_where_the_environment_says(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(config.CACHE_ENV, str(tmp_path / "my" / "cache"))
    assert config.cache_dir() == tmp_path / "my" / "cache"
    assert (tmp_path / "my" / "cache").is_dir()

    monkeypatch.delenv(config.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert config.cache_dir() == tmp_path / "xdg" / "lora_tutorial"
    assert (tmp_path / "xdg" / "lora_tutorial").is_dir()

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config.cache_dir() == tmp_path / "home" / ".cache" / "lora_tutorial"


def test_get_device_prefers_what_it_is_told_then_cuda_then_mps_then_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert config.get_device("cpu") == torch.device("cpu")
    assert config.get_device("cuda:1") == torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert config.get_device() == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert config.get_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert config.get_device() == torch.device("cuda")


def test_rehearsal_caps_the_chapters_own_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    assert rehearsal.capped_steps(1000) == 1000
    assert list(rehearsal.capped(range(10))) == list(range(10))
    monkeypatch.setenv(config.REHEARSAL_ENV, "1")
    assert rehearsal.capped_steps(1000) == TRAIN_STEPS
    assert rehearsal.capped_steps(1) == 1
    assert list(rehearsal.capped(range(10))) == list(range(EVAL_BATCHES))


def test_rehearsal_first_keeps_the_first_items_in_a_rehearsal_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(config.QUICK_ENV, raising=False)
    monkeypatch.setenv(config.REHEARSAL_ENV, "0")
    assert list(rehearsal.capped(range(72), 6)) == list(range(72))
    monkeypatch.setenv(config.REHEARSAL_ENV, "1")
    assert list(rehearsal.capped(range(72), 6)) == list(range(6))


@pytest.mark.parametrize("kind", ["a file", "unreadable", "under a file"])
def test_a_cache_that_cannot_be_used_is_an_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "cache"
    if kind == "a file":
        path.write_text("mine")
    elif kind == "unreadable":
        path.mkdir(mode=0o000)
    else:
        path.write_text("mine")
        path = path / "inside"
    monkeypatch.setenv(config.CACHE_ENV, str(path))
    try:
        with pytest.raises(ValueError, match=rf"^{config.CACHE_ENV}=.*; point {config.CACHE_ENV}"):
            config.cache_dir(create=False)
    finally:
        (tmp_path / "cache").chmod(0o755)


@pytest.mark.parametrize(
    ("where", "problem"),
    [("folder", "is a folder"), ("missing/r.jsonl", "which is no folder"), ("ro.jsonl", "cannot")],
)
def test_a_record_file_that_cannot_be_written_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, where: str, problem: str
) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "ro.jsonl").write_text("")
    (tmp_path / "ro.jsonl").chmod(0o444)
    monkeypatch.setenv(config.RECORD_ENV, str(tmp_path / where))
    with pytest.raises(ValueError, match=f"{config.RECORD_ENV}=.* {problem}"):
        config.record_path()
    monkeypatch.setenv(config.RECORD_ENV, str(tmp_path / "new.jsonl"))
    assert config.record_path() == tmp_path / "new.jsonl"
