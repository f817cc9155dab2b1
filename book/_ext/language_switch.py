"""Every page links its counterpart in the book's other languages, and says its own language.

The English site lies at the root, each translation in a folder named after its language
(``fr/``, built by ``python -m lora_tutorial.book.editions``). Under the title of every page
this extension puts a link to the same page in the other editions, and in the head the
``<link rel="alternate" hreflang=...>`` tags that tell browsers and search engines about them.
A translated edition's configuration sets ``edition_language`` (its language) and
``edition_root`` (the way from its root back to the English root, ``../``).
"""

from __future__ import annotations

import html

from sphinx.application import Sphinx

from lora_tutorial.book.translation import LANGUAGES

SWITCH_TEXT = {"en": "Read this page in English", "fr": "Lire cette page en français"}


def counterparts(language: str, root: str) -> dict[str, str]:
    """Each other edition's root, relative to this edition's root."""
    english = "" if language == "en" else root
    return {
        lang: english if lang == "en" else f"{english}{lang}/"
        for lang in LANGUAGES
        if lang != language
    }


def _add_links(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    if doctree is None or "body" not in context:
        return
    language = app.config.edition_language
    up = "../" * pagename.count("/")
    links = []
    tags = []
    for lang, prefix in counterparts(language, app.config.edition_root).items():
        href = html.escape(f"{up}{prefix}{pagename}.html", quote=True)
        links.append(
            f'<a class="edition-link" href="{href}" hreflang="{lang}" lang="{lang}">'
            f"{html.escape(SWITCH_TEXT[lang])}</a>"
        )
        tags.append(f'<link rel="alternate" hreflang="{lang}" href="{href}" />')
    context["body"] = f'<p class="edition-switch">{" · ".join(links)}</p>\n' + context["body"]
    context["metatags"] = context.get("metatags", "") + "\n".join(tags)


def setup(app: Sphinx) -> dict:
    if "edition_language" not in app.config:  # student_links may have added it
        app.add_config_value("edition_language", "en", "html")
    app.add_config_value("edition_root", "../", "html")
    app.connect("html-page-context", _add_links)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
