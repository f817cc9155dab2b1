"""The SMS data: reading, balancing, splitting, download and safe extraction, tokenized batches."""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path
from typing import cast

import pandas as pd
import pytest
import torch

from lora_tutorial import data
from lora_tutorial.runtime import config, download

SAMPLE = (
    "ham\tOk lar... Joking wif u oni...\n"
    'spam\tWINNER!! Call 09061701461 to claim "your" prize\n'
    "ham\tSee you at 5\n"
)


@pytest.fixture(scope="module")
def messages() -> pd.DataFrame:
    """The real collection: from the data folder where there is one, else the package's copy."""
    return data.read_messages(data.sms_spam_file())


@pytest.fixture
def no_bundled_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the package shipped no copy of the data (an install that lost its package data)."""
    monkeypatch.setattr(config, "bundled_file", lambda *parts: None)


def test_reads_every_line_despite_quotes(messages: pd.DataFrame) -> None:
    assert len(messages) == 5574
    assert messages["Label"].value_counts().to_dict() == {0: 4827, 1: 747}


def test_balanced_split_sizes_and_determinism(messages: pd.DataFrame) -> None:
    unique = data.drop_duplicates(messages)
    assert unique["Label"].value_counts().to_dict() == {0: 4517, 1: 642}
    balanced = data.balance_classes(messages)
    assert balanced["Label"].value_counts().to_dict() == {0: 642, 1: 642}
    splits = data.split(balanced)
    assert [len(s) for s in splits] == [898, 128, 258]
    again = data.split(data.balance_classes(messages))
    for first, second in zip(splits, again, strict=True):
        pd.testing.assert_frame_equal(first, second)
    other = data.split(data.balance_classes(messages, seed=7), seed=7)
    assert not other.train["Text"].equals(splits.train["Text"])
    # The three splits are disjoint and together hold every balanced row.
    texts = pd.concat(splits)["Text"]
    assert sorted(texts) == sorted(balanced["Text"])


def test_no_validation_or_test_message_is_a_training_message(messages: pd.DataFrame) -> None:
    for seed in (123, 7):
        splits = data.split(data.balance_classes(messages, seed=seed), seed=seed)
        train = set(splits.train["Text"].map(data.normalised))
        for held_out in splits[1:]:
            assert not held_out["Text"].map(data.normalised).isin(train).any()
            assert data.overlap(splits.train, held_out) == 0


def test_appendix_e_split_keeps_the_leak(messages: pd.DataFrame) -> None:
    naive = data.appendix_e_split(messages)
    assert [len(s) for s in naive] == [1045, 149, 300]
    assert (data.overlap(naive.train, naive.validation), data.overlap(naive.train, naive.test)) == (
        14,
        39,
    )
    with pytest.warns(UserWarning, match="53 of the 449 validation and test messages"):
        again = data.split(data.balance_classes(messages, deduplicate=False), deduplicate=False)
    for first, second in zip(naive, again, strict=True):
        pd.testing.assert_frame_equal(first, second)


def test_appendix_e_split_has_the_rows_of_the_books_own_functions(messages: pd.DataFrame) -> None:
    ch06 = pytest.importorskip("llms_from_scratch.ch06")
    frame = messages.assign(Label=messages["Label"].map(dict(enumerate(data.LABELS))))
    theirs = ch06.random_split(ch06.create_balanced_dataset(frame), 0.7, 0.1)
    for ours, their in zip(data.appendix_e_split(messages), theirs, strict=True):
        assert ours["Text"].tolist() == their["Text"].tolist()
        assert ours["Label"].map(dict(enumerate(data.LABELS))).tolist() == their["Label"].tolist()


def _memoriser_accuracy(splits: data.Splits) -> float:
    """Test accuracy of a "model" that answers a seen message's training label, else ham."""
    memory = dict(zip(splits.train["Text"].map(data.normalised), splits.train["Label"]))
    guesses = splits.test["Text"].map(data.normalised).map(lambda text: memory.get(text, 0))
    return float((guesses == splits.test["Label"]).mean())


def test_a_set_of_messages_each_present_twice_splits_without_a_leak() -> None:
    texts = [f"message number {i} about {'a prize' if i % 2 else 'dinner'}" for i in range(200)]
    labels = [i % 2 for i in range(200)]
    twice = pd.DataFrame(
        {"Label": labels * 2, "Text": texts + [t.upper().replace(" ", "  ") for t in texts]}
    )
    honest = data.split(data.balance_classes(twice))
    assert [len(s) for s in honest] == [140, 20, 40]
    assert data.overlap(honest.train, honest.validation) == data.overlap(honest.train, honest.test)
    assert data.overlap(honest.train, honest.test) == 0
    assert _memoriser_accuracy(honest) == pytest.approx((honest.test["Label"] == 0).mean())
    with pytest.warns(UserWarning, match="also in the training set"):
        leaky = data.split(twice, deduplicate=False)
    assert data.overlap(leaky.train, leaky.test) > len(leaky.test) // 2
    assert _memoriser_accuracy(leaky) > _memoriser_accuracy(honest) + 0.2


