"""Keep the built site self-contained: no request may leave its origin.

- MathJax 3 is served from the site itself, never from a CDN. The files come from the
  ``django-static-mathjax`` wheel (a plain copy of MathJax 3's ``es5`` folder, installed by
  ``pip`` with the rest of the book's requirements). Sphinx reads a relative ``mathjax_path`` as
  relative to ``_static/``, so we point it there and copy the files in.
- sphinx-thebe (loaded by Jupyter Book, unused here: readers launch chapters in Colab) is taken
  off every page; its scripts name a CDN and, added twice, raise a JavaScript error.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

TARGET = "mathjax"


def mathjax_source() -> Path:
    """The installed MathJax 3 ``es5`` folder."""
    spec = importlib.util.find_spec("mathjax")
    for location in (spec.submodule_search_locations or []) if spec else []:
        es5 = Path(location) / "static" / "mathjax" / "es5"
        if (es5 / "tex-chtml.js").is_file():
            return es5
    raise ExtensionError(
        "MathJax 3 is not installed: run `pip install django-static-mathjax` "
        "(it is in requirements.txt) so that the site serves its own MathJax."
    )


def _configure(app: Sphinx, config) -> None:
    mathjax_source()  # fail early, before any page is built
    config.mathjax_path = f"{TARGET}/tex-chtml.js"


def _copy(app: Sphinx, exception: Exception | None) -> None:
    if exception is None and app.builder.format == "html":
        shutil.copytree(mathjax_source(), Path(app.outdir) / "_static" / TARGET, dirs_exist_ok=True)


def _drop_thebe(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    def is_thebe(asset) -> bool:
        return "thebe" in str(asset.filename or "") or "THEBE_JS_URL" in asset.attributes.get(
            "body", ""
        )

    for key in ("script_files", "css_files"):
        if key in context:
            context[key] = [asset for asset in context[key] if not is_thebe(asset)]


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", _configure)
    app.connect("html-page-context", _drop_thebe)
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
