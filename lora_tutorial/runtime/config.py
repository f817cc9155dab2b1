"""Settings read once, here: the mode (quick / rehearsal / full), data and cache folders, device.

Every chapter, test and script asks this module rather than reading environment variables
itself, so that one switch changes the whole book.

The three modes run one code path:

- **full** (the default): the real GPT-2 and the full data: the book's results.
- **quick** (``LORA_TUTORIAL_QUICK=1``): a tiny model and a few steps, in seconds on a CPU.
- **rehearsal** (``LORA_TUTORIAL_REHEARSAL=1``): every full-mode cell at full size, but GPT-2's
  architecture with random weights and each training run stopped after a few steps. It proves
  that full mode runs and measures what it costs; its accuracies mean nothing.

Environment variables:

- ``LORA_TUTORIAL_QUICK``, ``LORA_TUTORIAL_REHEARSAL``: ``1`` (or ``true``/``yes``/``on``) turns
  the mode on, ``0`` (or ``false``/``no``/``off``/empty) leaves it off; anything else is an error.
- ``LORA_TUTORIAL_DATA``: a folder laid out like ``../shared/data`` (offline copies).
- ``LORA_TUTORIAL_CACHE``: where downloads are kept (default ``~/.cache/lora_tutorial``); a file,
  or a folder this user cannot read and write, is an error.
- ``LORA_TUTORIAL_RECORD``: a file to which every training run appends one JSON line of timings
  (see :mod:`lora_tutorial.runtime.rehearsal`); unset, nothing is recorded. A folder, or a file
  that cannot be written, is an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch

from lora_tutorial.runtime import files

QUICK_ENV = "LORA_TUTORIAL_QUICK"
REHEARSAL_ENV = "LORA_TUTORIAL_REHEARSAL"
DATA_ENV = "LORA_TUTORIAL_DATA"
CACHE_ENV = "LORA_TUTORIAL_CACHE"
RECORD_ENV = "LORA_TUTORIAL_RECORD"

Mode = Literal["full", "quick", "rehearsal"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def _flag(name: str) -> bool:
    """The on/off environment variable ``name``; a value that is neither is an error, not "off"."""
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"{name}={os.environ[name]!r} is not understood; set it to 1 to turn the mode on "
        "or 0 (or leave it unset) to turn it off"
    )


def mode() -> Mode:
    """Which mode runs: ``"quick"``, ``"rehearsal"`` or ``"full"``; both switches on is an error."""
    quick, rehearsal = _flag(QUICK_ENV), _flag(REHEARSAL_ENV)
    if quick and rehearsal:
        raise ValueError(f"{QUICK_ENV} and {REHEARSAL_ENV} are both on; choose one mode")
    return "quick" if quick else "rehearsal" if rehearsal else "full"


def is_quick() -> bool:
    """True in quick mode (tiny model, few steps)."""
    return mode() == "quick"


def is_rehearsal() -> bool:
    """True in rehearsal mode (full sizes, random weights, a few steps)."""
    return mode() == "rehearsal"


def repo_root() -> Path:
    """The folder that holds ``lora_tutorial/`` (the repository, for an editable install)."""
    return Path(__file__).resolve().parents[2]


def data_dir() -> Path | None:
    """The folder of offline reference data, or None when there is none.

    Looks at ``$LORA_TUTORIAL_DATA`` first, then at ``../shared/data`` beside the repository.
    """
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"{DATA_ENV}={env!r} is not a folder; point it at a data folder or unset it"
            )
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


def bundled_file(*parts: str) -> Path | None:
    """A copy shipped inside the package (``lora_tutorial/bundled``), or None when it is missing.

    The package carries the SMS Spam Collection and GPT-2's BPE files, laid out like
    :func:`data_dir`, so that quick mode and the tests need neither a download nor a data folder.
    """
    path = Path(__file__).resolve().parents[1].joinpath("bundled", *parts)
    return path if path.is_file() else None


def record_path() -> Path | None:
    """The file training runs append their timing records to: ``$LORA_TUTORIAL_RECORD`` or None.

    A value that cannot name such a file (a folder, a file in a folder that does not exist or
    cannot be written) is a ValueError that says so, before any run has to find out.
    """
    env = os.environ.get(RECORD_ENV, "").strip()
    if not env:
        return None
    path = Path(env).expanduser()
    problem = None
    if path.is_dir():
        problem = "is a folder; name a file (it is created if missing)"
    elif not path.parent.is_dir():
        problem = f"is in {path.parent}, which is no folder; make that folder first"
    elif not files.writable(path if path.exists() else path.parent):
        problem = f"cannot be written by this user ({path if path.exists() else path.parent})"
    if problem:
        raise ValueError(f"{RECORD_ENV}={env!r} {problem}, or unset {RECORD_ENV}")
    return path


def cache_dir(*, create: bool = True) -> Path:
    """Where downloads are kept: ``$LORA_TUTORIAL_CACHE`` or ``~/.cache/lora_tutorial``.

    The folder is made unless ``create`` is False. One that is a file, or that this user cannot
    read and write, is a ValueError naming the folder and the variable to change.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        path = Path(env).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        path = base / "lora_tutorial"
    problem = files.folder_problem(path)
    if problem:
        where = f"{CACHE_ENV}={env!r}" if env else "the cache folder"
        raise ValueError(f"{where}: {problem}; point {CACHE_ENV} at a folder you can write to")
    if create:
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