def test_drop_duplicates_ignores_whitespace_and_case_and_keeps_the_first() -> None:
    df = pd.DataFrame(
        {"Label": [1, 0, 1, 0], "Text": ["WIN a prize", "hi", "win  a\tPRIZE ", "Hi there"]},
        index=[10, 11, 12, 13],
    )
    out = data.drop_duplicates(df)
    assert out.index.tolist() == [10, 11, 13]
    assert len(df) == 4  # the input is left as it was
    with pytest.raises(ValueError, match="no column 'Text'"):
        data.drop_duplicates(df.rename(columns={"Text": "Body"}))


def test_prepare_splits_writes_csvs_and_counts_the_dropped_duplicates(tmp_path: Path) -> None:
    splits = data.prepare_splits(tmp_path, progress=False)
    names = ["splits.json", "test.csv", "train.csv", "validation.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    loaded = data.load_splits(tmp_path)
    for written, read in zip(splits, loaded, strict=True):
        assert written["Text"].tolist() == read["Text"].tolist()
        assert written["Label"].tolist() == read["Label"].tolist()
    manifest = json.loads((tmp_path / data.SPLITS_MANIFEST).read_text())
    assert manifest["counts"] == {
        "messages": 5574,
        "duplicates_dropped": 415,
        "unique_messages": 5159,
        "train": 898,
        "validation": 128,
        "test": 258,
    }
    assert manifest["settings"]["deduplicate"]


def _zip(path: Path, members: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return path


def test_download_and_extract_from_mirror(
    http_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_bundled_copy: None
) -> None:
    known = download.KNOWN_FILES[data.ZIP_NAME]
    archive = _zip(
        http_server.root / known.filename, {data.SMS_FILE: SAMPLE, "readme": "test archive"}
    )
    blob = archive.read_bytes()
    test_file = download.RemoteFile(
        known.url, known.filename, len(blob), hashlib.sha256(blob).hexdigest()
    )
    monkeypatch.setitem(download.KNOWN_FILES, data.ZIP_NAME, test_file)
    monkeypatch.setenv(download.MIRROR_ENV, http_server.base_url)
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv(config.DATA_ENV, str(empty))  # no offline copy: the zip must be fetched

    path = data.sms_spam_file(tmp_path / "sms", progress=False)
    assert path.is_relative_to(tmp_path / "sms")
    df = data.read_messages(path)
    assert df["Label"].tolist() == [0, 1, 0]
    assert df["Text"][1] == 'WINNER!! Call 09061701461 to claim "your" prize'


@pytest.mark.parametrize(
    "member", ["../escaped.txt", "inner/../../escaped.txt", "/tmp/absolute.txt"]
)
def test_unsafe_archive_is_refused(tmp_path: Path, member: str) -> None:
    archive = _zip(tmp_path / "evil.zip", {data.SMS_FILE: SAMPLE, member: "gotcha"})
    target = tmp_path / "out" / "extracted"
    with pytest.raises(ValueError, match="outside"):
        data.extract_zip(archive, target)
    assert not target.exists()
    assert (
        not (tmp_path / "out" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    )
    assert list((tmp_path / "out").iterdir()) == []  # no temporary folder left behind


def test_offline_without_copy_says_where_to_put_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_bundled_copy: None
) -> None:
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv(config.DATA_ENV, str(empty))
    monkeypatch.setenv(
        download.MIRROR_ENV, "http://127.0.0.1:9"
    )  # nothing listens on the discard port
    with pytest.raises(download.DownloadError, match=data.SMS_FILE):
        data.sms_spam_file(tmp_path / "sms", progress=False)


def test_spam_dataset_pads_truncates_and_keeps_lengths(gpt2_tokenizer) -> None:
    df = pd.DataFrame(
        {"Label": [0, 1, 0], "Text": ["Hi", "Call now to win a prize today", "See you at five"]}
    )
    token_counts = [len(gpt2_tokenizer.encode(t)) for t in df["Text"]]
    ds = data.SpamDataset(df, gpt2_tokenizer)
    assert ds.max_length == max(token_counts)
    for i, n in enumerate(token_counts):
        ids, label, length = ds[i]
        assert length.item() == n and label.item() == df["Label"][i]
        assert ids[:n].tolist() == gpt2_tokenizer.encode(df["Text"][i])
        assert (ids[n:] == data.PAD_TOKEN_ID).all()

    short = data.SpamDataset(df, gpt2_tokenizer, max_length=3)
    assert short.input_ids.shape == (3, 3)
    assert short.lengths == [min(n, 3) for n in token_counts]
    assert short.truncated == sum(n > 3 for n in token_counts)


def test_loaders_are_seeded_and_share_the_training_length(
    messages: pd.DataFrame, gpt2_tokenizer
) -> None:
    splits = data.split(data.subset(data.balance_classes(messages), 60))
    first = data.make_loaders(*splits, gpt2_tokenizer, batch_size=4, seed=5)
    second = data.make_loaders(*splits, gpt2_tokenizer, batch_size=4, seed=5)
    order = [batch[0] for batch in first.train]
    assert all(torch.equal(a, b[0]) for a, b in zip(order, second.train, strict=True))
    assert len(order) == len(splits.train) // 4  # drop_last: only full batches
    datasets = [cast(data.SpamDataset, loader.dataset) for loader in first]
    assert {dataset.max_length for dataset in datasets} == {datasets[0].max_length}


def test_subset_keeps_both_classes(messages: pd.DataFrame) -> None:
    small = data.subset(data.balance_classes(messages), 10)
    assert len(small) == 10
    assert small["Label"].value_counts().to_dict() == {0: 5, 1: 5}
    pd.testing.assert_frame_equal(small, data.subset(data.balance_classes(messages), 10))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("URGENT! Call 09061701461 now to claim your prize", True),
        ("Text WIN to 87121 to enter", True),
        ("txt STOP to 85069", True),
        ("Call me when you get home", False),
        ("My number is 07781482378", False),
        ("Please call. The code is 12345", False),  # the number is in another sentence
    ],
)
def test_calls_to_action_rule(text: str, expected: bool) -> None:
    assert data.calls_to_action(text) is expected


