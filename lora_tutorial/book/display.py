"""What a chapter shows: the package's real source, and numbers glued into its prose.

``show_source`` keeps the book and the code from drifting apart; ``glue`` lets the prose state a
number that a cell computed, so that no result is typed by hand."""

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


def glue(name: str, value: Any, display: bool = False) -> None:
    """Store ``value`` under ``name`` for the book's prose (``{glue:text}`name```), via myst-nb.

    numpy and torch scalars are stored as plain numbers, which the prose's format specs
    (``{glue:text}`name:.1f```) need. Outside the book build, where myst-nb may be missing (a
    chapter opened in Colab), it does nothing: the cells print their numbers anyway.
    """
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return
    myst_glue(name, value.item() if hasattr(value, "item") else value, display)
