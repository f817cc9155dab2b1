"""The scripts the publishing workflow calls (.ci/execute-chapter, .ci/rehearsal-report,
.ci/assemble-site), run as CI runs them, on small synthetic notebooks; one real chapter is slow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from lora_tutorial.runtime import config

ROOT = config.repo_root()
CI = ROOT / ".ci"
BANNER_CELL = "from lora_tutorial.book import provenance\n\nprint(provenance.mode_banner())"


def run_script(
    name: str, *args: object, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    for mode_switch in (config.QUICK_ENV, config.REHEARSAL_ENV):
        if env is None or mode_switch not in env:
            environment.pop(mode_switch, None)
    return subprocess.run(
        [sys.executable, str(CI / name), *map(str, args)],
        capture_output=True,
        text=True,
        env=environment,
        cwd=ROOT,
        timeout=timeout,
    )


def notebook(path: Path, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 1. A synthetic chapter")]
    nb.cells += [nbformat.v4.new_code_cell(source) for source in cells]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, path)
    return path


def record_run(elapsed: float, projected: float) -> str:
    """A cell doing what train.py does after a training run: append one line to the record."""
    line = {
        "mode": "rehearsal",
        "steps_done": 2,
        "full_steps": 200,
        "median_step_seconds": elapsed / 2,
        "projected_full_seconds": projected,
        "elapsed_seconds": elapsed,
        "peak_rss_bytes": 1000,
        "cuda_peak_bytes": None,
        "device": "cpu",
    }
    return (
        "import json, os\n"
        "with open(os.environ['LORA_TUTORIAL_RECORD'], 'a') as f:\n"
        f"    f.write(json.dumps({line!r}) + '\\n')"
    )


def test_usage_lines() -> None:
    names = (
        "execute-chapter",
        "assemble-site",
        "rehearsal-report",
        "set-repository-url",
        "translate-notebooks",
        "export-executed",
    )
    for name in names:
        assert os.access(CI / name, os.X_OK), f".ci/{name} is not executable"
        shown = run_script(name, "--help")
        assert shown.returncode == 0 and "usage:" in shown.stdout, name


def test_quick_chapter_is_executed_and_recorded(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    chapter = notebook(
        tmp_path / "src" / "01_demo.ipynb",
        BANNER_CELL,
        "import os\nprint('ran in', os.path.basename(os.getcwd()))\nbig = bytearray(300 * 2**20)",
    )
    out = tmp_path / "out"
    done = run_script("execute-chapter", chapter, out, env={config.QUICK_ENV: "1"})
    assert done.returncode == 0, done.stderr
    executed = nbformat.read(out / "01_demo.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells[1:] for o in c.outputs)
    assert "QUICK MODE" in printed and "ran in src" in printed  # runs in the chapter's folder
    summary = json.loads((out / "01_demo.json").read_text())
    assert summary["mode"] == "quick" and summary["ok"] is True
    assert summary["wall_seconds"] > 0 and summary["projected_full_seconds"] is None
    assert summary["kernel_peak_rss_bytes"] > 300 * 2**20  # the kernel held the 300 MiB
    assert summary["training_runs"] == 0
    assert not list(out.glob(".*tmp*")), "a temporary file was left behind"


def test_rehearsal_projects_full_mode_from_the_training_records(tmp_path: Path) -> None:
    chapter = notebook(
        tmp_path / "05_demo.ipynb",
        BANNER_CELL,
        record_run(elapsed=1.5, projected=300.0),
        record_run(elapsed=0.5, projected=100.0),
        'print(f"{124439808:,} parameters")',
    )
    out = tmp_path / "out"
    done = run_script(
        "execute-chapter", chapter, out, "--require-param-count", env={config.REHEARSAL_ENV: "1"}
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "05_demo.json").read_text())
    assert summary["mode"] == "rehearsal" and summary["training_runs"] == 2
    assert summary["training_elapsed_seconds"] == pytest.approx(2.0)
    assert summary["projected_full_seconds"] == pytest.approx(
        summary["wall_seconds"] - 2.0 + 400.0, abs=0.01
    )
    lines = (out / "05_demo.runs.jsonl").read_text().splitlines()
    assert [json.loads(line)["projected_full_seconds"] for line in lines] == [300.0, 100.0]

    report = run_script("rehearsal-report", out)
    assert report.returncode == 0, report.stderr
    row = next(line for line in report.stdout.splitlines() if line.startswith("| 05_demo "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["rehearsal", "ok"]
    assert cells[5] == "2"
    assert cells[6].endswith("s") and "min" in cells[6]  # about 400 s: "6 min 4x s"


def test_a_missing_parameter_count_fails_only_when_required(tmp_path: Path) -> None:
    # A chapter that loads GPT-2 must show its size; one that never loads it (chapter 1's byte
    # model, chapter 2's arithmetic) has no GPT-2 count to show.
    loads = "load_gpt2 = None  # stands for a chapter that loads GPT-2\nprint('no count here')"
    chapter = notebook(tmp_path / "05_demo.ipynb", BANNER_CELL, loads)
    rehearsal = {config.REHEARSAL_ENV: "1"}
    failed = run_script(
        "execute-chapter", chapter, tmp_path / "a", "--require-param-count", env=rehearsal
    )
    assert failed.returncode == 1 and "124,439,808" in failed.stderr
    assert not (tmp_path / "a" / "05_demo.ipynb").exists()
    assert run_script("execute-chapter", chapter, tmp_path / "b", env=rehearsal).returncode == 0
    no_gpt2 = notebook(tmp_path / "02_demo.ipynb", BANNER_CELL, "print('no count here')")
    required = run_script(
        "execute-chapter", no_gpt2, tmp_path / "c", "--require-param-count", env=rehearsal
    )
    assert required.returncode == 0, required.stderr


def test_a_cell_that_raises_fails_and_keeps_the_partial_notebook(tmp_path: Path) -> None:
    chapter = notebook(
        tmp_path / "03_demo.ipynb", BANNER_CELL, "raise ValueError('shape mismatch')"
    )
    out = tmp_path / "out"
    done = run_script("execute-chapter", chapter, out, env={config.QUICK_ENV: "1"})
    assert done.returncode == 1
    assert "shape mismatch" in done.stderr
    assert not (out / "03_demo.ipynb").exists(), "a failed chapter must not look executed"
    assert (out / "03_demo.failed.ipynb").is_file()
    assert json.loads((out / "03_demo.json").read_text())["ok"] is False
    report = run_script("rehearsal-report", out)
    assert report.returncode == 1 and "| 03_demo | quick | FAILED |" in report.stdout


def test_a_kernel_that_dies_is_a_recorded_failure(tmp_path: Path) -> None:
    chapter = notebook(tmp_path / "07_demo.ipynb", BANNER_CELL, "import os\nos._exit(1)")
    out = tmp_path / "out"
    done = run_script("execute-chapter", chapter, out, env={config.QUICK_ENV: "1"})
    assert done.returncode == 1 and "the kernel died" in done.stderr
    assert json.loads((out / "07_demo.json").read_text())["ok"] is False


def test_a_chapter_without_the_mode_banner_fails(tmp_path: Path) -> None:
    chapter = notebook(tmp_path / "04_demo.ipynb", "print('hello')")
    done = run_script("execute-chapter", chapter, tmp_path / "out", env={config.QUICK_ENV: "1"})
    assert done.returncode == 1 and "QUICK MODE" in done.stderr


def test_a_cell_past_its_timeout_fails(tmp_path: Path) -> None:
    chapter = notebook(tmp_path / "06_demo.ipynb", BANNER_CELL, "import time\ntime.sleep(60)")
    done = run_script(
        "execute-chapter", chapter, tmp_path / "out", "--timeout", "3", env={config.QUICK_ENV: "1"}
    )
    assert done.returncode == 1 and "longer than 3 s" in done.stderr


def test_report_of_an_empty_folder_fails(tmp_path: Path) -> None:
    done = run_script("rehearsal-report", tmp_path)
    assert done.returncode == 1 and "no chapter records" in done.stderr


# --- assembling a site from executed notebooks -------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_book(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with the real book configuration and one chapter whose code must not run."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(ROOT / "book", root / "book")
    (root / "book" / "_toc.yml").write_text(
        "format: jb-book\nroot: book/intro\nchapters:\n  - file: chapters/01_demo\n"
    )
    (root / "book" / "intro.md").write_text("# A synthetic book\n\nThe front page.\n")
    (root / "chapters").mkdir()
    marker = root / "EXECUTED"
    source = f"open({str(marker)!r}, 'w').close()\nraise RuntimeError('this cell was executed')"
    notebook(root / "chapters" / "01_demo.ipynb", source)
    return root


def executed_copy(book: Path, folder: Path) -> Path:
    """The chapter as a pipeline would have left it: same code, with a stored output."""
    folder.mkdir(exist_ok=True)
    nb = nbformat.read(book / "chapters" / "01_demo.ipynb", as_version=4)
    nb.cells[1].outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="stored result 42\n")
    ]
    nb.cells[1].execution_count = 1
    nbformat.write(nb, folder / "01_demo.ipynb")
    return folder


def test_site_is_assembled_from_stored_outputs_without_executing(
    synthetic_book: Path, tmp_path: Path
) -> None:
    executed = executed_copy(synthetic_book, tmp_path / "executed")
    out = tmp_path / "site"
    done = run_script(
        "assemble-site",
        executed,
        "--root",
        synthetic_book,
        "--out",
        out,
        "--launch-branch",
        "notebooks",
        "--repository-url",
        "https://github.com/someone/fork",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (synthetic_book / "EXECUTED").exists(), "a cell was executed"
    page = (out / "_build" / "html" / "chapters" / "01_demo.html").read_text()
    assert "stored result 42" in page
    assert "this cell was executed" in page  # the code is shown…
    assert "Traceback" not in page  # …but never ran
    # Colab opens the executed copy, in the repository the workflow runs in
    assert "github/someone/fork/blob/notebooks/chapters/01_demo.ipynb" in page
    assert (synthetic_book / "book" / "_config.yml").read_text() == (
        ROOT / "book" / "_config.yml"
    ).read_text(), "the repository's configuration must stay as it was"
    assert [p.name for p in out.iterdir()] == ["_build"], "temporary folders were left behind"


def test_a_chapter_without_an_executed_copy_is_refused(
    synthetic_book: Path, tmp_path: Path
) -> None:
    (tmp_path / "executed").mkdir()
    done = run_script(
        "assemble-site", tmp_path / "executed", "--root", synthetic_book, "--out", tmp_path
    )
    assert done.returncode != 0 and "has no executed copy" in done.stderr
    unexecuted = tmp_path / "unexecuted"
    unexecuted.mkdir()
    shutil.copy(synthetic_book / "chapters" / "01_demo.ipynb", unexecuted)
    done = run_script("assemble-site", unexecuted, "--root", synthetic_book, "--out", tmp_path)
    assert done.returncode != 0 and "has no outputs" in done.stderr
    assert not (tmp_path / "_build").exists()


@pytest.mark.slow
def test_a_real_chapter_in_quick_mode(tmp_path: Path) -> None:
    done = run_script(
        "execute-chapter",
        ROOT / "chapters" / "04_spam_data.ipynb",  # the quickest chapter
        tmp_path,
        env={config.QUICK_ENV: "1"},
        timeout=3600,  # minutes alone; far longer on a machine shared by many builds
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "04_spam_data.json").read_text())
    assert summary["ok"] and summary["mode"] == "quick" and summary["peak_rss_bytes"] > 0
    text = (tmp_path / "04_spam_data.ipynb").read_text()
    assert "Provenance of this run" in text and "QUICK MODE" in text


# --- the repository URL, set in one place ----------------------------------------------------


@pytest.fixture
def fork(tmp_path: Path) -> Path:
    """A copy of the repository's book configuration, pyproject.toml and chapters."""
    root = tmp_path / "fork"
    (root / "book").mkdir(parents=True)
    shutil.copy(ROOT / "book" / "_config.yml", root / "book")
    shutil.copy(ROOT / "pyproject.toml", root)
    shutil.copytree(ROOT / "chapters", root / "chapters")
    return root


