"""The SMS Spam Collection: read, deduplicate, balance, split (with a manifest), tokenize, batch.

One run of the book's experiment starts here::

    messages = read_messages()                  # 5,574 rows, Label 0 = ham, 1 = spam
    train, val, test = split(balance_classes(messages))   # 898 / 128 / 258
    loaders = make_loaders(train, val, test, tokenizer)

The collection repeats many messages word for word (spam campaigns send the same text again and
again). :func:`balance_classes` and :func:`split` first drop those repeats (:func:`drop_duplicates`:
same text after normalising whitespace and case), so no validation or test message is also a
training message. Balancing then undersamples the larger class and splitting shuffles once and
cuts at 70 % and 80 %, both with a fixed seed and the same pandas calls as chapter 6 and appendix
E of *Build a Large Language Model (From Scratch)*. :func:`appendix_e_split` is that book's
procedure without deduplication, kept to measure the leak it causes.

The file is found by :func:`sms_spam_file`: a folder given, the data folder, the copy shipped in
the package (``lora_tutorial/bundled``, CC BY 4.0), and only then the UCI download.

The same machinery serves other labels of the same messages: :func:`calls_to_action` is a
rule-based second task, and every function that looks at labels takes a ``label_column``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from lora_tutorial.runtime import config, download
from lora_tutorial.runtime.files import atomic_write, sha256_file

LABELS = ("ham", "spam")  # index = class id
LABEL_IDS = {name: i for i, name in enumerate(LABELS)}
SEED = 123
PAD_TOKEN_ID = 50256  # GPT-2's <|endoftext|>
SPLIT_NAMES = ("train", "validation", "test")


# --------------------------------------------------------------------------- the file

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


SMS_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"  # UCI's file


def bundled_sms_file() -> Path | None:
    """The copy of ``SMSSpamCollection`` shipped in the package, checked by sha256; None if absent.

    A copy whose bytes differ from UCI's file raises ``ValueError`` (reinstall the package).
    """
    path = config.bundled_file(SHARED_FOLDER, SMS_FILE)
    if path is not None and _sha256(path) != SMS_SHA256:
        raise ValueError(
            f"{path} is not the SMS Spam Collection shipped with the package (its sha256 "
            "differs); reinstall lora-tutorial or restore the file"
        )
    return path


def sms_spam_file(folder: str | Path | None = None, *, progress: bool = True) -> Path:
    """The path of ``SMSSpamCollection``, downloading the UCI zip only when no copy is at hand.

    Looks, in order, for ``folder/SMSSpamCollection``, for the copy in the data folder
    (:func:`config.shared_file`: ``$LORA_TUTORIAL_DATA`` or ``../shared/data``), for the copy
    shipped in the package (:func:`bundled_sms_file`), and only then downloads the zip with
    :func:`download.fetch` and extracts it (safely) into ``folder`` (default:
    ``<cache>/sms-spam-collection``). Raises :class:`download.DownloadError` when offline with no
    copy; its message says where to put the file.
    """
    folder = Path(folder) if folder is not None else config.cache_dir() / SHARED_FOLDER
    if (folder / SMS_FILE).is_file():
        return folder / SMS_FILE
    shared = config.shared_file(SHARED_FOLDER, SMS_FILE)
    if shared is not None:
        return shared
    bundled = bundled_sms_file()
    if bundled is not None:
        return bundled
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


class Splits(NamedTuple):
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame


class Loaders(NamedTuple):
    train: DataLoader
    validation: DataLoader
    test: DataLoader


# --- reading, labelling, balancing, splitting --------------------------------------------------


def read_messages(path: str | Path | None = None) -> pd.DataFrame:
    """All messages as a DataFrame with columns ``Label`` (0 = ham, 1 = spam) and ``Text``.

    The file is ``label<TAB>text``, one message per line, with no quoting: some messages hold a
    stray ``"``, and the default CSV quoting would merge lines (5,572 rows instead of 5,574).
    Reading it line by line, with quoting off, lets every error name the file and its line.
    """
    path = Path(path) if path is not None else sms_spam_file()
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{path}, line {line}: byte 0x{raw[err.start]:02x} is not UTF-8 text; the SMS file "
            "must be UTF-8 (download it again, or save it as UTF-8)"
        ) from None
    labels, texts = [], []
    for number, row in enumerate(text.split("\n"), start=1):
        if not row.removesuffix("\r"):
            continue  # blank lines (the end of the file) hold no message
        label, _, message = row.removesuffix("\r").partition("\t")
        problem = _line_problem(label, message)
        if problem:
            raise ValueError(f"{path}, line {number}: {problem}")
        labels.append(LABEL_IDS[label])
        texts.append(message)
    if not labels:
        raise ValueError(f"{path}: the data file has no messages; expected label<TAB>text lines")
    return pd.DataFrame({"Label": pd.Series(labels, dtype="int64"), "Text": texts})


def _line_problem(label: str, message: str) -> str | None:
    """What is wrong with one ``label<TAB>text`` line of the SMS file, or None."""
    if label not in LABEL_IDS:
        return f"unexpected label {label!r}; expected one of {list(LABELS)} and a tab"
    if not message:
        return "no message after the label; remove the line or give it text"
    if "\t" in message:
        return "more than one tab; expected label<TAB>text"
    return None


_CALL_TO_ACTION = re.compile(
    r"\b(?:call|ring|phone|dial|text|txt|sms|send|reply)\b"  # an imperative verb ...
    r"[^.!?\n]{0,40}?"  # ... followed in the same sentence, within 40 characters, by ...
    r"(?<!\d)\d{5,}",  # ... a number of five or more digits (a phone number or a short code)
    re.IGNORECASE,
)


def calls_to_action(text: str) -> bool:
    """True when a message asks the reader to call or text a number.

    The rule: one of the words call, ring, phone, dial, text, txt, sms, send or reply, then,
    in the same sentence and within 40 characters, a number of at least five digits
    ("Call 09061701461", "text WIN to 87121"). It is a different question from spam (many
    spam messages ask for a click or a reply without a number), which makes it a second task
    on the same messages.
    """
    return _CALL_TO_ACTION.search(text) is not None


def with_call_to_action_labels(df: pd.DataFrame, column: str = "CallToAction") -> pd.DataFrame:
    """A copy of ``df`` with an integer ``column``: 1 where :func:`calls_to_action` holds."""
    out = df.copy()
    out[column] = out["Text"].map(calls_to_action).astype("int64")
    return out


def _require_column(df: pd.DataFrame, column: str) -> None:
    if column not in df.columns:
        raise ValueError(
            f"no column {column!r} in the data (columns: {list(df.columns)}); pass label_column="
        )


def normalised(text: str) -> str:
    """``text`` in lower case with each run of whitespace made one space: what "the same" means."""
    return " ".join(text.split()).lower()


def drop_duplicates(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` without repeated messages: the first row of each text is kept, in order.

    Two messages are the same when their texts are equal after :func:`normalised` (whitespace
    and case do not count). A copy of a message could otherwise land in training and in test,
    and a model that memorised it would look better than it is.
    """
    if "Text" not in df.columns:
        raise ValueError(f"no column 'Text' in the data (columns: {list(df.columns)})")
    return df[~df["Text"].map(normalised).duplicated()]


