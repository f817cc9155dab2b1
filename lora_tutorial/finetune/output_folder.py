"""A run's output folder, written as a unit: all of the new results, or the old ones untouched.

The rule the command line follows (and this module enforces):

- ``--output-dir`` must be a folder that does not exist yet, an empty folder, or a folder that
  holds exactly the files a previous run wrote, as listed (with their sha256) in its
  ``manifest.json``. Any other file there is the user's: the run is refused before it starts,
  naming that file, and nothing in the folder is touched. Since a run replaces the folder whole,
  it may not be (or hold) the current folder, nor hold a folder the run reads or writes
  elsewhere (the cache, the data): those are refused before the run starts too.
- One run at a time writes to a folder: a run holds a lock (``fcntl.flock`` on ``.NAME.lock``
  beside the folder, removed when the run ends); a second run is refused while the first lasts.
- A run writes its files into a hidden temporary folder beside the destination
  (``.NAME.partial-PID-XXXX``, PID: the run's process); only when every file is written does it
  add ``manifest.json`` and swap that folder into place (the previous results pass through
  ``.NAME.old-PID-XXXX`` for an instant). An interrupted or failed run removes its temporary
  folder and leaves the previous results as they were; a finished run never leaves old and new
  files mixed. A run killed outright (``kill -9``, a power cut) cannot clean up: the next run into
  the same folder removes what such a run left, or puts the previous results back in place if
  it was killed in the middle of the swap.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from lora_tutorial.runtime.files import atomic_write, sha256_file, writable

try:
    import fcntl
except ImportError:  # Windows: no flock; runs into one folder are then not kept apart
    fcntl = None  # type: ignore[assignment]

MANIFEST = "manifest.json"
WRITTEN_BY = "lora_tutorial.finetune"
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


class OutputFolderError(ValueError):
    """The output folder cannot take a run's results; the message says why and what to do."""


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


def check(folder: Path, keep: Mapping[str, Path] | None = None) -> None:
    """Raise :class:`OutputFolderError` unless a run may write its results to ``folder``.

    ``keep`` names the paths the run uses elsewhere (``{"the cache folder": path}``): the
    output folder may not be or hold any of them, nor the current folder. Reads only; nothing is
    created. See the module's docstring for the rule.
    """
    folder = Path(folder)
    _check_keeps_clear(folder, keep or {})
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
        if not writable(path):
            raise OutputFolderError(f"{path} is not writable; choose another --output-dir")
    if not folder.exists():
        return
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return
    listed = _previous_run(folder) or {}
    for name in names:
        path = folder / name
        if name != MANIFEST and (not path.is_file() or listed.get(name) != sha256_file(path)):
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


def _check_keeps_clear(folder: Path, keep: Mapping[str, Path]) -> None:
    """Refuse an output folder that is or holds the current folder or one of ``keep``'s paths."""
    target = folder.resolve()
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        raise OutputFolderError(
            f"{folder} is the current folder or holds it, and a run replaces its output folder "
            "whole; name a new folder, e.g. --output-dir finetune-output"
        )
    for what, path in keep.items():
        if path.resolve() == target or target in path.resolve().parents:
            raise OutputFolderError(
                f"{folder} holds {what}, {path}, and a run replaces its output folder whole; "
                "choose another --output-dir"
            )


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP back for a few lines, so a swap is never cut in half.

    A signal that arrives meanwhile is raised again afterwards, to whatever handled it before.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: object) -> None:
        received.append(signum)

    previous = {signum: signal.signal(signum, hold) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    if received:
        signal.raise_signal(received[0])


def _alive(pid: int) -> bool:
    """True while process ``pid`` exists (also one of another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock(destination: Path) -> tuple[int, Path] | None:
    """Take ``.NAME.lock`` beside ``destination``: its file and path; OutputFolderError if held."""
    if fcntl is None:
        return None
    path = destination.parent / f".{destination.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputFolderError(
                f"another run (process {owner}) is writing to {destination}; wait until it "
                "ends or choose another --output-dir"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:  # the run before removed the file as this one locked it
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd, path
        os.close(fd)


def _unlock(lock: tuple[int, Path] | None) -> None:
    if lock is not None:
        fd, path = lock
        path.unlink(missing_ok=True)  # before closing: a run waiting on this file then retries
        os.close(fd)


def _remove_stale(destination: Path) -> None:
    """Remove what killed runs left beside ``destination``; put interrupted swaps back.

    Called with the lock held: a hidden folder of a process that no longer exists is no run's.
    """
    pattern = re.compile(re.escape(f".{destination.name}.") + r"(partial|old)-(\d+)-.+")
    for path in sorted(destination.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if not match or not path.is_dir() or path.is_symlink() or _alive(int(match[2])):
            continue
        if match[1] == "old" and not destination.exists():
            os.rename(path, destination)  # killed mid-swap: the previous results come back
        else:
            shutil.rmtree(path, ignore_errors=True)


class OutputFolder:
    """A temporary folder beside ``destination`` to write results into; :meth:`commit` moves it.

    Use it as a context manager: leaving the block without :meth:`commit` (an error, Ctrl-C)
    removes the temporary folder and leaves ``destination`` as it was. From creation to the end
    of the block it holds the folder's lock.
    """

    def __init__(self, destination: Path) -> None:
        self.destination = Path(destination)
        check(self.destination)
        self.destination.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.destination)
        try:
            _remove_stale(self.destination)
            check(self.destination)  # what came back from an interrupted swap, or arrived since
            prefix = f".{self.destination.name}.partial-{os.getpid()}-"
            self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.destination.parent))
        except BaseException:
            _unlock(self._lock)
            raise

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            shutil.rmtree(self.path, ignore_errors=True)
        finally:
            _unlock(self._lock)
            self._lock = None

    def commit(self) -> Path:
        """List the files in ``manifest.json`` and put the folder in place of ``destination``."""
        check(self.destination)  # nothing of the user's arrived there while the run trained
        files = {p.name: sha256_file(p) for p in sorted(self.path.iterdir()) if p.name != MANIFEST}
        with atomic_write(self.path / MANIFEST) as tmp:
            tmp.write_text(json.dumps({"written_by": WRITTEN_BY, "files": files}, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o777 & ~umask)  # mkdtemp made it private
        old = self.path.with_name(self.path.name.replace(".partial-", ".old-"))
        with _signals_deferred():
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