def test_a_fork_sets_its_url_once_and_every_copy_follows(fork: Path) -> None:
    old = yaml.safe_load((ROOT / "book" / "_config.yml").read_text())["repository"]["url"]
    new = "https://github.com/someone/lora-tutorial-fork"
    done = run_script("set-repository-url", new + ".git", "--root", fork)
    assert done.returncode == 0, done.stderr
    book_config = (fork / "book" / "_config.yml").read_text()
    assert yaml.safe_load(book_config)["repository"]["url"] == new
    assert book_config.replace(new, old) == (ROOT / "book" / "_config.yml").read_text()
    assert f'Homepage = "{new}"' in (fork / "pyproject.toml").read_text()
    for chapter in sorted(fork.glob("chapters/*.ipynb")):
        original = (ROOT / "chapters" / chapter.name).read_text()
        assert chapter.read_text() == original.replace(f"git+{old}", f"git+{new}"), chapter.name
        first_code = next(c for c in nbformat.read(chapter, 4).cells if c.cell_type == "code")
        assert f'"lora-tutorial @ git+{new}"' in first_code.source


def test_executed_notebooks_are_pinned_to_the_commit_that_made_them(fork: Path) -> None:
    chapter = fork / "chapters" / "01_low_rank.ipynb"
    url, sha = "https://github.com/someone/fork", "0123456789abcdef0123456789abcdef01234567"
    done = run_script("set-repository-url", url, "--commit", sha, chapter, "--root", fork)
    assert done.returncode == 0, done.stderr
    first_code = next(c for c in nbformat.read(chapter, 4).cells if c.cell_type == "code")
    assert f'"lora-tutorial @ git+{url}@{sha}"' in first_code.source
    assert (fork / "book" / "_config.yml").read_text() == (
        ROOT / "book" / "_config.yml"
    ).read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["http://github.com/a/b"], "is not an https address"),
        (["https://github.com/a/b", "--commit", "abc1234"], "go together"),
        (["https://github.com/a/b", "--commit", "main", "x.ipynb"], "is not a commit hash"),
    ],
)
def test_bad_repository_arguments_are_refused(fork: Path, args: list[str], message: str) -> None:
    done = run_script("set-repository-url", *args, "--root", fork)
    assert done.returncode == 2 and message in done.stderr
    assert (fork / "book" / "_config.yml").read_text() == (
        ROOT / "book" / "_config.yml"
    ).read_text()


