"""Checks for chapter 4 (the SMS spam data)."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch

from lora_tutorial.exercises._feedback import (
    Check,
    Verdict,
    call,
    close,
    describe,
    field,
    outcome,
    tensor,
)


def _pooling_case() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(4, 7, 5), torch.tensor([3, 7, 1, 5])


def _probe_pooling(pool_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple:
    hidden, lengths = _pooling_case()
    return call(pool_fn, hidden.clone(), lengths.clone())


def _judge_pooling(data: object) -> Verdict:
    hidden, lengths = _pooling_case()
    batch, time, emb = hidden.shape
    want = hidden[torch.arange(batch), lengths - 1]
    out, err = outcome(data)
    if err:
        hint = (
            " (an index equal to the length is one past the last real token)"
            if err.startswith("IndexError")
            else ""
        )
        return [f"your function raised {err}{hint}"], ""
    problems: list[str] = []
    got = tensor(out)
    if got is None:
        problems.append(f"return a tensor, not {describe(out)}")
    elif tuple(got.shape) != (batch, emb):
        problems.append(
            f"the result should have shape [batch, emb] = {[batch, emb]}, not {list(got.shape)}"
        )
    elif not close(got, want, atol=1e-8, rtol=1e-5):
        rows = [i for i in range(batch) if not close(got[i], want[i], atol=1e-8, rtol=1e-5)]
        if close(got, hidden[:, -1], atol=1e-8, rtol=1e-5):
            problems.append(
                "you read position -1: for every message shorter than the batch "
                "that is a padding token"
            )
        elif all(
            lengths[i] < time and close(got[i], hidden[i, lengths[i]], atol=1e-8, rtol=1e-5)
            for i in rows
        ):
            problems.append(
                "off by one: position `length` is the first padding token; "
                "the last real one is `length - 1`"
            )
        else:
            problems.append(
                f"rows {rows} are not the hidden state at position length - 1 of their message"
            )
    return problems, "each message is read at its own last real token."


check_pooling = Check(_probe_pooling, _judge_pooling)
"""Check ``pool_fn(hidden, lengths)`` picks each sequence's last real token.

``hidden`` is ``[batch, time, emb]`` from right-padded input and ``lengths`` holds each message's
number of real tokens; the answer must be ``[batch, emb]``.
"""


def _probe_balance(balance_fn: Callable[[pd.DataFrame, int], pd.DataFrame]) -> dict:
    df = _toy_messages()
    out = call(balance_fn, df, 123)
    return {
        "out": out,
        "again": call(balance_fn, df.copy(), 123),
        "other": call(balance_fn, df.copy(), 7),
        "input_after": df,
    }


def _judge_balance(data: object) -> Verdict:
    label_column = "Label"
    before = _toy_messages()
    results = [outcome(field(data, key, tuple)) for key in ("out", "again", "other")]
    errors = [err for _, err in results if err]
    if errors:
        return [f"your function raised {errors[0]}"], ""
    out, again, other = (result for result, _ in results)
    not_frames = [describe(r) for r in (out, again, other) if type(r) is not pd.DataFrame]
    if not_frames:
        return [f"return a pandas DataFrame, not {not_frames[0]}"], ""
    problems: list[str] = []
    after = field(data, "input_after", pd.DataFrame)
    if not after.equals(before):
        problems.append("your function changed the DataFrame it was given; work on a copy")
    if label_column not in out.columns or "Text" not in out.columns:
        return [f"keep the columns Label and Text; yours are {list(out.columns)}"], ""
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
    return problems, "both classes now have the size of the smaller one."


check_balance = Check(_probe_balance, _judge_balance)
"""Check ``balance_fn(df, seed)`` undersamples ham (``Label`` 0) to the count of spam (``Label`` 1).

A right answer keeps every spam message, draws as many ham messages without repeats, leaves its
input unchanged and gives the same rows for the same seed.
"""


def _toy_messages() -> pd.DataFrame:
    """12 ham (``Label`` 0) and 8 spam (``Label`` 1) messages, each text unique, like
    ``data.read_messages`` gives them.

    Few ham messages, so that drawing 8 of them with replacement almost surely repeats one.
    """
    labels = [0] * 12 + [1] * 8
    texts = [f"{'spam' if label else 'ham'} message number {i}" for i, label in enumerate(labels)]
    frame = pd.DataFrame({"Label": labels, "Text": texts})
    return frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
