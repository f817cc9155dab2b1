"""What a chapter shows: the package's real source, and numbers glued into its prose.

``show_source`` keeps the book and the code from drifting apart; ``glue`` lets the prose state a
number that a cell computed, so that no result is typed by hand. A glued *sentence* is a
``phrase``: a template with named values, so that each edition of the book can put the same
values into its own translation of the template without running the chapter again."""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Phrase:
    """Words a cell computes for the prose: an English template and the values that fill it.

    ``str(phrase)`` is the English. The template must be a string literal in the chapter (the
    translation catalogs collect it from the code); a value may itself be a phrase.
    """

    template: str
    values: dict[str, Any]

    def render(self, translate: Callable[[str], str] = lambda template: template) -> str:
        """The phrase with each template (its own and its values') passed through ``translate``."""
        values = {
            key: value.render(translate) if isinstance(value, Phrase) else value
            for key, value in self.values.items()
        }
        return translate(self.template).format(**values)

    def __str__(self) -> str:
        return self.render()

    def record(self) -> dict[str, Any]:
        """The phrase as JSON data: what an edition needs to render it again in its language."""
        return {
            "template": self.template,
            "values": {
                key: value.record() if isinstance(value, Phrase) else value
                for key, value in self.values.items()
            },
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Phrase:
        values = {
            key: cls.from_record(value) if isinstance(value, dict) else value
            for key, value in record["values"].items()
        }
        return cls(record["template"], values)


def phrase(template: str, /, **values: Any) -> Phrase:
    """A sentence (or a few words) for the prose: ``phrase("{n} of {total} agree", n=3, total=4)``.

    Values are stored as plain numbers and strings (numpy and torch scalars included). The
    template is checked here, so a missing value fails in the cell that glues it.
    """
    plain = {
        key: value.item() if hasattr(value, "item") else value for key, value in values.items()
    }
    for key, value in plain.items():
        if not isinstance(value, (str, int, float, Phrase)):
            raise TypeError(
                f"phrase value {key}={value!r} is a {type(value).__name__}: pass a number, a "
                "string or a phrase (format it first, e.g. f'{x:.1%}')"
            )
    result = Phrase(template, plain)
    try:
        str(result)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"phrase {template!r} cannot be filled with {sorted(plain)}: {err}"
        ) from err
    return result


PHRASE_KEY = "lora_tutorial_phrase"  # the glue output's metadata key that holds a phrase's record


def glue(name: str, value: Any, display: bool = False) -> None:
    """Store ``value`` under ``name`` for the book's prose (``{glue:text}`name```), via myst-nb.

    numpy and torch scalars are stored as plain numbers, which the prose's format specs
    (``{glue:text}`name:.1f```) need. A ``phrase`` is stored as its English text, with its
    template and values beside it for the translated editions. Outside the book build, where
    myst-nb may be missing (a chapter opened in Colab), it does nothing: the cells print their
    numbers anyway.
    """
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return
    if not isinstance(value, Phrase):
        myst_glue(name, value.item() if hasattr(value, "item") else value, display)
        return
    import IPython.core.formatters
    from IPython.display import display as ipy_display
    from myst_nb.ext.glue import GLUE_PREFIX

    bundle, metadata = IPython.core.formatters.format_display_data(str(value))
    prefix = "" if display else GLUE_PREFIX
    metadata["scrapbook"] = {"name": name, "mime_prefix": prefix}
    metadata[PHRASE_KEY] = value.record()
    ipy_display({prefix + key: data for key, data in bundle.items()}, raw=True, metadata=metadata)
