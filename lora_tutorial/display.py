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
    A method or nested function is shown dedented, as if it stood alone.
    """
    from IPython.display import Code

    try:
        source = inspect.getsource(obj)
    except (TypeError, OSError) as err:  # built-ins, C extensions, code typed into a prompt
        raise TypeError(
            f"show_source cannot show {obj!r}: it has no Python source file ({err}); "
            "pass a function, class or module of lora_tutorial"
        ) from err
    return Code(textwrap.dedent(source), language="python")