def overlap(train: pd.DataFrame, other: pd.DataFrame) -> int:
    """How many rows of ``other`` hold a message that is also in ``train`` (after normalising)."""
    seen = set(train["Text"].map(normalised))
    return int(other["Text"].map(normalised).isin(seen).sum())


def balance_classes(
    df: pd.DataFrame, label_column: str = "Label", seed: int = SEED, *, deduplicate: bool = True
) -> pd.DataFrame:
    """Drop repeated messages, then undersample every class to the size of the smallest one.

    Sampling uses a fixed seed; classes keep their order of first appearance, and a class already
    at the smallest size keeps all its rows in file order. ``deduplicate=False`` keeps repeats:
    for the SMS data and seed 123 that gives the 747 ham and 747 spam rows of chapter 6 of *Build
    a Large Language Model (From Scratch)* (read with quoting off), in its order.
    """
    _require_column(df, label_column)
    if deduplicate:
        df = drop_duplicates(df)
    counts = df[label_column].value_counts(sort=False)
    if len(counts) < 2:
        raise ValueError(
            f"column {label_column!r} has a single class {list(counts.index)}; nothing to balance"
        )
    n = int(counts.min())
    parts = [
        rows.sample(n, random_state=seed) if len(rows) > n else rows
        for rows in (df[df[label_column] == label] for label in df[label_column].unique())
    ]
    return pd.concat(parts)


