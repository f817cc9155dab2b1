"""Settings read once, here: quick mode, data and cache folders, device choice.

Every chapter, test and script asks this module rather than reading environment
variables itself, so that one switch (``LORA_TUTORIAL_QUICK=1``) changes the whole book.

Environment variables:

- ``LORA_TUTORIAL_QUICK``: ``1`` runs chapters with a tiny model and a few steps.
- ``LORA_TUTORIAL_DATA``: a folder laid out like ``../shared/data`` (offline copies).
- ``LORA_TUTORIAL_CACHE``: where downloads are kept (default ``~/.cache/lora_tutorial``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

QUICK_ENV = "LORA_TUTORIAL_QUICK"
DATA_ENV = "LORA_TUTORIAL_DATA"
CACHE_ENV = "LORA_TUTORIAL_CACHE"

_TRUE = {"1", "true", "yes", "on"}


def is_quick() -> bool:
    """True when ``LORA_TUTORIAL_QUICK`` asks for quick mode (tiny model, few steps)."""
    return os.environ.get(QUICK_ENV, "").strip().lower() in _TRUE


def mode_banner() -> str:
    """One line saying which mode is running, for the top of every chapter."""
    if is_quick():
        return (
            "QUICK MODE (LORA_TUTORIAL_QUICK=1): a tiny model and a few steps.\n"
            "The numbers below show that the code runs; they are not the book's full results."
        )
    return "FULL MODE: the real GPT-2 and the full data.\nA GPU makes this much faster; on a CPU, set LORA_TUTORIAL_QUICK=1 for a quick run."


def repo_root() -> Path:
    """The folder that holds ``lora_tutorial/`` (the repository, for an editable install)."""
    return Path(__file__).resolve().parent.parent


def data_dir() -> Path | None:
    """The folder of offline reference data, or None when there is none.

    Looks at ``$LORA_TUTORIAL_DATA`` first, then at ``../shared/data`` beside the repository.
    """
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{DATA_ENV}={env!r} is not a folder; point it at a data folder or unset it")
        return path
    path = repo_root().parent / "shared" / "data"
    return path if path.is_dir() else None


def shared_file(*parts: str) -> Path | None:
    """A file inside :func:`data_dir`, or None when the folder or the file is missing."""
    root = data_dir()
    if root is None:
        return None
    path = root.joinpath(*parts)
    return path if path.is_file() else None


def cache_dir() -> Path:
    """Where downloads are kept: ``$LORA_TUTORIAL_CACHE`` or ``~/.cache/lora_tutorial``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        path = Path(env).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        path = base / "lora_tutorial"
    path.mkdir(parents=True, exist_ok=True)
    return path


def get_device(prefer: str | None = None) -> torch.device:
    """The best device here: ``prefer`` if given, else CUDA, then Apple MPS, then CPU."""
    if prefer:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
