"""GPT-2 from scratch, the pretrained weights loaded into it, a tokenizer and text generation.

The model is the architecture of Radford et al. (2019): token and position embeddings, a
stack of pre-LayerNorm transformer blocks (causal multi-head attention, then a GELU
feed-forward network, each wrapped in a residual connection), a final LayerNorm and an
output head that shares its weight with the token embedding. Every projection is an
``nn.Linear`` so that :func:`lora_tutorial.lora.replace_linear_with_lora` can adapt it.

Pretrained weights come from the Hugging Face ``model.safetensors`` files, read with
safetensors (nothing is unpickled) and mapped by :func:`load_hf_state_dict`.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import tiktoken
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from lora_tutorial.runtime import config, download
from lora_tutorial.runtime.checks import check_number

CONFIG_KEYS = (
    "vocab_size",
    "context_length",
    "emb_dim",
    "n_heads",
    "n_layers",
    "drop_rate",
    "qkv_bias",
)

_GPT2 = {"vocab_size": 50257, "context_length": 1024, "drop_rate": 0.0, "qkv_bias": True}

GPT_CONFIGS: dict[str, dict] = {
    "gpt2-small": {**_GPT2, "emb_dim": 768, "n_heads": 12, "n_layers": 12},  # 124M
    "gpt2-medium": {**_GPT2, "emb_dim": 1024, "n_heads": 16, "n_layers": 24},  # 355M
    "gpt2-large": {**_GPT2, "emb_dim": 1280, "n_heads": 20, "n_layers": 36},  # 774M
    "gpt2-xl": {**_GPT2, "emb_dim": 1600, "n_heads": 25, "n_layers": 48},  # 1558M
    # Same vocabulary as GPT-2 so the real tokenizer works; small enough for tests and quick mode.
    "tiny": {**_GPT2, "context_length": 256, "emb_dim": 64, "n_heads": 4, "n_layers": 2},
}


def resolve_config(cfg: str | Mapping) -> dict:
    """A complete, checked copy of a configuration given as a preset name or a dict."""
    if isinstance(cfg, str):
        if cfg not in GPT_CONFIGS:
            raise ValueError(f"unknown GPT preset {cfg!r}; choose one of {', '.join(GPT_CONFIGS)}")
        return dict(GPT_CONFIGS[cfg])
    if not isinstance(cfg, Mapping):
        raise TypeError(f"cfg must be a preset name or a dict, not {type(cfg).__name__}")
    missing = [key for key in CONFIG_KEYS if key not in cfg]
    if missing:
        raise ValueError(f"GPT config is missing {missing}; it needs all of {list(CONFIG_KEYS)}")
    cfg = dict(cfg)
    if cfg["emb_dim"] % cfg["n_heads"]:
        raise ValueError(f"emb_dim={cfg['emb_dim']} must be divisible by n_heads={cfg['n_heads']}")
    if not 0.0 <= cfg["drop_rate"] < 1.0:
        raise ValueError(f"drop_rate={cfg['drop_rate']} must be in [0, 1)")
    return cfg


class MultiHeadAttention(nn.Module):
    """Causal self-attention: each position attends to itself and the positions before it."""

    def __init__(
        self, in_dim: int, out_dim: int, num_heads: int, dropout: float = 0.0, qkv_bias: bool = True
    ) -> None:
        super().__init__()
        if out_dim % num_heads:
            raise ValueError(f"out_dim={out_dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = out_dim // num_heads
        self.dropout = dropout
        self.W_query = nn.Linear(in_dim, out_dim, bias=qkv_bias)
        self.W_key = nn.Linear(in_dim, out_dim, bias=qkv_bias)
        self.W_value = nn.Linear(in_dim, out_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        # (b, t, out_dim) -> (b, heads, t, head_dim): every head attends independently.
        q, k, v = (
            proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.W_query, self.W_key, self.W_value)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.out_proj(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """Position-wise MLP: widen 4x, GELU (GPT-2's tanh approximation), project back."""

    def __init__(self, emb_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(emb_dim, 4 * emb_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * emb_dim, emb_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attention(norm(x)), then x + feed-forward(norm(x))."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg["emb_dim"], eps=1e-5)
        self.att = MultiHeadAttention(
            cfg["emb_dim"],
            cfg["emb_dim"],
            cfg["n_heads"],
            dropout=cfg["drop_rate"],
            qkv_bias=cfg["qkv_bias"],
        )
        self.norm2 = nn.LayerNorm(cfg["emb_dim"], eps=1e-5)
        self.ff = FeedForward(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """GPT-2: token ids ``[batch, time]`` in, next-token logits ``[batch, time, vocab]`` out.

    ``out_head.weight`` is the same tensor as ``tok_emb.weight`` (weight tying, as in GPT-2),
    so the parameter count matches the published 124M for ``gpt2-small``.
    """

    def __init__(self, cfg: str | Mapping) -> None:
        super().__init__()
        self.cfg = cfg = resolve_config(cfg)
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*(TransformerBlock(cfg) for _ in range(cfg["n_layers"])))
        self.final_norm = nn.LayerNorm(cfg["emb_dim"], eps=1e-5)
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        self.apply(_init_weights)
        self.out_head.weight = self.tok_emb.weight

    def hidden_states(self, in_idx: Tensor) -> Tensor:
        """The final-normalised hidden states ``[batch, time, emb_dim]``, before the output head."""
        if in_idx.ndim != 2:
            raise ValueError(
                f"expected token ids of shape [batch, time], got {tuple(in_idx.shape)}"
            )
        t = in_idx.shape[1]
        if t > self.cfg["context_length"]:
            raise ValueError(
                f"sequence of {t} tokens is longer than "
                f"context_length={self.cfg['context_length']}; crop or split it"
            )
        positions = torch.arange(t, device=in_idx.device)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(positions))
        return self.final_norm(self.trf_blocks(x))

    def forward(self, in_idx: Tensor) -> Tensor:
        return self.out_head(self.hidden_states(in_idx))


def _init_weights(module: nn.Module) -> None:
    """GPT-2's initialisation: normal(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------
# Loading Hugging Face GPT-2 weights
# ---------------------------------------------------------------------------------------

# Causal-mask buffers that some Hugging Face checkpoints store next to the parameters.
_HF_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


def _hf_key_map(cfg: dict) -> dict[str, tuple[list[str], bool]]:
    """Hugging Face key -> (our parameter names, is_conv1d).

    Hugging Face's ``Conv1D`` stores weights as (in, out), the transpose of ``nn.Linear``;
    its fused ``c_attn`` holds query, key and value side by side (split after transposing).
    """
    keys: dict[str, tuple[list[str], bool]] = {
        "wte.weight": (["tok_emb.weight"], False),
        "wpe.weight": (["pos_emb.weight"], False),
        "ln_f.weight": (["final_norm.weight"], False),
        "ln_f.bias": (["final_norm.bias"], False),
    }
    for i in range(cfg["n_layers"]):
        hf, ours = f"h.{i}.", f"trf_blocks.{i}."
        qkv = [f"{ours}att.{name}" for name in ("W_query", "W_key", "W_value")]
        for part in ("weight", "bias"):
            keys[f"{hf}ln_1.{part}"] = ([f"{ours}norm1.{part}"], False)
            keys[f"{hf}ln_2.{part}"] = ([f"{ours}norm2.{part}"], False)
        keys[f"{hf}attn.c_attn.weight"] = ([f"{name}.weight" for name in qkv], True)
        if cfg["qkv_bias"]:
            keys[f"{hf}attn.c_attn.bias"] = ([f"{name}.bias" for name in qkv], False)
        linears = (
            ("attn.c_proj", "att.out_proj"),
            ("mlp.c_fc", "ff.layers.0"),
            ("mlp.c_proj", "ff.layers.2"),
        )
        for hf_name, our_name in linears:
            keys[f"{hf}{hf_name}.weight"] = ([f"{ours}{our_name}.weight"], True)
            keys[f"{hf}{hf_name}.bias"] = ([f"{ours}{our_name}.bias"], False)
    return keys


def load_hf_state_dict(model: GPTModel, state_dict: Mapping[str, Tensor]) -> GPTModel:
    """Copy a Hugging Face GPT-2 state dict into ``model`` (in place) and return it.

    Keys may carry the ``transformer.`` prefix or not; ``lm_head.weight`` is accepted and
    ignored (it is tied to ``wte``), as are stored causal-mask buffers. Raises ValueError
    naming the key when one is missing, unexpected, or of the wrong shape.
    """
    key_map = _hf_key_map(model.cfg)
    params = dict(model.named_parameters(remove_duplicate=False))
    sd = {key.removeprefix("transformer."): tensor for key, tensor in state_dict.items()}
    wte_shape = tuple(params["tok_emb.weight"].shape)
    if "lm_head.weight" in sd and tuple(sd.pop("lm_head.weight").shape) != wte_shape:
        raise ValueError(f"lm_head.weight should have the shape of wte.weight {wte_shape}")

    unexpected = sorted(key for key in sd if key not in key_map and not _HF_BUFFERS.fullmatch(key))
    if unexpected:
        hint = (
            " (this model has qkv_bias=False)"
            if any(k.endswith("c_attn.bias") for k in unexpected)
            else ""
        )
        raise ValueError(
            f"unexpected key {unexpected[0]!r} in the GPT-2 state dict{hint}; "
            f"{len(unexpected)} unexpected in all"
        )
    missing = [key for key in key_map if key not in sd]
    if missing:
        raise ValueError(
            f"missing key {missing[0]!r} in the GPT-2 state dict; {len(missing)} missing in all"
        )

    with torch.no_grad():
        for hf_key, (names, conv1d) in key_map.items():
            tensor = sd[hf_key]
            targets = [params[name] for name in names]
            stacked = (sum(p.shape[0] for p in targets), *targets[0].shape[1:])
            expected = stacked[::-1] if conv1d else stacked
            if tuple(tensor.shape) != tuple(expected):
                raise ValueError(
                    f"key {hf_key!r} has shape {tuple(tensor.shape)}, expected {tuple(expected)}"
                )
            if conv1d:
                tensor = tensor.t()
            for param, piece in zip(
                targets, tensor.split([p.shape[0] for p in targets], dim=0), strict=True
            ):
                param.copy_(piece)
        if model.out_head.weight is not model.tok_emb.weight:
            model.out_head.weight.copy_(model.tok_emb.weight)
    return model


_REHEARSAL_WEIGHTS: dict[str, GPTModel] = {}  # rehearsal mode's stand-in for each checkpoint


def load_gpt2(
    name: str = "gpt2-small", *, cache_dir: Path | None = None, progress: bool = True
) -> GPTModel:
    """GPT-2 with OpenAI's pretrained weights, in eval mode.

    Downloads (once, verified) the Hugging Face ``model.safetensors`` for ``name`` via
    :func:`lora_tutorial.runtime.download.fetch` and reads it with safetensors. In rehearsal mode
    (:mod:`lora_tutorial.runtime.rehearsal`) it builds the same model with the same code but
    keeps its random initial weights and downloads nothing: full size, meaningless outputs. Like
    a checkpoint, those weights are drawn once (per process and name) and every call returns a
    copy of them.
    """
    if name not in GPT_CONFIGS or name not in download.KNOWN_FILES:
        choices = [key for key in GPT_CONFIGS if key in download.KNOWN_FILES]
        raise ValueError(f"no pretrained weights for {name!r}; choose one of {', '.join(choices)}")
    if config.is_rehearsal():
        if name not in _REHEARSAL_WEIGHTS:
            _REHEARSAL_WEIGHTS[name] = GPTModel(name)
        model = copy.deepcopy(_REHEARSAL_WEIGHTS[name])
        count = sum(p.numel() for p in model.parameters())
        print(
            f"REHEARSAL: {name} built with random weights ({count:,} parameters); "
            "nothing downloaded"
        )
        return model.eval()
    path = download.fetch(name, cache_dir=cache_dir, progress=progress)
    model = GPTModel(name)
    load_hf_state_dict(model, load_file(path))
    return model.eval()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """In the block, ``model`` in eval mode (no dropout) without gradients; its mode restored after.

    Generation and evaluation both run this way, and training can go on afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------
# Tokenizer and generation
# ---------------------------------------------------------------------------------------


def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2's byte-pair encoding (50,257 tokens), from local files if the data folder has them."""
    download.use_offline_tiktoken()
    return tiktoken.get_encoding("gpt2")


def text_to_token_ids(text: str, tokenizer: tiktoken.Encoding) -> Tensor:
    """Token ids of ``text`` as a ``[1, t]`` LongTensor (a batch of one)."""
    return torch.tensor(
        tokenizer.encode(text, allowed_special={"<|endoftext|>"}), dtype=torch.long
    ).unsqueeze(0)


def token_ids_to_text(token_ids: Tensor, tokenizer: tiktoken.Encoding) -> str:
    """Decode ``[t]`` or ``[1, t]`` token ids back to text."""
    ids = torch.as_tensor(token_ids)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1:
        raise ValueError(f"expected token ids of shape [t] or [1, t], got {tuple(ids.shape)}")
    return tokenizer.decode(ids.tolist())


def generate(
    model: GPTModel,
    token_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
) -> Tensor:
    """Extend ``token_ids [batch, t]`` by up to ``max_new_tokens`` tokens, one at a time.

    ``temperature=0`` picks the most likely token (greedy, deterministic); a positive
    temperature samples from the softmax of ``logits / temperature``, restricted to the
    ``top_k`` most likely tokens when given. Only the last ``context_length`` tokens are
    fed to the model. Stops early when the newest token is ``eos_id`` (in every sequence of
    the batch). Runs in eval mode (no dropout) and restores the model's previous mode.
    """
    if token_ids.ndim != 2:
        raise ValueError(f"token_ids must have shape [batch, t], got {tuple(token_ids.shape)}")
    check_number("temperature", temperature, at_least=0, hint="0 means greedy")
    if top_k is not None:
        check_number("top_k", top_k, integer=True, at_least=1, hint="or None for every token")
    context_length = model.pos_emb.num_embeddings
    idx = token_ids.to(model.pos_emb.weight.device)
    with eval_mode(model):
        for _ in range(max_new_tokens):
            logits = model(idx[:, -context_length:])[:, -1, :]
            if top_k is not None:
                kth_best = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth_best, float("-inf"))
            if temperature > 0:
                next_id = torch.multinomial(
                    torch.softmax(logits / temperature, dim=-1), num_samples=1
                )
            else:
                next_id = logits.argmax(dim=-1, keepdim=True)
            idx = torch.cat([idx, next_id], dim=1)
            if eos_id is not None and bool((next_id == eos_id).all()):
                break
    return idx
