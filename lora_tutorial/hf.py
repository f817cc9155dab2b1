"""The book's GPT-2 and LoRA in Hugging Face's terms: weights for ``transformers``, names for PEFT.

- :func:`to_hf_state_dict` writes a :class:`~lora_tutorial.gpt.GPTModel`'s weights in the layout of
  ``transformers``' ``GPT2Model`` (the inverse of :func:`~lora_tutorial.gpt.load_hf_state_dict`),
  so the same weights (pretrained, or random in quick and rehearsal mode) run in both libraries;
  :func:`gpt2_config_kwargs` gives the matching ``GPT2Config`` arguments.
- :data:`HF_MODULES` and :func:`peft_target_modules` map our layer names to GPT-2's module names in
  ``transformers``, where query, key and value are one fused layer, ``attn.c_attn``.
- :data:`PEFT_NAMES`: each of the book's functions and variants and what PEFT calls it.

Nothing here imports ``transformers`` or ``peft``; the chapter and the tests do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from lora_tutorial.gpt import GPTModel

# Our linear layer (suffix inside a block) -> GPT-2's module in transformers (inside ``h.<i>``).
HF_MODULES: dict[str, str] = {
    "W_query": "attn.c_attn",
    "W_key": "attn.c_attn",
    "W_value": "attn.c_attn",
    "out_proj": "attn.c_proj",
    "ff.layers.0": "mlp.c_fc",
    "ff.layers.2": "mlp.c_proj",
}

# (the book, PEFT): functions and variants of chapters 3 to 8 and their PEFT spelling.
PEFT_NAMES: list[tuple[str, str]] = [
    (
        "lora.replace_linear_with_lora(model, rank, alpha, include=...)",
        "get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=[...]))",
    ),
    ("include / exclude name patterns", "target_modules / exclude_modules"),
    ("mark_only_lora_as_trainable(model, extra_modules)", "LoraConfig(modules_to_save=[...])"),
    (
        "LoRALayer A (in_dim, rank), B (rank, out_dim)",
        "lora_A.weight (rank, in), lora_B.weight (out, rank)",
    ),
    ("scaling alpha / rank", "LoraConfig default"),
    ("use_rslora=True (alpha / sqrt(rank))", "LoraConfig(use_rslora=True)"),
    ("variants.LinearWithDoRA", "LoraConfig(use_dora=True)"),
    ("variants.LinearWithPiSSA", 'LoraConfig(init_lora_weights="pissa")'),
    ("variants.replace_linear_with_vera", "VeraConfig(r=..., target_modules=[...])"),
    ("variants.create_loraplus_optimizer", "peft.optimizers.create_loraplus_optimizer"),
    (
        "quantize.LinearWithQLoRA (NF4 base)",
        "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4') + LoraConfig",
    ),
    ("lora.merge_lora / unmerge_lora", "model.merge_adapter() / unmerge_adapter()"),
    ("lora.merge_and_unload", "model.merge_and_unload()"),
    (
        "adapters.save_adapter / load_adapter",
        "model.save_pretrained(dir) / PeftModel.from_pretrained(base, dir)",
    ),
    (
        "serving.MultiAdapterModel (adapter_ids per row)",
        "model(..., adapter_names=[...]) (mixed-batch inference)",
    ),
]


class TransformersClassifier(nn.Module):
    """A ``transformers`` sequence classifier (PEFT-wrapped or not) called like our
    :class:`~lora_tutorial.classify.GPTClassifier`: ``model(input_ids, lengths) -> logits``, so that
    :func:`~lora_tutorial.train.train_classifier` and :func:`~lora_tutorial.train.evaluate` run it.

    ``transformers``' GPT-2 classifier reads the last token that is not ``pad_token_id``, which for
    right-padded messages is the last real token, as ours does; ``lengths`` is therefore not needed.
    """

    def __init__(self, model: nn.Module, num_classes: int = 2) -> None:
        super().__init__()
        self.model = model
        self.num_classes = num_classes

    def forward(self, input_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        return self.model(input_ids=input_ids).logits


def peft_target_modules(targets: Iterable[str]) -> list[str]:
    """PEFT ``target_modules`` for our layer names (as in ``train.LORA_TARGETS``), in order."""
    names: list[str] = []
    for target in targets:
        if target not in HF_MODULES:
            raise ValueError(
                f"no GPT-2 module in transformers for {target!r}; known: {list(HF_MODULES)}"
            )
        if HF_MODULES[target] not in names:
            names.append(HF_MODULES[target])
    return names


def gpt2_config_kwargs(cfg: Mapping) -> dict:
    """Keyword arguments of ``transformers.GPT2Config`` for the architecture ``GPTModel(cfg)``."""
    if not cfg["qkv_bias"]:
        raise ValueError("transformers' GPT-2 always has query/key/value biases; use qkv_bias=True")
    drop = cfg["drop_rate"]
    return {
        "vocab_size": cfg["vocab_size"],
        "n_positions": cfg["context_length"],
        "n_embd": cfg["emb_dim"],
        "n_layer": cfg["n_layers"],
        "n_head": cfg["n_heads"],
        "resid_pdrop": drop,
        "embd_pdrop": drop,
        "attn_pdrop": drop,
        "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new",  # GELU, tanh approximation, as gpt.FeedForward
    }


@torch.no_grad()
def to_hf_state_dict(model: GPTModel) -> dict[str, Tensor]:
    """``model``'s weights (a ``GPTModel``, no adapters) keyed and shaped as ``GPT2Model`` expects.

    ``transformers`` stores linear weights as ``(in, out)`` (its ``Conv1D``) and query, key and
    value side by side in ``c_attn``. Load the result with ``GPT2Model.load_state_dict``.
    """
    p = {name: t.detach().clone() for name, t in model.state_dict().items()}
    if any(".linear." in name or ".lora." in name for name in p):
        raise ValueError("model has adapter layers; export the base model (or merge_and_unload)")
    out = {
        "wte.weight": p["tok_emb.weight"],
        "wpe.weight": p["pos_emb.weight"],
        "ln_f.weight": p["final_norm.weight"],
        "ln_f.bias": p["final_norm.bias"],
    }
    for i in range(model.cfg["n_layers"]):
        ours, hf = f"trf_blocks.{i}.", f"h.{i}."
        qkv = [f"{ours}att.{n}" for n in ("W_query", "W_key", "W_value")]
        out[f"{hf}attn.c_attn.weight"] = torch.cat([p[f"{n}.weight"] for n in qkv]).T.contiguous()
        out[f"{hf}attn.c_attn.bias"] = torch.cat([p[f"{n}.bias"] for n in qkv])
        for hf_name, our_name in (
            ("attn.c_proj", "att.out_proj"),
            ("mlp.c_fc", "ff.layers.0"),
            ("mlp.c_proj", "ff.layers.2"),
        ):
            out[f"{hf}{hf_name}.weight"] = p[f"{ours}{our_name}.weight"].T.contiguous()
            out[f"{hf}{hf_name}.bias"] = p[f"{ours}{our_name}.bias"]
        for n in ("1", "2"):
            out[f"{hf}ln_{n}.weight"] = p[f"{ours}norm{n}.weight"]
            out[f"{hf}ln_{n}.bias"] = p[f"{ours}norm{n}.bias"]
    return out


__all__ = [
    "HF_MODULES",
    "PEFT_NAMES",
    "TransformersClassifier",
    "gpt2_config_kwargs",
    "peft_target_modules",
    "to_hf_state_dict",
]
