"""A run's output folder, written as a unit: all of the new results, or the old ones untouched.

The rule the command line follows (and this module enforces):

- ``--output-dir`` must be a folder that does not exist yet, an empty folder, or a folder that
  holds exactly the files a previous run wrote, as listed (with their sha256) in its
  ``manifest.json``. Any other file there is the user's: the run is refused before it starts,
  naming that file, and nothing in the folder is touched.
- A run writes its files into a hidden temporary folder beside the destination
  (``.NAME.partial-XXXX``); only when every file is written does it add ``manifest.json`` and
  swap that folder into place. An interrupted or failed run removes its temporary folder and
  leaves the previous results as they were; a finished run never leaves old and new files mixed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from lora_tutorial.runtime.files import atomic_write

MANIFEST = "manifest.json"
WRITTEN_BY = "lora_tutorial.finetune"


class OutputFolderError(ValueError):
    """The output folder cannot take a run's results; the message says why and what to do."""


def _sha256(path: Path) -> str:
    """The file's sha256, read in pieces (full fine-tuning of gpt2-xl writes gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _previous_run(folder: Path) -> dict[str, str] | None:
    """The files a previous run listed in ``folder``'s manifest; None when there is no such list."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest["written_by"] == WRITTEN_BY and isinstance(files, dict):
            return {str(name): str(sha) for name, sha in files.items()}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def check(folder: Path) -> None:
    """Raise :class:`OutputFolderError` unless a run may write its results to ``folder``.

    Reads only; nothing is created. See the module's docstring for the rule.
    """
    folder = Path(folder)
    for parent in folder.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise OutputFolderError(f"{parent} is a file, so no folder can be made under it")
    if folder.is_symlink():
        raise OutputFolderError(f"{folder} is a symbolic link; give the folder it points to")
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"{folder} is a file, not a folder; choose another --output-dir")
    target = folder.absolute()
    existing = next(p for p in [target, *target.parents] if p.exists())
    for path in (existing, target.parent) if existing == target else (existing,):
        if not _writable(path):
            raise OutputFolderError(f"{path} is not writable; choose another --output-dir")
    if not folder.exists():
        return
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return
    listed = _previous_run(folder) or {}
    for name in names:
        path = folder / name
        if name != MANIFEST and (not path.is_file() or listed.get(name) != _sha256(path)):
            raise OutputFolderError(
                f"{folder} holds {name}, which no previous run wrote there (or it was changed "
                f"since). A run only replaces its own results, listed in {MANIFEST}: choose an "
                "empty or new --output-dir, or move that file away"
            )
    if not listed:
        raise OutputFolderError(
            f"{folder}/{MANIFEST} was not written by a previous run; move it away or choose "
            "another --output-dir"
        )


def _writable(path: Path) -> bool:
    """Writable by this process, and not marked read-only (respected even when running as root)."""
    return os.access(path, os.W_OK | os.X_OK) and bool(path.stat().st_mode & stat.S_IWUSR)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C back for a few lines, so a swap of two folders is never cut in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


class OutputFolder:
    """A temporary folder beside ``destination`` to write results into; :meth:`commit` moves it.

    Use it as a context manager: leaving the block without :meth:`commit` (an error, Ctrl-C)
    removes the temporary folder and leaves ``destination`` as it was.
    """

    def __init__(self, destination: Path) -> None:
        self.destination = Path(destination)
        check(self.destination)
        self.destination.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{self.destination.name}.partial-"
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.destination.parent))

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def commit(self) -> Path:
        """List the files in ``manifest.json`` and put the folder in place of ``destination``."""
        check(self.destination)  # nothing of the user's arrived there while the run trained
        files = {p.name: _sha256(p) for p in sorted(self.path.iterdir()) if p.name != MANIFEST}
        with atomic_write(self.path / MANIFEST) as tmp:
            tmp.write_text(json.dumps({"written_by": WRITTEN_BY, "files": files}, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o777 & ~umask)  # mkdtemp made it private
        old = self.path.with_name(self.path.name.replace(".partial-", ".old-"))
        with _sigint_deferred():
            if self.destination.exists():
                os.rename(self.destination, old)
            try:
                os.rename(self.path, self.destination)
            except BaseException:
                if old.exists():
                    os.rename(old, self.destination)
                raise
        shutil.rmtree(old, ignore_errors=True)
        return self.destination
