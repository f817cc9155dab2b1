"""Show the package's real source in a chapter, so that the book and the code cannot drift apart."""

from __future__ import annotations

import inspect
import textwrap
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from IPython.display import Code


def show_source(obj: Any) -> Code:
    """Render the source of a function, class or module as a highlighted code block.

    Chapters call this instead of pasting code: what the reader sees is what the tests test.
    """
    from IPython.display import Code

    return Code(textwrap.dedent(inspect.getsource(obj)), language="python")
