"""provenance.py: a run says which code, on which machine, when, with which seed and mode."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
from pathlib import Path

import nbformat
import pytest
import torch

from lora_tutorial import __version__
from lora_tutorial.book import provenance
from lora_tutorial.runtime import config

ROOT = config.repo_root()


@pytest.fixture(autouse=True)
def _no_ci_hints(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (provenance.COMMIT_ENV, "GITHUB_SHA", config.QUICK_ENV, config.REHEARSAL_ENV):
        monkeypatch.delenv(name, raising=False)


def field(text: str, name: str) -> str:
    line = next(line for line in text.splitlines() if line.startswith(f"{name}:"))
    return line.split(":", 1)[1].strip()


def test_describe_names_version_torch_seed_and_device() -> None:
    text = provenance.describe(seed=123, device="cpu")
    assert field(text, "package") == f"lora-tutorial {__version__}"
    assert field(text, "torch") == torch.__version__
    assert field(text, "seed") == "123"
    assert field(text, "device").startswith("CPU ")
    assert f"({os.cpu_count()} cores)" in field(text, "device")
    assert field(provenance.describe(), "seed") == "not set"


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, "full"), ({config.QUICK_ENV: "1"}, "quick"), ({config.REHEARSAL_ENV: "1"}, "rehearsal")],
)
def test_mode_is_the_one_config_reads(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert field(provenance.describe(seed=0), "mode") == expected
    assert provenance.collect(seed=0).mode == expected


def test_date_is_now_in_utc() -> None:
    stamp = provenance.collect().date
    when = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.timezone.utc
    )
    assert abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()) < 60


def test_a_seed_that_is_not_an_int_is_refused() -> None:
    with pytest.raises(TypeError, match="seed must be an int"):
        provenance.collect(seed="123")  # type: ignore[arg-type]


def test_an_explicit_commit_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(provenance.COMMIT_ENV, "abc123")
    monkeypatch.setenv("GITHUB_SHA", "def456")
    assert field(provenance.describe(), "commit") == "abc123"


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
def test_a_checkout_reports_its_head_commit() -> None:
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    expected = f"{head} (with uncommitted changes)" if dirty else head
    assert provenance.commit() == expected


def fake_installed_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct_url: dict) -> None:
    """Make the package look pip-installed (no git checkout), with pip's record ``direct_url``."""
    monkeypatch.setattr(config, "repo_root", lambda: tmp_path / "site-packages")
    dist = tmp_path / "dists" / "lora_tutorial-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lora-tutorial\nVersion: 0.1.0\n")
    (dist / "direct_url.json").write_text(json.dumps(direct_url))
    monkeypatch.syspath_prepend(str(dist.parent))


def test_a_pip_install_from_git_reports_the_commit_pip_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "https://github.com/someone/lora-tutorial"
    sha = "0123456789abcdef0123456789abcdef01234567"
    fake_installed_copy(
        tmp_path, monkeypatch, {"url": url, "vcs_info": {"vcs": "git", "commit_id": sha}}
    )
    monkeypatch.setenv("GITHUB_SHA", "not-this-one")
    assert provenance.commit() == f"{sha} ({url})"


def test_on_a_runner_without_git_the_runner_commit_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_installed_copy(tmp_path, monkeypatch, {"url": "file:///src", "dir_info": {}})
    assert provenance.commit() is None
    assert "unknown" in field(provenance.describe(), "commit")
    monkeypatch.setenv("GITHUB_SHA", "feedbeef")
    assert provenance.commit() == "feedbeef"


def test_stored_as_a_dict_with_every_fact() -> None:
    facts = provenance.collect(seed=7, device="cpu").to_dict()
    assert set(facts) == {
        "package_version",
        "commit",
        "device",
        "torch_version",
        "date",
        "seed",
        "mode",
    }
    assert json.loads(json.dumps(facts))["seed"] == 7


@pytest.mark.parametrize("path", sorted((ROOT / "chapters").glob("*.ipynb")), ids=lambda p: p.stem)
def test_every_chapter_prints_its_provenance_under_the_banner(
    path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The banner cell, run as written, prints the mode banner, then the provenance."""
    banner_cell = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"][1]
    monkeypatch.setenv(config.QUICK_ENV, "1")
    exec(banner_cell.source, {})
    shown = capsys.readouterr().out
    assert shown.startswith("QUICK MODE") and "Provenance of this run:" in shown
    assert field(shown, "mode") == "quick"
    assert field(shown, "seed") == chapter_seed(path), "the banner must name the chapter's seed"


def chapter_seed(path: Path) -> str:
    """The seed a chapter sets: its first ``torch.manual_seed(N)`` or its ``SEED = ... N``."""
    code = "\n".join(
        c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"
    )
    found = re.search(r"^[\w, ]*\bSEED = .*?(\d+)$", code, re.MULTILINE) or re.search(
        r"torch\.manual_seed\((\d+)\)", code
    )
    assert found, f"{path.name} sets no seed"
    return found.group(1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_a_gpu_is_named_with_its_memory() -> None:
    shown = field(provenance.describe(device="cuda"), "device")
    assert shown.startswith(f"GPU {torch.cuda.get_device_name(0)} (")
    assert f"CUDA {torch.version.cuda}" in shown
