"""Atomic file writes: a file appears under its final name complete, or not at all.

Every file the package writes (downloads, adapters, plots, the command line's outputs) goes
through :func:`atomic_write`, so an interrupted run never leaves a half-written file that looks
like a finished one.
"""

from __future__ import annotations

import contextlib
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