def split(
    df: pd.DataFrame,
    train_frac: float = 0.7,
    validation_frac: float = 0.1,
    seed: int = SEED,
    *,
    deduplicate: bool = True,
) -> Splits:
    """Drop repeated messages, shuffle once with ``seed`` and cut into train, validation and test.

    ``train_end = int(n * train_frac)`` and ``val_end = train_end + int(n * validation_frac)``;
    the rest is test (898 / 128 / 258 for the 1,284 balanced unique messages). With
    ``deduplicate=False`` repeats stay, and a warning says how many validation and test messages
    are then also training messages.
    """
    if deduplicate:
        df = drop_duplicates(df)
    splits = _cut(df, train_frac, validation_frac, seed)
    if not deduplicate:
        seen = overlap(splits.train, splits.validation) + overlap(splits.train, splits.test)
        if seen:
            warnings.warn(
                f"{seen} of the {len(splits.validation) + len(splits.test)} validation and test "
                "messages are also in the training set; evaluation on them measures memory, "
                "not generalisation (split with deduplicate=True)",
                stacklevel=2,
            )
    return splits


def appendix_e_split(messages: pd.DataFrame, seed: int = SEED) -> Splits:
    """The split of appendix E (and chapter 6) of *Build a Large Language Model (From Scratch)*.

    Undersample ham to the number of spam, shuffle, cut at 70 % and 80 %, all with ``seed`` and
    without removing repeated messages: so some validation and test messages are also training
    messages (:func:`overlap` counts them). Kept to measure that leak; use :func:`split`.
    """
    return _cut(balance_classes(messages, seed=seed, deduplicate=False), 0.7, 0.1, seed)


def _cut(df: pd.DataFrame, train_frac: float, validation_frac: float, seed: int) -> Splits:
    """Shuffle ``df`` once with ``seed`` and cut it at ``train_frac`` and the validation end."""
    if not (0 < train_frac < 1 and 0 <= validation_frac < 1 and train_frac + validation_frac < 1):
        raise ValueError(
            f"train_frac={train_frac}, validation_frac={validation_frac}: need 0 < train_frac, "
            "0 <= validation_frac and train_frac + validation_frac < 1 (the test split needs rows)"
        )
    shuffled = df.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(shuffled) * train_frac)
    val_end = train_end + int(len(shuffled) * validation_frac)
    return Splits(shuffled[:train_end], shuffled[train_end:val_end], shuffled[val_end:])


def subset(df: pd.DataFrame, n: int, label_column: str = "Label", seed: int = SEED) -> pd.DataFrame:
    """``n`` rows of ``df``, the classes as even as the data allow, chosen with ``seed``.

    For tests and quick mode: a small training set that still holds both classes.
    """
    _require_column(df, label_column)
    if n < 1:
        raise ValueError(f"n={n}: a subset needs at least one row")
    if n >= len(df):
        return df.reset_index(drop=True)
    shuffled = df.sample(frac=1, random_state=seed)
    # Round-robin over the classes: the k-th row of every class before the (k+1)-th of any.
    rank = shuffled.groupby(label_column, sort=False).cumcount()
    return (
        shuffled.assign(_rank=rank)
        .sort_values("_rank", kind="stable")
        .head(n)
        .drop(columns="_rank")
        .reset_index(drop=True)
    )


SPLITS_MANIFEST = "splits.json"  # written beside the CSVs: what made them, and their sha256


def _sha256(path: Path) -> str | None:
    """The sha256 of a file's bytes; None when ``path`` is no file."""
    return sha256_file(path) if path.is_file() else None