def test_call_to_action_task_uses_the_same_machinery(messages: pd.DataFrame) -> None:
    labelled = data.with_call_to_action_labels(messages)
    positives = int(labelled["CallToAction"].sum())
    assert 0 < positives < len(labelled) // 2
    balanced = data.balance_classes(labelled, label_column="CallToAction")
    unique = int(data.drop_duplicates(labelled)["CallToAction"].sum())
    assert unique < positives  # spam campaigns repeat their calls to action word for word
    assert balanced["CallToAction"].value_counts().to_dict() == {0: unique, 1: unique}
    train, validation, test = data.split(balanced)
    assert len(train) + len(validation) + len(test) == 2 * unique
    with pytest.raises(ValueError, match="no column 'Spammy'"):
        data.balance_classes(labelled, label_column="Spammy")


def test_cached_splits_are_reused_and_rewritten_only_when_ours(tmp_path: Path) -> None:
    data.prepare_splits(tmp_path, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    data.prepare_splits(tmp_path, progress=False)  # same data, same settings: read back
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
    other = data.prepare_splits(tmp_path, seed=7, progress=False)  # our own files: replaced
    assert data.load_splits(tmp_path).train["Text"].tolist() == other.train["Text"].tolist()
    manifest = json.loads((tmp_path / data.SPLITS_MANIFEST).read_text())
    assert manifest["settings"]["seed"] == 7 and set(manifest["files"]) == {
        "train.csv",
        "validation.csv",
        "test.csv",
    }


def test_a_users_own_split_file_is_never_overwritten(tmp_path: Path) -> None:
    mine = tmp_path / "train.csv"
    mine.write_text("my,own\n1,2\n")
    with pytest.raises(FileExistsError, match=f"{re.escape(str(mine))}.*move it away"):
        data.prepare_splits(tmp_path, progress=False)
    assert mine.read_text() == "my,own\n1,2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.csv"]

    # A split file changed after it was written is the user's too; so is a foreign splits.json.
    other = tmp_path / "other"
    data.prepare_splits(other, progress=False)
    (other / "test.csv").write_text("edited\n")
    with pytest.raises(FileExistsError, match=r"test\.csv"):
        data.prepare_splits(other, seed=7, progress=False)
    assert (other / "test.csv").read_text() == "edited\n"
    third = tmp_path / "third"
    third.mkdir()
    (third / data.SPLITS_MANIFEST).write_text('{"my": "settings"}')
    with pytest.raises(FileExistsError, match=r"splits\.json was not written"):
        data.prepare_splits(third, progress=False)


