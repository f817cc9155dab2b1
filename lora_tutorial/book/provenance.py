"""Where a chapter's numbers came from: mode, package version, commit, device, torch, date, seed.

Every chapter starts by printing :func:`header` (:func:`mode_banner`, then :func:`describe`), so
that a reader of an executed notebook (on Colab, on the ``notebooks`` branch) or of the published
page can tell which code on which machine produced the results shown.

The commit is looked up in this order:

1. ``$LORA_TUTORIAL_COMMIT``, for a pipeline that knows better than the checkout;
2. ``git rev-parse HEAD`` when the package lives in a git checkout (an editable install),
   marked "with uncommitted changes" when the checkout differs from that commit;
3. the commit pip recorded when it installed the package from git (``pip install git+URL``,
   as the Colab cell does), read from the installed package's ``direct_url.json``;
4. ``$GITHUB_SHA`` (set on GitHub's runners).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from importlib import metadata

import torch

from lora_tutorial import __version__
from lora_tutorial.runtime import config, rehearsal

COMMIT_ENV = "LORA_TUTORIAL_COMMIT"
DISTRIBUTION = "lora-tutorial"  # the name pip knows the package by (pyproject.toml)
UNKNOWN_COMMIT = "unknown (neither a git checkout nor a pip install from git)"


@dataclass(frozen=True)
class Provenance:
    """The facts that identify a run: :meth:`lines` prints them, :meth:`to_dict` stores them."""

    package_version: str
    commit: str | None
    device: str
    torch_version: str
    date: str  # ISO 8601, UTC, to the second
    seed: int | None
    mode: config.Mode

    def lines(self) -> str:
        """One ``name: value`` line per fact, for the top of a chapter."""
        seed = "not set" if self.seed is None else str(self.seed)
        return "\n".join(
            [
                f"package:   lora-tutorial {self.package_version}",
                f"commit:    {self.commit or UNKNOWN_COMMIT}",
                f"device:    {self.device}",
                f"torch:     {self.torch_version}",
                f"date:      {self.date}",
                f"seed:      {seed}",
                f"mode:      {self.mode}",
            ]
        )

    def to_dict(self) -> dict:
        return asdict(self)


def collect(seed: int | None = None, *, device: torch.device | str | None = None) -> Provenance:
    """The provenance of a run starting now, with ``seed``, on ``device`` (default: the best)."""
    if seed is not None and not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, not {type(seed).__name__}")
    return Provenance(
        package_version=__version__,
        commit=commit(),
        device=describe_device(config.get_device() if device is None else torch.device(device)),
        torch_version=torch.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        seed=seed,
        mode=config.mode(),
    )


def describe(seed: int | None = None, *, device: torch.device | str | None = None) -> str:
    """A few lines saying where the numbers below come from, for the top of every chapter."""
    return "Provenance of this run:\n" + collect(seed, device=device).lines()


def commit() -> str | None:
    """The commit of the code that runs, as a full hash (see the module's docstring), or None."""
    explicit = os.environ.get(COMMIT_ENV, "").strip()
    if explicit:
        return explicit
    return _git_commit() or _pip_vcs_commit() or os.environ.get("GITHUB_SHA", "").strip() or None


def _git(*args: str) -> str | None:
    root = config.repo_root()
    if not (root / ".git").exists():  # an installed copy inside some other checkout is not ours
        return None
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _git_commit() -> str | None:
    head = _git("rev-parse", "HEAD")
    if not head:
        return None
    changes = _git("status", "--porcelain", "--untracked-files=no")
    return f"{head} (with uncommitted changes)" if changes else head


def _pip_vcs_commit() -> str | None:
    try:
        text = metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    if not text:
        return None
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return None
    vcs = info.get("vcs_info") or {}
    commit_id = vcs.get("commit_id")
    return f"{commit_id} ({info.get('url')})" if commit_id else None


def describe_device(device: torch.device) -> str:
    """A GPU's name and memory, or the CPU's model and core count."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return f"GPU {props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    if device.type == "mps":
        return f"Apple GPU (MPS) on {platform.machine()}"
    return f"CPU {cpu_model()} ({os.cpu_count()} cores)"


def cpu_model() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux), or the platform's best guess."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def mode_banner(real_model: str | None = None) -> str:
    """A few lines saying which mode is running, for the top of every chapter.

    ``real_model`` names a pretrained model that runs with its real weights in quick mode too
    (chapter 9's all-MiniLM-L6-v2), instead of GPT-2.
    """
    current = config.mode()
    if real_model is not None:
        return _real_model_banner(current, real_model)
    if current == "quick":
        return (
            f"QUICK MODE ({config.QUICK_ENV}=1): a tiny model and a few steps.\n"
            "The numbers below show that the code runs; they are not the book's full results."
        )
    if current == "rehearsal":
        return (
            f"REHEARSAL MODE ({config.REHEARSAL_ENV}=1): full-mode sizes, but GPT-2 with random "
            "weights\n"
            f"and every training run stopped after {rehearsal.TRAIN_STEPS} steps. "
            "The numbers below are meaningless;\n"
            "the run proves that full mode works here and measures what it costs."
        )
    return (
        "FULL MODE: the real GPT-2 and the full data.\n"
        f"A GPU makes this much faster; on a CPU, set {config.QUICK_ENV}=1 for a quick run."
    )


def _real_model_banner(current: str, model: str) -> str:
    if current == "quick":
        return (
            f"QUICK MODE ({config.QUICK_ENV}=1): {model} with its real weights, trained on fewer "
            "messages,\nepochs and seeds than full mode: real results of a smaller experiment."
        )
    if current == "rehearsal":
        return (
            f"REHEARSAL MODE ({config.REHEARSAL_ENV}=1): full-mode sizes, every training run "
            f"stopped after {rehearsal.TRAIN_STEPS} steps.\nThe numbers below are meaningless; "
            "the run proves that full mode works here and measures what it costs."
        )
    return f"FULL MODE: {model} and the full data."


def header(seed: int | None = None, real_model: str | None = None) -> str:
    """The top of every chapter: which mode runs, then where its numbers come from."""
    return f"{mode_banner(real_model)}\n\n{describe(seed=seed)}"
