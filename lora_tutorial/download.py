"""Verified, atomic, cached downloads of the few files the book needs.

Every file the package may download is listed in :data:`KNOWN_FILES` with its https
address, expected size in bytes and SHA-256 digest. :func:`fetch` writes to a temporary
file next to its final place, checks size and digest, and only then renames it, so an
interrupted, truncated or corrupted download never looks like a finished one.

Files are kept in :func:`lora_tutorial.config.cache_dir` (``$LORA_TUTORIAL_CACHE``, by
default ``~/.cache/lora_tutorial``). Without internet, place a file there by hand under
its ``filename``; :func:`fetch` then uses it after checking its size.

``LORA_TUTORIAL_MIRROR=https://host/path`` makes :func:`fetch` get ``{mirror}/{filename}``
instead of the known address (plain ``http`` is accepted only for a loopback host,
which is how the tests serve files).
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from lora_tutorial import config
from lora_tutorial.files import atomic_write

MIRROR_ENV = "LORA_TUTORIAL_MIRROR"
_CHUNK = 1 << 20  # 1 MiB per read keeps memory flat for multi-GB files
_TIMEOUT_S = 60.0


class DownloadError(RuntimeError):
    """A download failed; the message says what happened and how to supply the file by hand."""


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file: where it lives, what to call it locally, and how to verify it.

    ``size`` (bytes) and ``sha256`` (lower-case hex) may be None where no published value
    is known; :func:`fetch` then checks what it can (see its docstring).
    """

    url: str
    filename: str
    size: int | None
    sha256: str | None


def _hf_gpt2(repo: str, filename: str, size: int | None, sha256: str | None) -> RemoteFile:
    url = f"https://huggingface.co/openai-community/{repo}/resolve/main/model.safetensors"
    return RemoteFile(url=url, filename=filename, size=size, sha256=sha256)


# Sizes and digests of the files as published (Hugging Face lists them for each Git LFS
# object). For gpt2-medium, gpt2-large and gpt2-xl no published value could be confirmed
# while writing this, so both are None: fetch() then checks only that it received the
# length the server announced. Fill them in from the model pages to verify those too.
KNOWN_FILES: dict[str, RemoteFile] = {
    "gpt2-small": _hf_gpt2(
        "gpt2",
        "gpt2-small.safetensors",
        548_105_171,
        "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707",
    ),
    "gpt2-medium": _hf_gpt2("gpt2-medium", "gpt2-medium.safetensors", None, None),
    "gpt2-large": _hf_gpt2("gpt2-large", "gpt2-large.safetensors", None, None),
    "gpt2-xl": _hf_gpt2("gpt2-xl", "gpt2-xl.safetensors", None, None),
    "sms-spam-zip": RemoteFile(
        url="https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
        filename="sms+spam+collection.zip",
        size=203_415,
        sha256="1587ea43e58e82b14ff1f5425c88e17f8496bfcdb67a583dbff9eefaf9963ce3",
    ),
}


def fetch(
    name_or_file: str | RemoteFile, *, cache_dir: Path | None = None, progress: bool = True
) -> Path:
    """Return the local path of a known file, downloading and verifying it on first use.

    ``name_or_file`` is a key of :data:`KNOWN_FILES` or one of its values. ``cache_dir``
    overrides :func:`config.cache_dir`. A file already in the cache is used when its size
    matches (a cheap check); a fresh download must match both the expected size and the
    SHA-256 digest where these are known, and, where both are unknown, at least the
    length the server announced. Raises :class:`DownloadError` on any failure, leaving
    no partial file behind.
    """
    remote = _resolve(name_or_file)
    folder = Path(cache_dir) if cache_dir is not None else config.cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / remote.filename
    if dest.is_file() and (remote.size is None or dest.stat().st_size == remote.size):
        return dest
    url = _source_url(remote)
    _download(url, remote, dest, progress=progress)
    return dest


def _resolve(name_or_file: str | RemoteFile) -> RemoteFile:
    if isinstance(name_or_file, str):
        if name_or_file not in KNOWN_FILES:
            raise ValueError(
                f"unknown file {name_or_file!r}; known files: {', '.join(sorted(KNOWN_FILES))}"
            )
        remote = KNOWN_FILES[name_or_file]
    elif isinstance(name_or_file, RemoteFile):
        if name_or_file not in KNOWN_FILES.values():
            raise ValueError(
                f"{name_or_file.url!r} is not in download.KNOWN_FILES; only listed files are fetched "
                "(add an entry with its size and sha256 to fetch another file)"
            )
        remote = name_or_file
    else:
        raise TypeError(
            f"fetch() takes a KNOWN_FILES key or a RemoteFile, not {type(name_or_file).__name__}"
        )
    if urllib.parse.urlsplit(remote.url).scheme != "https":
        raise ValueError(f"refusing to fetch {remote.url!r}: only https addresses are allowed")
    if Path(remote.filename).name != remote.filename or remote.filename in {"", ".", ".."}:
        raise ValueError(f"filename {remote.filename!r} must be a plain file name, not a path")
    return remote