def test_translated_notebooks_keep_code_and_outputs_and_refuse_to_overwrite(
    tmp_path: Path,
) -> None:
    executed = tmp_path / "executed"
    executed.mkdir()
    for chapter in (ROOT / "chapters").glob("*.ipynb"):
        nb = nbformat.read(chapter, as_version=4)
        first_code = next(c for c in nb.cells if c.cell_type == "code")
        first_code.outputs = [nbformat.v4.new_output("stream", text="an output\n")]
        nbformat.write(nb, executed / chapter.name)
    done = run_script("translate-notebooks", executed, tmp_path / "fr", "--lang", "fr")
    assert done.returncode == 0, done.stderr
    english = nbformat.read(executed / "05_finetune_gpt2.ipynb", as_version=4)
    french = nbformat.read(tmp_path / "fr" / "05_finetune_gpt2.ipynb", as_version=4)
    assert [c.source for c in english.cells if c.cell_type == "code"] == [
        c.source for c in french.cells if c.cell_type == "code"
    ]
    assert [c.get("outputs") for c in english.cells] == [c.get("outputs") for c in french.cells]
    assert "Ajustement fin" in french.cells[0].source
    again = run_script("translate-notebooks", executed, tmp_path / "fr", "--lang", "fr")
    assert again.returncode != 0 and "exists" in again.stderr
