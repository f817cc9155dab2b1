"""Checks for chapter 4 (the SMS spam data)."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch

from lora_tutorial.exercises._feedback import report


def check_pooling(pool_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """Check ``pool_fn(hidden, lengths)`` picks each sequence's last real token.

    ``hidden`` is ``[batch, time, emb]`` from right-padded input and ``lengths`` holds each
    message's number of real tokens; the answer must be ``[batch, emb]``.
    """
    torch.manual_seed(0)
    batch, time, emb = 4, 7, 5
    hidden = torch.randn(batch, time, emb)
    lengths = torch.tensor([3, 7, 1, 5])
    want = hidden[torch.arange(batch), lengths - 1]
    try:
        got = pool_fn(hidden.clone(), lengths.clone())
    except Exception as exc:  # a learner's bug: say it in words instead of a traceback
        hint = (
            " (an index equal to the length is one past the last real token)"
            if isinstance(exc, IndexError)
            else ""
        )
        return report([f"your function raised {type(exc).__name__}: {exc}{hint}"], "")
    problems: list[str] = []
    if not isinstance(got, torch.Tensor):
        problems.append(f"return a tensor, not {type(got).__name__}")
    elif tuple(got.shape) != (batch, emb):
        problems.append(
            f"the result should have shape [batch, emb] = {[batch, emb]}, not {list(got.shape)}"
        )
    elif not torch.allclose(got, want):
        rows = [i for i in range(batch) if not torch.allclose(got[i], want[i])]
        if torch.allclose(got, hidden[:, -1]):
            problems.append(
                "you read position -1: for every message shorter than the batch "
                "that is a padding token"
            )
        elif all(lengths[i] < time and torch.allclose(got[i], hidden[i, lengths[i]]) for i in rows):
            problems.append(
                "off by one: position `length` is the first padding token; "
                "the last real one is `length - 1`"
            )
        else:
            problems.append(
                f"rows {rows} are not the hidden state at position length - 1 of their message"
            )
    return report(problems, "each message is read at its own last real token.")


def check_balance(balance_fn: Callable[[pd.DataFrame, int], pd.DataFrame]) -> bool:
    """Check ``balance_fn(df, seed)`` undersamples ham (``Label`` 0) to the count of spam
    (``Label`` 1).

    A right answer keeps every spam message, draws as many ham messages without repeats,
    leaves its input unchanged and gives the same rows for the same seed.
    """
    label_column = "Label"
    df = _toy_messages()
    before = df.copy()
    try:
        out = balance_fn(df, 123)
        again = balance_fn(df.copy(), 123)
        other = balance_fn(df.copy(), 7)
    except Exception as exc:
        return report([f"your function raised {type(exc).__name__}: {exc}"], "")
    problems: list[str] = []
    not_frames = [
        type(result).__name__
        for result in (out, again, other)
        if not isinstance(result, pd.DataFrame)
    ]
    if not_frames:
        return report([f"return a pandas DataFrame, not {not_frames[0]}"], "")
    if not df.equals(before):
        problems.append("your function changed the DataFrame it was given; work on a copy")
    if label_column not in out.columns or "Text" not in out.columns:
        return report([f"keep the columns Label and Text; yours are {list(out.columns)}"], "")
    n_spam = int((before[label_column] == 1).sum())
    kept_spam, kept_ham = int((out[label_column] == 1).sum()), int((out[label_column] == 0).sum())
    if kept_spam != n_spam:
        problems.append(f"keep all {n_spam} spam messages (the rare class); you kept {kept_spam}")
    if kept_ham != n_spam:
        problems.append(
            f"draw as many ham messages as there are spam ({n_spam}); you kept {kept_ham}"
        )
    if out["Text"].duplicated().any() or (
        "Text" in other.columns and other["Text"].duplicated().any()
    ):
        problems.append("some messages appear twice: sample without replacement")
    if not set(out["Text"]) <= set(before["Text"]):
        problems.append("the result holds messages that were not in the input")
    if not out.reset_index(drop=True).equals(again.reset_index(drop=True)):
        problems.append(
            "the same seed should give the same rows: pass it to the sampler (random_state=seed)"
        )
    return report(problems, "both classes now have the size of the smaller one.")


def _toy_messages() -> pd.DataFrame:
    """12 ham (``Label`` 0) and 8 spam (``Label`` 1) messages, each text unique, like
    ``data.read_messages`` gives them.

    Few ham messages, so that drawing 8 of them with replacement almost surely repeats one.
    """
    labels = [0] * 12 + [1] * 8
    texts = [f"{'spam' if label else 'ham'} message number {i}" for i, label in enumerate(labels)]
    frame = pd.DataFrame({"Label": labels, "Text": texts})
    return frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
