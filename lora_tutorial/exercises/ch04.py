"""Checks for chapter 4 (the SMS spam data): repeated messages, leaks, pooling the real tokens."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch

from lora_tutorial import data
from lora_tutorial.exercises._feedback import call, report


def check_dedupe(dedupe: Callable[[pd.DataFrame], pd.DataFrame]) -> bool:
    """Check ``dedupe(frame)`` drops repeated messages, ignoring whitespace and case.

    A right answer keeps the first row of each message, keeps the rows' order and index, leaves
    its input unchanged and, on the whole collection, drops as many rows as the package does.
    """
    frame = _repeats()
    before = frame.copy()
    out, error = call(dedupe, frame)
    if error:
        return report([f"your function raised {error}"], "")
    if type(out) is not pd.DataFrame:
        return report([f"return a pandas DataFrame, not {type(out).__name__}"], "")
    problems: list[str] = []
    if not frame.equals(before):
        problems.append("your function changed the DataFrame it was given; work on a copy")
    if list(out.columns) != list(before.columns):
        return report(
            [f"keep the columns {list(before.columns)}; yours are {list(out.columns)}"], ""
        )
    kept, texts = out.index.tolist(), out["Text"].tolist()
    want = [0, 1, 3, 5, 7]
    if kept != want:
        if texts == before["Text"][want].tolist():
            problems.append("keep each row's index as it was (no reset_index)")
        elif sorted(kept) == want:
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
    if problems:
        return report(problems, "")
    messages = data.read_messages()
    mine, error = call(dedupe, messages)
    if error or type(mine) is not pd.DataFrame:
        return report([f"on the whole collection your function gave {error or type(mine)}"], "")
    dropped, expected = (
        len(messages) - len(mine),
        len(messages) - len(data.drop_duplicates(messages)),
    )
    if dropped != expected:
        problems.append(
            f"on the whole collection you drop {dropped} rows; repeats of an earlier message "
            f"(ignoring whitespace and case) are {expected}"
        )
    return report(
        problems,
        f"on the whole collection it drops {dropped:,} of {len(messages):,} messages, "
        "as data.drop_duplicates does.",
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


def check_count_leaks(count_leaks: Callable[[pd.DataFrame, pd.DataFrame], int]) -> bool:
    """Check ``count_leaks(train, other)``: the rows of ``other`` whose message is in ``train``.

    Messages are compared after normalising whitespace and case; each row of ``other`` counts,
    so a message held out twice and seen in training counts twice. The answer is an ``int``.
    On success the check measures appendix E's split with seed 7, the number to compare with the
    learner's prediction.
    """
    train = pd.DataFrame(
        {
            "Label": [1, 0, 1, 0, 0, 0],
            "Text": ["Win a PRIZE", "ok", "win a prize", "OK", "Ok", "see you"],
        }
    )
    other = pd.DataFrame(
        {"Label": [1, 1, 0, 0, 1], "Text": ["win a  prize", "WIN A PRIZE ", "bye", "ok", "win"]}
    )
    got, error = call(count_leaks, train.copy(), other.copy())
    if error:
        return report([f"your function raised {error}"], "")
    if type(got) is not int:
        hint = " (convert with int(...))" if hasattr(got, "item") and type(got) is not bool else ""
        return report([f"return an int, not {type(got).__name__}{hint}"], "")
    problems: list[str] = []
    if got != 3:
        if got == 2:
            problems.append(
                "count every row of `other` whose message is in `train` (two rows of `other` "
                "repeat the same message: both count), or compare after normalising"
            )
        elif got == 1:
            problems.append(
                "compare after normalising: lower case, every run of whitespace one space"
            )
        elif got == 5:
            problems.append(
                "you counted rows of `train`: count rows of the second argument (`other`) whose "
                "message is in the first (`train`)"
            )
        elif got == 4:
            problems.append("'win' is only part of 'Win a PRIZE': count exact (normalised) matches")
        else:
            problems.append(f"you counted {got}; 3 rows of `other` are training messages")
    if problems:
        return report(problems, "")
    messages = data.read_messages()
    naive = data.appendix_e_split(messages, seed=7)
    leaked = count_leaks(naive.train, naive.test)
    return report(
        [],
        f"with seed 7, {leaked} of appendix E's {len(naive.test)} test messages are training "
        "messages too. How close was your prediction?",
    )


def check_mean_pooling(pool_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """Check ``pool_fn(hidden, lengths)`` averages each row's real tokens, leaving out padding.

    ``hidden`` is ``[batch, time, emb]`` from right-padded input and ``lengths`` holds each
    message's number of real tokens; the answer is ``[batch, emb]``.
    """
    generator = torch.Generator().manual_seed(0)
    batch, time, emb = 4, 7, 5
    hidden = torch.randn(batch, time, emb, generator=generator)
    lengths = torch.tensor([3, 7, 1, 5])
    want = torch.stack([hidden[i, :n].mean(0) for i, n in enumerate(lengths.tolist())])
    got, error = call(pool_fn, hidden.clone(), lengths.clone())
    if error:
        return report([f"your function raised {error}"], "")
    if not isinstance(got, torch.Tensor):
        return report([f"return a tensor, not {type(got).__name__}"], "")
    if tuple(got.shape) != (batch, emb):
        return report(
            [f"the result should have shape [batch, emb] = {[batch, emb]}, not {list(got.shape)}"],
            "",
        )
    problems: list[str] = []
    close = torch.isclose(got.float(), want, atol=1e-5).all(dim=1)
    if not bool(close.all()):
        if torch.allclose(got.float(), hidden.mean(1), atol=1e-5):
            problems.append(
                "you averaged every position: the padding positions count too; "
                "average only the first `length` positions of each row"
            )
        elif torch.allclose(got.float(), hidden[torch.arange(batch), lengths - 1], atol=1e-5):
            problems.append("that is the last real token; average all the real tokens instead")
        else:
            rows = [i for i in range(batch) if not bool(close[i])]
            sums = torch.stack([hidden[i, :n].sum(0) for i, n in enumerate(lengths.tolist())])
            if torch.allclose(got.float(), sums, atol=1e-5):
                problems.append("that is the sum of the real tokens: divide by each row's length")
            else:
                problems.append(f"rows {rows} are not the mean of their first `length` positions")
    return report(problems, "each message is summarised by its own tokens only.")