def _source_url(remote: RemoteFile) -> str:
    """The known https address, or ``{mirror}/{filename}`` when a mirror is configured."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return remote.url
    parts = urllib.parse.urlsplit(mirror)
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError(
            f"{MIRROR_ENV}={mirror!r} uses plain http for a non-loopback host; "
            "use https (http is allowed only for 127.0.0.1/localhost)"
        )
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(
            f"{MIRROR_ENV}={mirror!r} is not an http(s) base address like https://example.org/files"
        )
    return f"{mirror.rstrip('/')}/{urllib.parse.quote(remote.filename)}"


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects (Hugging Face sends downloads to its CDN), but never to plain http."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        parts = urllib.parse.urlsplit(newurl)
        if parts.scheme != "https" and not (
            parts.scheme == "http" and _is_loopback(parts.hostname)
        ):
            raise DownloadError(
                f"{req.full_url} redirected to {newurl!r}, which is not https; refusing to follow."
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _how_to_supply(remote: RemoteFile, dest: Path) -> str:
    checks = []
    if remote.size is not None:
        checks.append(f"{remote.size:,} bytes")
    if remote.sha256 is not None:
        checks.append(f"sha256 {remote.sha256}")
    expected = f" ({', '.join(checks)})" if checks else ""
    return (
        f"To supply it by hand, download {remote.url}{expected} on a machine with internet and save it as "
        f"{dest} (or point {config.CACHE_ENV} at a folder that holds {remote.filename!r}, "
        f"or {MIRROR_ENV} at a server that serves it)."
    )


# tiktoken names its cache files by the SHA-1 of the URL it would download.
TIKTOKEN_GPT2_FILES = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


def use_offline_tiktoken(cache: Path | None = None) -> Path | None:
    """Let ``tiktoken.get_encoding("gpt2")`` work offline from the local BPE files.

    Copies ``gpt2-bpe/{vocab.bpe,encoder.json}`` from :func:`config.data_dir` into a cache folder
    under the names tiktoken looks for and sets ``TIKTOKEN_CACHE_DIR``. Returns that folder,
    or None (changing nothing) when there are no local files; tiktoken then downloads.
    """
    sources = {name: config.shared_file("gpt2-bpe", name) for name in TIKTOKEN_GPT2_FILES}
    if any(src is None for src in sources.values()):
        return None
    target = cache if cache is not None else config.cache_dir() / "tiktoken"
    for name, url in TIKTOKEN_GPT2_FILES.items():
        dest = target / hashlib.sha1(url.encode()).hexdigest()
        if not dest.exists():
            with atomic_write(dest) as tmp:
                shutil.copyfile(sources[name], tmp)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(target)
    return target


def _download(url: str, remote: RemoteFile, dest: Path, *, progress: bool) -> None:
    """Stream ``url`` into a temporary file beside ``dest``; verify, then rename into place."""
    try:
        with atomic_write(dest) as tmp, open(tmp, "wb") as out:
            _stream(url, remote, out, progress=progress)
    except DownloadError as err:
        raise DownloadError(f"{err} {_how_to_supply(remote, dest)}") from None


def _stream(url: str, remote: RemoteFile, out: BinaryIO, *, progress: bool) -> None:
    host = urllib.parse.urlsplit(url).netloc
    request = urllib.request.Request(url, headers={"User-Agent": "lora-tutorial"})
    try:
        response = urllib.request.build_opener(_SafeRedirects).open(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as err:
        raise DownloadError(
            f"Downloading {remote.filename} failed: {url} answered HTTP {err.code} {err.reason}."
        ) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(
            f"Could not download {remote.filename}: cannot reach {host} ({reason}). "
            "This machine appears to be offline, or the server is unreachable."
        ) from None

    with response:
        announced = response.headers.get("Content-Length")
        announced = int(announced) if announced and announced.isdigit() else None
        if remote.size is not None and announced is not None and announced != remote.size:
            raise DownloadError(
                f"Downloading {remote.filename} failed: the server offers {announced:,} bytes "
                f"but {remote.size:,} are expected (the file at {url} is truncated or differs from the known one)."
            )
        expected = remote.size if remote.size is not None else announced
        digest = hashlib.sha256()
        received = 0
        bar = tqdm(
            total=expected,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=remote.filename,
            disable=not progress,
        )
        with bar:
            while chunk := _read_chunk(response, remote, received):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))

    if expected is not None and received != expected:
        what = "was truncated" if received < expected else "is longer than expected"
        raise DownloadError(
            f"Downloading {remote.filename} {what}: received {received:,} of {expected:,} bytes."
        )
    if remote.sha256 is not None and digest.hexdigest() != remote.sha256.lower():
        raise DownloadError(
            f"Downloading {remote.filename} gave a file whose sha256 is {digest.hexdigest()}, "
            f"not the expected {remote.sha256}: it is corrupt or not the known file."
        )


def _read_chunk(response: http.client.HTTPResponse, remote: RemoteFile, received: int) -> bytes:
    """The next piece of the body; a dropped connection becomes a short DownloadError."""
    try:
        return response.read(_CHUNK)
    except (http.client.HTTPException, OSError) as err:
        raise DownloadError(
            f"Downloading {remote.filename} was cut off after {received:,} bytes ({type(err).__name__}); "
            "the connection dropped or the machine went offline."
        ) from None