def _read_manifest(folder: Path) -> dict:
    """The ``splits.json`` in ``folder`` ({} when there is none); anything else there is refused."""
    path = folder / SPLITS_MANIFEST
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest["written_by"] == "lora_tutorial.data" and isinstance(manifest["files"], dict):
            return manifest
    except (ValueError, KeyError, TypeError):  # not JSON, not UTF-8, not our layout
        pass
    raise FileExistsError(
        f"{path} was not written by lora_tutorial.data; move it away or use another folder"
    )


def save_splits(
    splits: Splits,
    folder: str | Path,
    *,
    settings: dict | None = None,
    counts: dict | None = None,
) -> dict[str, Path]:
    """Write the splits as ``train.csv``, ``validation.csv``, ``test.csv``; return the paths.

    Beside them goes ``splits.json``: the ``settings`` that made them, the ``counts`` of rows
    along the way (messages read, duplicates dropped, ...) and each CSV's sha256.
    A file of those names is replaced only if that manifest says this module wrote it (and it is
    unchanged since) or it already holds exactly the new content; any other file is the user's,
    and ``FileExistsError`` names it (also in the package's own cache). Each file is written
    atomically.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recorded = _read_manifest(folder).get("files", {})
    paths = {name: folder / f"{name}.csv" for name in SPLIT_NAMES}
    blobs = {
        path: frame.to_csv(index=False).encode()
        for path, frame in zip(paths.values(), splits, strict=True)
    }
    hashes = {path.name: hashlib.sha256(blob).hexdigest() for path, blob in blobs.items()}
    for path in blobs:
        listed = {recorded.get(path.name, ""), hashes[path.name]}
        if path.exists() and _sha256(path) not in listed:
            raise FileExistsError(
                f"{path} exists and was not written by lora_tutorial.data (or was changed "
                "since); it is left alone: move it away or choose another data folder"
            )
    for path, blob in blobs.items():
        with atomic_write(path) as tmp:
            tmp.write_bytes(blob)
    manifest = {
        "written_by": "lora_tutorial.data",
        "settings": settings or {},
        "counts": counts or {},
        "files": hashes,
    }
    with atomic_write(folder / SPLITS_MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return paths


def load_splits(folder: str | Path) -> Splits:
    """Read the CSVs written by :func:`save_splits`."""
    folder = Path(folder)
    missing = [f"{name}.csv" for name in SPLIT_NAMES if not (folder / f"{name}.csv").is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}; write them with prepare_splits()")
    return Splits(
        *(pd.read_csv(folder / f"{name}.csv", keep_default_na=False) for name in SPLIT_NAMES)
    )


def prepare_splits(
    folder: str | Path | None = None,
    *,
    seed: int = SEED,
    source: str | Path | None = None,
    progress: bool = True,
) -> Splits:
    """Read, deduplicate, balance and split the SMS data and save the three CSVs in ``folder``.

    ``folder`` defaults to ``<cache>/sms-spam-collection``; ``source`` is an explicit
    ``SMSSpamCollection`` path (otherwise :func:`sms_spam_file` finds or downloads it).
    The manifest ``splits.json`` records, under ``counts``, how many messages were read and how
    many repeats were dropped. Splits already there, made from the same data with the same
    settings (``splits.json`` says so), are read back instead of written again; see
    :func:`save_splits` for the files that are never replaced.
    """
    folder = Path(folder) if folder is not None else config.cache_dir() / SHARED_FOLDER
    path = Path(source) if source is not None else sms_spam_file(folder, progress=progress)
    settings = {
        "source_sha256": _sha256(path),
        "seed": seed,
        "train_validation_frac": [0.7, 0.1],
        "deduplicate": "text after normalising whitespace and case",
    }
    manifest = _read_manifest(folder)
    files = manifest.get("files", {})
    cached = set(files) == {f"{name}.csv" for name in SPLIT_NAMES} and all(
        _sha256(folder / name) == sha for name, sha in files.items()
    )
    if cached and manifest["settings"] == settings:
        return load_splits(folder)
    messages = read_messages(path)
    unique = drop_duplicates(messages)
    splits = split(balance_classes(unique, seed=seed), seed=seed)
    counts = {
        "messages": len(messages),
        "duplicates_dropped": len(messages) - len(unique),
        "unique_messages": len(unique),
        **{name: len(frame) for name, frame in zip(SPLIT_NAMES, splits, strict=True)},
    }
    save_splits(splits, folder, settings=settings, counts=counts)
    return splits


# --- tokens and batches ------------------------------------------------------------------------


class SpamDataset(Dataset):
    """Messages as fixed-length token rows: ``(input_ids, label, length)`` per item.

    Each message is tokenized (tiktoken GPT-2 encoding or anything with ``encode``), cut to
    ``max_length`` tokens and right-padded with ``pad_token_id``. ``max_length=None`` takes the
    longest message here (give the validation and test sets the training set's value).
    ``length`` is the number of real tokens, so a classifier can read the last real one.
    """

    def __init__(
        self,
        data: str | Path | pd.DataFrame,
        tokenizer,
        max_length: int | None = None,
        pad_token_id: int = PAD_TOKEN_ID,
        label_column: str = "Label",
    ) -> None:
        df = pd.read_csv(data, keep_default_na=False) if isinstance(data, (str, Path)) else data
        _require_column(df, label_column)
        if "Text" not in df.columns:
            raise ValueError(f"no column 'Text' in the data (columns: {list(df.columns)})")
        encode = (
            getattr(tokenizer, "encode_ordinary", None) or tokenizer.encode
        )  # "<|endoftext|>" in a text is text
        encoded = [encode(text) for text in df["Text"]]
        empty = [i for i, ids in enumerate(encoded) if not ids]
        if empty:
            raise ValueError(f"rows {empty[:5]} have no tokens; drop empty messages first")
        if max_length is None:
            max_length = max(len(ids) for ids in encoded)
        if max_length < 1:
            raise ValueError(f"max_length={max_length}: need at least one token per message")
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self.lengths = [min(len(ids), max_length) for ids in encoded]
        self.truncated = sum(len(ids) > max_length for ids in encoded)
        self.input_ids = torch.full((len(encoded), max_length), pad_token_id, dtype=torch.long)
        for row, (ids, n) in enumerate(zip(encoded, self.lengths, strict=True)):
            self.input_ids[row, :n] = torch.tensor(ids[:n], dtype=torch.long)
        self.labels = torch.tensor(df[label_column].to_numpy(), dtype=torch.long)
        self.length_tensor = torch.tensor(self.lengths, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.input_ids[index], self.labels[index], self.length_tensor[index]


def make_loaders(
    train: str | Path | pd.DataFrame,
    validation: str | Path | pd.DataFrame,
    test: str | Path | pd.DataFrame,
    tokenizer,
    *,
    batch_size: int = 8,
    seed: int = SEED,
    max_length: int | None = None,
    context_length: int | None = None,
    label_column: str = "Label",
    num_workers: int = 0,
    pad_token_id: int = PAD_TOKEN_ID,
) -> Loaders:
    """DataLoaders over the three splits; the training one shuffles, seeded by ``seed``.

    All splits are padded to ``max_length`` (default: the longest training message, capped at
    the model's ``context_length`` when given) with ``pad_token_id`` (default GPT-2's). The
    training loader drops its last partial batch so every step sees ``batch_size`` messages.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: need at least 1")
    train_ds = SpamDataset(train, tokenizer, max_length, pad_token_id, label_column)
    if context_length is not None and train_ds.max_length > context_length:
        train_ds = SpamDataset(train, tokenizer, context_length, pad_token_id, label_column)
    if len(train_ds) < batch_size:
        raise ValueError(
            f"{len(train_ds)} training messages make no full batch of {batch_size}; "
            "lower batch_size"
        )
    val_ds, test_ds = (
        SpamDataset(d, tokenizer, train_ds.max_length, pad_token_id, label_column)
        for d in (validation, test)
    )
    generator = torch.Generator().manual_seed(seed)
    return Loaders(
        DataLoader(
            train_ds,
            batch_size,
            shuffle=True,
            drop_last=True,
            generator=generator,
            num_workers=num_workers,
        ),
        DataLoader(val_ds, batch_size, num_workers=num_workers),
        DataLoader(test_ds, batch_size, num_workers=num_workers),
    )
