"""book.display.show_source: a chapter shows the package's real source, highlighted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lora_tutorial.book import display
from lora_tutorial.book.display import show_source
from lora_tutorial.runtime import config

pytest.importorskip("IPython")  # the notebook kernel's library (the `book` extra)


class Layer:
    def forward(self, x: int) -> int:
        """Twice ``x``."""
        return 2 * x


def test_shows_a_function_exactly_as_it_stands_in_its_file() -> None:
    shown = show_source(config.mode).data
    assert shown.startswith("def mode() -> Mode:\n")
    assert shown in Path(config.__file__).read_text()
    assert shown.rstrip().endswith(
        'return "quick" if quick else "rehearsal" if rehearsal else "full"'
    )


def test_shows_a_method_dedented_as_if_it_stood_alone() -> None:
    shown = show_source(Layer.forward).data
    assert shown.splitlines()[0] == "def forward(self, x: int) -> int:"
    indented = "".join("    " + line if line.strip() else line for line in shown.splitlines(True))
    assert indented in Path(__file__).read_text()


def test_shows_it_as_highlighted_python() -> None:
    html = show_source(Layer)._repr_html_()
    assert '<span class="k">class</span>' in html  # a keyword, marked up by the Python lexer
    assert '<span class="nc">Layer</span>' in html


def test_an_object_without_python_source_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="show_source cannot show <built-in function len>"):
        show_source(len)


def test_glue_stores_plain_numbers_for_the_prose(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    stored: dict = {}
    myst_nb = pytest.importorskip("myst_nb")
    monkeypatch.setattr(myst_nb, "glue", lambda name, value, display: stored.update({name: value}))
    display.glue("x", np.float64(0.25))
    assert stored == {"x": 0.25} and type(stored["x"]) is float


def test_glue_does_nothing_without_myst_nb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "myst_nb", None)  # import fails as on a plain Colab
    display.glue("x", 1.0)  # no error
