"""A GPT backbone turned into a classifier: a small new head read at one token per message.

GPT's output head maps each position's hidden state to 50,257 token scores. For spam or ham
we replace it with ``nn.Linear(emb_dim, 2)`` and read it at a single position. Causal attention
means only the last position has seen the whole message, but in a right-padded batch position
``-1`` is a padding token for every message shorter than the longest one. ``pooling="last_real"``
(the default) reads position ``length - 1`` of each row instead; ``pooling="last"`` keeps the
naive choice so that a chapter can compare the two.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_tutorial.data import LABELS, PAD_TOKEN_ID
from lora_tutorial.gpt import GPTModel

POOLINGS = ("last_real", "last")


def pool(
    hidden: torch.Tensor, lengths: torch.Tensor | None, pooling: str = "last_real"
) -> torch.Tensor:
    """Pick one hidden state per row: ``[batch, tokens, emb] -> [batch, emb]``.

    ``"last_real"`` takes position ``lengths[i] - 1`` of row ``i`` (``lengths=None`` means the
    rows have no padding, so the last position is the last real token); ``"last"`` takes
    position ``-1`` whatever it holds.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}")
    if pooling == "last" or lengths is None:
        return hidden[:, -1, :]
    lengths = lengths.to(hidden.device)
    if lengths.shape != hidden.shape[:1] or bool(
        ((lengths < 1) | (lengths > hidden.shape[1])).any()
    ):
        raise ValueError(
            f"lengths must hold one value in 1..{hidden.shape[1]} per row of the batch of "
            f"{hidden.shape[0]}, got {lengths.tolist()}"
        )
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, lengths - 1]


class GPTClassifier(nn.Module):
    """``gpt`` with its output head replaced by ``nn.Linear(emb_dim, num_classes)``.

    ``forward(input_ids, lengths)`` returns class logits ``[batch, num_classes]``. The head
    stays at ``gpt.out_head``, so parameter names are those of the language model (handy for
    choosing which parameters to train).
    """

    new_modules = ("gpt.out_head",)  # made here, not pretrained: an adapter file may replace it

    def __init__(self, gpt: GPTModel, num_classes: int = 2, pooling: str = "last_real") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
        old: torch.Tensor = gpt.out_head.weight  # the new head lives where the backbone does
        gpt.out_head = nn.Linear(old.shape[1], num_classes, device=old.device, dtype=old.dtype)
        self.gpt = gpt
        self.pooling = pooling
        self.num_classes = num_classes

    @property
    def context_length(self) -> int:
        return int(self.gpt.pos_emb.num_embeddings)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.gpt.out_head(pool(self.gpt.hidden_states(input_ids), lengths, self.pooling))


@torch.no_grad()
def classify_text(
    model: GPTClassifier,
    tokenizer,
    text: str,
    *,
    max_length: int | None = None,
    pad_token_id: int = PAD_TOKEN_ID,
    labels: tuple[str, ...] = LABELS,
    device: torch.device | str | None = None,
) -> tuple[str, float]:
    """Classify one message: ``("spam" | "ham", probability of that label)``.

    The message is cut to ``max_length`` tokens (default: the model's context length). With
    ``pooling="last"`` it is also padded to ``max_length``, reproducing what that pooling sees
    in a padded batch; ``"last_real"`` needs no padding.
    """
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
    ):
        raise ValueError(
            f"max_length={max_length!r}: give a whole number of tokens, at least 1 (or None for "
            "the model's context length)"
        )
    encode = getattr(tokenizer, "encode_ordinary", None) or tokenizer.encode
    ids = encode(text)
    if not ids:
        raise ValueError("the text has no tokens; give a non-empty message")
    limit = min(max_length or model.context_length, model.context_length)  # 0 is refused above
    ids = ids[:limit]
    length = len(ids)
    if model.pooling == "last" and max_length is not None:
        ids = ids + [pad_token_id] * (limit - length)
    if device is None:
        device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids, torch.tensor([length], device=device))
    finally:
        model.train(was_training)
    probs = torch.softmax(logits[0].float(), dim=-1)
    label = int(probs.argmax())
    return labels[label], float(probs[label])