def test_in_the_packages_cache_too_only_the_packages_own_splits_are_replaced() -> None:
    cache = config.cache_dir() / data.SHARED_FOLDER  # each test has its own cache (conftest)
    splits = data.prepare_splits(progress=False)
    (cache / data.SPLITS_MANIFEST).unlink()  # as an older version left them: no splits.json
    assert data.prepare_splits(progress=False).train.equals(splits.train)  # same bytes: kept
    assert (cache / data.SPLITS_MANIFEST).is_file()
    (cache / "train.csv").write_text("Label,Text\n0,mine\n")  # the user's own table
    with pytest.raises(FileExistsError, match=r"train\.csv exists and was not written"):
        data.prepare_splits(seed=7, progress=False)
    assert (cache / "train.csv").read_text() == "Label,Text\n0,mine\n"


def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / data.SMS_FILE
    path.write_bytes(b"ham\tfine\nham\tstill fine\nspam\tcaf\xe9 prize\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 3: byte 0xe9 is not UTF-8")):
        data.read_messages(path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("ham\thello\n\nspam\t\nham\tbye\n", "line 3: no message"),
        ("ham\thello\nspam no tab\n", "line 2: unexpected label 'spam no tab'"),
        ("ham\thello\nspam\ta\tb\n", "line 2: more than one tab"),
    ],
)
def test_malformed_lines_name_the_file_line(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / data.SMS_FILE
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{path}, {problem}")):
        data.read_messages(path)


# --- where the file comes from ------------------------------------------------------------------


def test_the_bundled_copy_is_the_uci_file_and_is_verified(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bundled = data.bundled_sms_file()
    assert bundled is not None and bundled.is_relative_to(Path(data.__file__).parent)
    assert hashlib.sha256(bundled.read_bytes()).hexdigest() == data.SMS_SHA256
    licence = (bundled.parent / "LICENSE").read_text()
    assert "CC BY 4.0" in licence and "Almeida" in licence and "dataset 228" in licence
    damaged = tmp_path / data.SHARED_FOLDER / data.SMS_FILE
    damaged.parent.mkdir()
    damaged.write_bytes(bundled.read_bytes().replace(b"Ok lar", b"Ok LAR", 1))
    monkeypatch.setattr(config, "bundled_file", lambda *parts: tmp_path.joinpath(*parts))
    with pytest.raises(ValueError, match="sha256 differs"):
        data.bundled_sms_file()


def test_the_copy_matches_the_data_folders_byte_for_byte(data_dir: Path) -> None:
    bundled = data.bundled_sms_file()
    assert bundled is not None
    assert bundled.read_bytes() == (data_dir / data.SHARED_FOLDER / data.SMS_FILE).read_bytes()


def test_lookup_order_folder_then_data_folder_then_bundled_then_download(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("sms_spam_file tried to download")

    monkeypatch.setattr(download, "fetch", fail)
    shared = tmp_path / "shared"
    (shared / data.SHARED_FOLDER).mkdir(parents=True)
    (shared / data.SHARED_FOLDER / data.SMS_FILE).write_text(SAMPLE)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / data.SMS_FILE).write_text(SAMPLE)
    monkeypatch.setenv(config.DATA_ENV, str(shared))
    assert data.sms_spam_file(mine) == mine / data.SMS_FILE
    assert data.sms_spam_file(tmp_path / "empty") == shared / data.SHARED_FOLDER / data.SMS_FILE
    no_data = tmp_path / "no-data"
    no_data.mkdir()
    monkeypatch.setenv(config.DATA_ENV, str(no_data))
    assert data.sms_spam_file(tmp_path / "empty") == data.bundled_sms_file()
    monkeypatch.setattr(config, "bundled_file", lambda *parts: None)
    with pytest.raises(AssertionError, match="tried to download"):
        data.sms_spam_file(tmp_path / "empty")


def test_without_a_data_folder_or_network_the_data_and_tokenizer_still_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What a fresh clone offline has: no data folder, no cached files, no network."""
    from lora_tutorial import gpt

    monkeypatch.setattr(config, "data_dir", lambda: None)
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")

    def fail(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(download, "fetch", fail)
    splits = data.prepare_splits(tmp_path / "splits", progress=False)
    assert [len(s) for s in splits] == [898, 128, 258]
    cache = download.use_offline_tiktoken(tmp_path / "tiktoken")
    assert cache is not None and len(list(cache.iterdir())) == 2
    assert gpt.get_tokenizer().encode("Hello, world") == [15496, 11, 995]
