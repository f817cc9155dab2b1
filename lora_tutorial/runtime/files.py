"""Files written whole, their digests, and folders this process can use.

Every file the package writes (downloads, adapters, plots, the command line's outputs) goes
through :func:`atomic_write`, so an interrupted run never leaves a half-written file that looks
like a finished one. :func:`sha256_file` is the one digest of a file's bytes (downloads, data
splits and the command line's results are all checked by it); :func:`folder_problem` says why a
folder cannot take files before anything is written there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary file beside ``path`` to write to; it replaces ``path`` if the block succeeds.

    On any error the temporary file is removed and ``path`` is left as it was. The temporary name
    keeps the suffix (some writers pick the format from it) and is unique, so processes writing at
    once do not collide. The file ends with the permissions of any new file (0o666 minus the
    umask), also where the writer (safetensors, for one) would leave 0o600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.stem}.{secrets.token_hex(8)}.tmp{path.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:  # another writer drew the same name: draw again
            continue
    try:
        mode = stat.S_IMODE(tmp.stat().st_mode)
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes (hex), read a mebibyte at a time: weights run to gigabytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def writable(path: Path) -> bool:
    """A file or folder this process may write (into), and not marked read-only.

    Root may write anything; the read-only mark is respected anyway, as a user who set it means.
    """
    need = os.W_OK | (os.X_OK if path.is_dir() else 0)
    return os.access(path, need) and bool(path.stat().st_mode & stat.S_IWUSR)


def folder_problem(path: str | os.PathLike[str]) -> str | None:
    """Why files cannot be read and written in the folder ``path`` (made if missing), or None.

    Reads only. A folder that does not exist yet is fine if the nearest folder above it that
    exists is writable. As root every folder is writable; its mode bits are respected anyway, so
    that a folder marked read-only stays read-only for the package too.
    """
    path = Path(path)
    existing = next(p for p in [path.absolute(), *path.absolute().parents] if p.exists())
    if not existing.is_dir():
        if existing == path.absolute():
            return f"{path} is a file, not a folder"
        return f"{existing} is a file, so no folder can be made under it"
    if existing != path.absolute():
        if not writable(existing):
            return f"{existing} is not writable, so {path} cannot be made"
        return None
    readable = os.access(path, os.R_OK | os.X_OK) and bool(path.stat().st_mode & stat.S_IRUSR)
    return None if readable and writable(path) else f"{path} cannot be read and written here"
