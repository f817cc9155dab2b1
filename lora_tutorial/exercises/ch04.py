"""Checks for chapter 4 (the SMS spam data): repeated messages, leaks, pooling the real tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
import torch

from lora_tutorial import data
from lora_tutorial.exercises._feedback import (
    Check,
    Verdict,
    call,
    close,
    field,
    integer,
    outcome,
    tensor,
    type_name,
)


def _repeats() -> pd.DataFrame:
    """Eight messages: three write 'win a prize now' differently, two are 'ok', three unique."""
    texts = [
        "win a prize now",
        "ok",
        "WIN a PRIZE now",  # case
        "Win a prize, now!",  # punctuation: a different message
        "win a  prize\tnow ",  # whitespace
        "see you at 5",
        " OK",  # case and a leading space
        "see you at five",
    ]
    labels = [1, 0, 1, 1, 1, 0, 0, 0]
    return pd.DataFrame({"Label": labels, "Text": texts})


def _probe_dedupe(dedupe: Callable[[pd.DataFrame], pd.DataFrame]) -> dict:
    """The learner's frame for the eight examples, their frame afterwards, and how many rows the
    learner's function keeps of the whole collection."""
    frame = _repeats()
    result = call(dedupe, frame)
    whole, err = call(dedupe, data.read_messages())
    rows = len(whole) if type(whole) is pd.DataFrame and err is None else None
    return {"result": result, "after": frame, "whole": (rows, err), "whole_type": type_name(whole)}


def _same_frame(got: Any, want: pd.DataFrame) -> bool:
    """The same columns, index and cells (NaN is never the same)."""
    return (
        type(got) is pd.DataFrame
        and list(got.columns) == list(want.columns)
        and got.index.tolist() == want.index.tolist()
        and all(got[c].tolist() == want[c].tolist() for c in want.columns)
    )


def _judge_dedupe(seen: object) -> Verdict:
    out, error = outcome(field(seen, "result", tuple))
    if error:
        return [f"your function raised {error}"], ""
    if type(out) is not pd.DataFrame:
        return [f"return a pandas DataFrame, not {type_name(out)}"], ""
    before = _repeats()
    problems: list[str] = []
    if not _same_frame(field(seen, "after", pd.DataFrame), before):
        problems.append("your function changed the DataFrame it was given; work on a copy")
    if list(out.columns) != list(before.columns):
        return [f"keep the columns {list(before.columns)}; yours are {list(out.columns)}"], ""
    kept, texts = out.index.tolist(), out["Text"].tolist()
    want = [0, 1, 3, 5, 7]
    if kept != want or any(type(i) is not int for i in kept):
        if texts == before["Text"][want].tolist():
            problems.append("keep each row's index as it was (no reset_index)")
        elif sorted(kept, key=repr) == want:
            problems.append("keep the rows in their original order")
        elif set(kept) == {3, 4, 5, 6, 7}:
            problems.append("keep the first of each repeated message, not the last")
        elif "WIN a PRIZE now" in texts:
            problems.append("'WIN a PRIZE now' repeats 'win a prize now': compare in lower case")
        elif "win a  prize\tnow " in texts or " OK" in texts:
            problems.append(
                "'win a  prize<TAB>now ' repeats 'win a prize now': make every run of "
                "whitespace (spaces, tabs, newlines) one space and trim the ends"
            )
        elif 3 not in kept:
            problems.append(
                "'Win a prize, now!' is a different message from 'win a prize now': only "
                "whitespace and case may differ"
            )
        else:
            problems.append(f"you kept the rows {kept}; the first of each message are {want}")
    elif texts != before["Text"][want].tolist():
        problems.append("keep each kept row's message as it was")
    if problems:
        return problems, ""
    rows, error = outcome(field(seen, "whole", tuple))
    if error or integer(rows) is None:
        found = error or f"{field(seen, 'whole_type', str)}, not a DataFrame"
        return [f"on the whole collection your function gave {found}"], ""
    messages = data.read_messages()
    dropped = len(messages) - rows
    expected = len(messages) - len(data.drop_duplicates(messages))
    if dropped != expected:
        problems.append(
            f"on the whole collection you drop {dropped} rows; repeats of an earlier message "
            f"(ignoring whitespace and case) are {expected}"
        )
    return (
        problems,
        f"on the whole collection it drops {dropped:,} of {len(messages):,} messages, "
        "as data.drop_duplicates does.",
    )


check_dedupe = Check(_probe_dedupe, _judge_dedupe)
"""Check ``dedupe(frame)`` drops repeated messages, ignoring whitespace and case.

A right answer keeps the first row of each message, keeps the rows' order and index, leaves its
input unchanged and, on the whole collection, drops as many rows as the package does.
"""


