"""Each chapter page links its student version: the chapter without solutions, opened in Colab.

The publishing workflow writes student notebooks (``python -m lora_tutorial.classroom student``)
to ``students/`` on the ``notebooks`` branch; this extension puts a link to the chapter's copy
under the page title. The address is built from ``repository.url`` in ``book/_config.yml``, the
one place that names the repository, so a fork links its own student notebooks.
"""

from __future__ import annotations

from docutils import nodes
from sphinx.application import Sphinx

COLAB = "https://colab.research.google.com/github"
BRANCH = "notebooks"


def student_url(repository_url: str, docname: str, language: str = "en") -> str:
    """The Colab address of the student version of chapter ``docname`` (``chapters/NN_name``).

    Translated student notebooks lie in ``students/<language>/``.
    """
    repository = repository_url.rstrip("/").removesuffix(".git")
    owner_repo = "/".join(repository.split("/")[-2:])
    stem = docname.split("/")[-1]
    folder = "students" if language == "en" else f"students/{language}"
    return f"{COLAB}/{owner_repo}/blob/{BRANCH}/{folder}/{stem}.ipynb"


def _add_link(app: Sphinx, doctree: nodes.document, docname: str) -> None:
    if not docname.startswith("chapters/"):
        return
    repository_url = app.config.html_theme_options.get("repository_url", "")
    sections = list(doctree.findall(nodes.section))
    if not repository_url or not sections:
        return
    language = app.config.edition_language
    strings = app.config.edition_strings  # the site's strings in this edition's language

    def text(english: str) -> str:
        return strings[english] if language != "en" else english

    link = nodes.reference(
        "",
        text("open the student version in Colab"),
        refuri=student_url(repository_url, docname, language),
    )
    note = nodes.paragraph(
        "",
        "",
        nodes.emphasis("", text("Teaching with this chapter?") + " "),
        nodes.Text(
            text("A copy without solutions, with every exercise's check ready to run:") + " "
        ),
        link,
        nodes.Text("."),
        classes=["student-version"],
    )
    title = sections[0].next_node(nodes.title)
    title.parent.insert(title.parent.index(title) + 1, note)


def setup(app: Sphinx) -> dict:
    if "edition_language" not in app.config:
        app.add_config_value("edition_language", "en", "html")
    app.add_config_value("edition_strings", {}, "html")
    app.connect("doctree-resolved", _add_link)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
