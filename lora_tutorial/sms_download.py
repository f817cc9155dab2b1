"""The SMS Spam Collection's file: a local copy, or the UCI zip downloaded and safely extracted.

:mod:`lora_tutorial.data` reads the file this module finds; both names below are re-exported there.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from lora_tutorial import config, download

SMS_FILE = "SMSSpamCollection"
SHARED_FOLDER = "sms-spam-collection"  # the folder name inside config.data_dir()
ZIP_NAME = "sms-spam-zip"  # the key of the UCI zip in download.KNOWN_FILES


def extract_zip(zip_path: str | Path, target_dir: str | Path) -> Path:
    """Extract ``zip_path`` into ``target_dir``, refusing members that would land outside it.

    Members with absolute paths or ``..`` that resolve outside the target raise ``ValueError``
    before anything is written. Extraction goes to a temporary sibling folder that is renamed
    into place, so ``target_dir`` is either absent or complete. An existing ``target_dir`` is
    left as it is and returned.
    """
    zip_path, target_dir = Path(zip_path), Path(target_dir)
    if target_dir.is_dir():
        return target_dir
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path) as archive:
        root = target_dir.resolve()
        for member in archive.infolist():
            name = member.filename
            resolved = (root / name).resolve()
            if (
                name.startswith(("/", "\\"))
                or re.match(r"^[A-Za-z]:", name)
                or not resolved.is_relative_to(root)
            ):
                raise ValueError(
                    f"unsafe archive {zip_path}: member {name!r} would be written outside "
                    f"{target_dir}; refusing to extract it (use the original UCI zip)"
                )
        tmp = Path(tempfile.mkdtemp(prefix=f".{target_dir.name}-", dir=target_dir.parent))
        try:
            archive.extractall(tmp)
            tmp.rename(target_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if target_dir.is_dir():  # another process finished first
                return target_dir
            raise
    return target_dir


def sms_spam_file(folder: str | Path | None = None, *, progress: bool = True) -> Path:
    """The path of ``SMSSpamCollection``, downloading the UCI zip only when no copy is at hand.

    Looks, in order, for ``folder/SMSSpamCollection``, for the offline copy in
    :func:`config.shared_file`, and finally downloads the zip with :func:`download.fetch` and
    extracts it (safely) into ``folder`` (default: ``<cache>/sms-spam-collection``).
    Raises :class:`download.DownloadError` when offline with no copy; its message says where
    to put the file.
    """
    folder = Path(folder) if folder is not None else config.cache_dir() / SHARED_FOLDER
    if (folder / SMS_FILE).is_file():
        return folder / SMS_FILE
    shared = config.shared_file(SHARED_FOLDER, SMS_FILE)
    if shared is not None:
        return shared
    try:
        zip_path = download.fetch(ZIP_NAME, progress=progress)
    except download.DownloadError as err:
        raise download.DownloadError(
            f"{err}\nThe SMS data can also be supplied by hand: put the file {SMS_FILE} from the "
            f"UCI zip into {folder}, or set {config.DATA_ENV} to a folder containing "
            f"{SHARED_FOLDER}/{SMS_FILE}."
        ) from err
    extracted = extract_zip(zip_path, folder / "extracted")
    matches = sorted(extracted.rglob(SMS_FILE))
    if not matches:
        raise FileNotFoundError(
            f"{zip_path} has no member named {SMS_FILE}; is it the UCI SMS Spam Collection zip?"
        )
    return matches[0]