def _leak_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    train = pd.DataFrame(
        {
            "Label": [1, 0, 1, 0, 0, 0],
            "Text": ["Win a PRIZE", "ok", "win a prize", "OK", "Ok", "see you"],
        }
    )
    other = pd.DataFrame(
        {"Label": [1, 1, 0, 0, 1], "Text": ["win a  prize", "WIN A PRIZE ", "bye", "ok", "win"]}
    )
    return train, other


def _probe_count_leaks(count_leaks: Callable[[pd.DataFrame, pd.DataFrame], int]) -> dict:
    """The learner's count for two small frames, with the name of its type (a NumPy integer
    arrives as a plain int otherwise) and whether it has ``.item()``."""
    got, error = call(count_leaks, *_leak_frames())
    has_item = type(got) is not bool and call(hasattr, got, "item")[0] is True
    return {"result": (got, error), "type": type_name(got), "item": has_item}


def _judge_count_leaks(seen: object) -> Verdict:
    got, error = outcome(field(seen, "result", tuple))
    if error:
        return [f"your function raised {error}"], ""
    kind = field(seen, "type", str)
    if kind != "int" or integer(got) is None:
        hint = " (convert with int(...))" if field(seen, "item", bool) else ""
        return [f"return an int, not {kind if kind != 'int' else type_name(got)}{hint}"], ""
    hints = {
        2: "count every row of `other` whose message is in `train` (two rows of `other` repeat "
        "the same message: both count), or compare after normalising",
        1: "compare after normalising: lower case, every run of whitespace one space",
        5: "you counted rows of `train`: count rows of the second argument (`other`) whose "
        "message is in the first (`train`)",
        4: "'win' is only part of 'Win a PRIZE': count exact (normalised) matches",
    }
    if got != 3:
        return [hints.get(got, f"you counted {got}; 3 rows of `other` are training messages")], ""
    naive = data.appendix_e_split(data.read_messages(), seed=7)
    leaked = data.overlap(naive.train, naive.test)
    return (
        [],
        f"with seed 7, {leaked} of appendix E's {len(naive.test)} test messages are training "
        "messages too. How close was your prediction?",
    )


check_count_leaks = Check(_probe_count_leaks, _judge_count_leaks)
"""Check ``count_leaks(train, other)``: the rows of ``other`` whose message is in ``train``.

Messages are compared after normalising whitespace and case; each row of ``other`` counts, so a
message held out twice and seen in training counts twice. The answer is an ``int``. On success the
check measures appendix E's split with seed 7, the number to compare with the learner's
prediction.
"""

_BATCH, _TIME, _EMB = 4, 7, 5


def _pooling_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(_BATCH, _TIME, _EMB, generator=generator)
    return hidden, torch.tensor([3, 7, 1, 5])


def _probe_mean_pooling(pool_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple:
    return call(pool_fn, *_pooling_inputs())


def _judge_mean_pooling(seen: object) -> Verdict:
    out, error = outcome(seen)
    if error:
        return [f"your function raised {error}"], ""
    got = tensor(out)
    if got is None:
        return [f"return a tensor, not {type_name(out)}"], ""
    if tuple(got.shape) != (_BATCH, _EMB):
        return [
            f"the result should have shape [batch, emb] = {[_BATCH, _EMB]}, not {list(got.shape)}"
        ], ""
    hidden, lengths = _pooling_inputs()
    sizes = lengths.tolist()
    want = torch.stack([hidden[i, :n].mean(0) for i, n in enumerate(sizes)])
    if close(got, want, atol=1e-5, rtol=0.0):
        return [], "each message is summarised by its own tokens only."
    sums = torch.stack([hidden[i, :n].sum(0) for i, n in enumerate(sizes)])
    if close(got, hidden.mean(1), atol=1e-5, rtol=0.0):
        problem = (
            "you averaged every position: the padding positions count too; "
            "average only the first `length` positions of each row"
        )
    elif close(got, hidden[torch.arange(_BATCH), lengths - 1], atol=1e-5, rtol=0.0):
        problem = "that is the last real token; average all the real tokens instead"
    elif close(got, sums, atol=1e-5, rtol=0.0):
        problem = "that is the sum of the real tokens: divide by each row's length"
    else:
        right = [close(got[i], want[i], atol=1e-5, rtol=0.0) for i in range(_BATCH)]
        rows = [i for i in range(_BATCH) if not right[i]]
        problem = f"rows {rows} are not the mean of their first `length` positions"
    return [problem], ""


check_mean_pooling = Check(_probe_mean_pooling, _judge_mean_pooling)
"""Check ``pool_fn(hidden, lengths)`` averages each row's real tokens, leaving out padding.

``hidden`` is ``[batch, time, emb]`` from right-padded input and ``lengths`` holds each message's
number of real tokens; the answer is ``[batch, emb]``.
"""


__all__ = ["check_count_leaks", "check_dedupe", "check_mean_pooling"]
