"""Show each progress bar once, in its final state, instead of one line per update.

With ``nb_merge_streams`` myst-nb joins a cell's stdout (and stderr) pieces into one block,
but it ends every piece with a newline before it resolves carriage returns, so each ``\\r``
redraw of a tqdm bar survives as a line of its own. Here the pieces are joined as they were
written, the ``\\r`` and ``\\b`` redraws are resolved the way a terminal shows them, and the
result is handed to myst-nb's own merging, which then has nothing left to split. A bar that
cleared itself when done (``leave=False``) leaves nothing, as in a terminal, and no empty box.
"""

from __future__ import annotations

import re

from myst_nb.core import render
from sphinx.application import Sphinx

_REDRAWN = re.compile(r"[^\n]*\r(?=[^\n])")  # a line overwritten after a carriage return
_ERASED = re.compile(r"[^\n]\x08")  # a character followed by a backspace

_myst_nb_coalesce = render.coalesce_streams


def _terminal_text(text: str) -> str:
    previous = None
    while previous != text:
        previous, text = text, _ERASED.sub("", text)
    return _REDRAWN.sub("", text).replace("\r", "")


def coalesce_streams(outputs: list) -> list:
    """Join consecutive pieces of each stream, resolve redraws, then let myst-nb finish."""
    joined: list = []
    for output in outputs:
        last = joined[-1] if joined else None
        if (
            output.get("output_type") == "stream"
            and last is not None
            and last.get("output_type") == "stream"
            and last["name"] == output["name"]
        ):
            last["text"] += output["text"]
        else:
            joined.append(output)
    for output in joined:
        if output.get("output_type") == "stream":
            output["text"] = _terminal_text(output["text"])
    shown = [o for o in joined if o.get("output_type") != "stream" or o["text"].strip()]
    return _myst_nb_coalesce(shown)


def setup(app: Sphinx) -> dict:
    render.coalesce_streams = coalesce_streams
    return {"parallel_read_safe": True, "parallel_write_safe": True}
