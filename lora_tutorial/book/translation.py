"""Translated editions: the book's prose in gettext catalogs, keyed to the English text.

Every document of the table of contents has one catalog per language,
``book/locales/<lang>/LC_MESSAGES/<docname>.po``; ``site.po`` beside them holds the strings of
the site itself (part captions, the book's title, the notes the book's extensions add). A
*message* is one block of a page's MyST Markdown: a paragraph, a heading, a list, a table, an
exercise's text. Code, math blocks, directive syntax and front matter are not messages; they
stay as they are in every edition, and so do code cells and their output.

Because a message is keyed to its English text, changing one English sentence leaves its old
translation behind: ``update`` marks the entry *fuzzy* (a translator checks it) or adds an
untranslated one, and ``check`` fails until a translator has done so. From the repository root::

    python -m lora_tutorial.book.translation update fr   # after changing English text
    python -m lora_tutorial.book.translation check fr    # what CI runs (tests/test_translation.py)
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from babel.messages.catalog import Catalog
from babel.messages.pofile import read_po, write_po

from lora_tutorial.book.display import PHRASE_KEY, Phrase
from lora_tutorial.runtime.files import atomic_write

ROOT = Path(__file__).resolve().parents[2]
LOCALES = ROOT / "book" / "locales"
LANGUAGES = {"en": "English", "fr": "Français"}  # the source language first
SITE = "site"  # the catalog of the site's own strings
FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.DOTALL)


# --- Splitting MyST Markdown into messages and the syntax around them -------------------------

# Directives whose body is prose to translate; any other directive (code-cell, math,
# bibliography, nb-exec-table...) is kept whole, like a fenced code block.
PROSE_DIRECTIVES = {"exercise", "solution", "admonition", "note", "tip", "warning", "important"}
TITLED_DIRECTIVES = {"admonition"}  # their argument is a title to translate
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|:{3,}|~{3,})(?P<info>.*)$")
_DIRECTIVE = re.compile(r"^\{(?P<name>[\w:-]+)\}\s*(?P<arg>.*)$")
_OPTION = re.compile(r"^\s*:[\w-]+:( .*)?$")
_HEADING = re.compile(r"^(?P<marks>#{1,6} )(?P<text>.+)$")
_STRUCTURE = re.compile(r"^\s*(\(.+\)=|<!--.*-->|\$\$.*)\s*$")  # targets, comments, $$ lines


@dataclass(frozen=True)
class Piece:
    """A run of a page's source: a message to translate, or syntax to keep as it is."""

    text: str
    message: bool


def split(markdown: str) -> list[Piece]:
    """The source cut into pieces whose texts, joined, give it back character for character."""
    pieces: list[Piece] = []
    lines = markdown.splitlines(keepends=True)
    block: list[str] = []

    def keep(text: str) -> None:
        if pieces and not pieces[-1].message:
            pieces[-1] = Piece(pieces[-1].text + text, False)
        else:
            pieces.append(Piece(text, False))

    def flush() -> None:
        if not block:
            return
        text = "".join(block)
        body = text.rstrip("\n")
        indent = len(body) - len(body.lstrip(" "))
        if indent:
            keep(body[:indent])
        pieces.append(Piece(body[indent:], True))
        if len(text) > len(body):
            keep(text[len(body) :])
        block.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.rstrip("\n")
        fence = _FENCE.match(stripped)
        if fence and fence["info"].strip():
            flush()
            directive = _DIRECTIVE.match(fence["info"].strip())
            end = _closing_fence(lines, i, fence["fence"])
            if directive and directive["name"] in PROSE_DIRECTIVES:
                arg = directive["arg"]
                if directive["name"] in TITLED_DIRECTIVES and arg:
                    head = stripped[: len(stripped) - len(arg)]
                    keep(head)
                    pieces.append(Piece(arg, True))
                    keep(line[len(stripped) :])
                else:
                    keep(line)
                i += 1
                while i < end and _OPTION.match(lines[i]):
                    keep(lines[i])
                    i += 1
                for piece in split("".join(lines[i:end])):
                    if piece.message:
                        pieces.append(piece)
                    else:
                        keep(piece.text)
                if end < len(lines):
                    keep(lines[end])
                i = end + 1
            else:  # code, math, or a directive without prose: kept whole
                keep("".join(lines[i : end + 1]))
                i = end + 1
            continue
        if stripped.strip().startswith("$$"):
            flush()
            one_line = len(stripped.strip()) > 2 and stripped.strip().endswith("$$")
            end = i if one_line else i + 1
            while end < len(lines) and end > i and "$$" not in lines[end]:
                end += 1
            keep("".join(lines[i : end + 1]))
            i = end + 1
            continue
        heading = _HEADING.match(stripped)
        if not stripped.strip() or fence or _STRUCTURE.match(stripped):
            flush()
            keep(line)
        elif heading:
            flush()
            keep(heading["marks"])
            pieces.append(Piece(heading["text"], True))
            keep(line[len(stripped) :])
        else:
            block.append(line)
        i += 1
    flush()
    return pieces


def _closing_fence(lines: list[str], start: int, fence: str) -> int:
    """The index of the line that closes the fence opened at ``start`` (len(lines) if none)."""
    for j in range(start + 1, len(lines)):
        candidate = lines[j].strip()
        if candidate and set(candidate) == {fence[0]} and len(candidate) >= len(fence):
            return j
    return len(lines)


def messages(markdown: str) -> list[str]:
    """The messages of a page's source, in order (a repeated message appears once per use)."""
    return [piece.text for piece in split(markdown) if piece.message]


def translate(markdown: str, lookup: Callable[[str], str]) -> str:
    """The source with every message replaced by ``lookup(message)``."""
    return "".join(lookup(p.text) if p.message else p.text for p in split(markdown))


# --- What must survive translation --------------------------------------------------------

_KEPT = {
    "role": re.compile(r"(?<!`)\{[\w:-]+\}`[^`]*`"),  # {glue:text}`key`, {cite:p}`hu2021`, {ref}`x`
    "inline code": re.compile(r"(?<![`}])`[^`]+`"),
    "math": re.compile(r"(?<![\\$])\$[^$]+\$"),
    "placeholder": re.compile(r"\{\w+(?::[^{}`]*)?\}(?!`)"),  # a phrase template's {value}
    "link target": re.compile(r"\]\(([^)\s]+)\)"),
    "html tag": re.compile(r"</?[a-zA-Z][^>]*>"),
}


def kept_parts(text: str) -> Counter[tuple[str, str]]:
    """Roles, inline code, math, link targets and HTML tags: what a translation keeps verbatim."""
    found: Counter[tuple[str, str]] = Counter()
    rest = text
    for kind, pattern in _KEPT.items():
        for match in pattern.finditer(rest):
            text = match.group(0) if kind != "link target" else match.group(1)
            found[(kind, re.sub(r"\s+", " ", text))] += 1  # a line break is a space here
        if kind in ("role", "inline code", "math", "placeholder"):
            rest = pattern.sub(" ", rest)
    return found


def translation_problems(msgid: str, msgstr: str) -> list[str]:
    """Why ``msgstr`` is not a faithful translation of ``msgid``'s markup (empty when it is)."""
    problems = []
    source, target = kept_parts(msgid), kept_parts(msgstr)
    for (kind, text), count in (source - target).items():
        problems.append(f"lost {kind} {text!r}" + (f" ({count}×)" if count > 1 else ""))
    for (kind, text), count in (target - source).items():
        problems.append(f"added {kind} {text!r}" + (f" ({count}×)" if count > 1 else ""))
    for marker in ("- ", "* ", "1. ", "| "):
        lines = [line.lstrip() for line in msgid.splitlines()]
        starts = sum(line.startswith(marker) for line in lines)
        new = sum(line.lstrip().startswith(marker) for line in msgstr.splitlines())
        if marker in ("- ", "| ") and starts != new:
            problems.append(f"{starts} lines start with {marker.strip()!r} in English, {new} here")
    return problems


NBSP = "\u00a0"
_PUNCTUATION = re.compile(r"(?P<before>.)(?P<mark>[;:!?])(?=\s|$|[*_)»])", re.MULTILINE)


def prose(text: str) -> str:
    """The text without what a translation keeps verbatim (roles, code, math, links, tags)."""
    rest = re.sub(r"\]\([^)\s]+\)", "]", text)
    for kind in ("role", "inline code", "math", "placeholder", "html tag"):
        rest = _KEPT[kind].sub("\x00", rest)
    return re.sub(r"https?://\S+", "\x00", rest)


def french_typography(text: str) -> list[str]:
    """Where a French translation breaks French typography (empty when it does not)."""
    problems = []
    body = prose(text)
    for match in _PUNCTUATION.finditer(body):
        before = match["before"]
        if before in ("\x00", "\n") or before == NBSP or (match["mark"] == ":" and before == ":"):
            continue
        if before == "\u202f":  # a narrow no-break space is also correct
            continue
        context = body[max(0, match.start() - 20) : match.end()].replace("\x00", "…")
        problems.append(f"no no-break space (U+00A0) before {match['mark']!r} in {context!r}")
    if '"' in body:
        problems.append('straight quotes (") in prose: use « guillemets » with no-break spaces')
    for match in re.finditer(r"«(?!\u00a0)|(?<!\u00a0)»", body):
        near = body[max(0, match.start() - 10) : match.end() + 10]
        problems.append(f"« » need a no-break space (U+00A0) inside, near {near!r}")
    return problems


# --- The book's documents and their catalogs -----------------------------------------------


def toc() -> dict:
    return yaml.safe_load((ROOT / "book" / "_toc.yml").read_text(encoding="utf-8"))


def documents() -> list[str]:
    """Every document of the table of contents (``book/intro``, ``chapters/01_low_rank``...)."""
    book = toc()
    names = [book["root"]]
    for part in book.get("parts", []):
        names += [entry["file"] for entry in part.get("chapters", [])]
    return names


def source_path(docname: str) -> Path:
    for suffix in (".ipynb", ".md"):
        if (path := ROOT / f"{docname}{suffix}").is_file():
            return path
    raise FileNotFoundError(f"{docname} from book/_toc.yml has no .ipynb or .md source")


def markdown_sources(path: Path) -> Iterator[str]:
    """The Markdown a reader reads in one document: its markdown cells, or the .md page."""
    if path.suffix == ".ipynb":
        notebook = json.loads(path.read_text(encoding="utf-8"))
        for cell in notebook["cells"]:
            if cell["cell_type"] == "markdown":
                yield "".join(cell["source"])
    else:
        text = path.read_text(encoding="utf-8")
        front = FRONT_MATTER.match(text)
        yield text[front.end() :] if front else text


def read_notebook(path: Path) -> dict:
    """A page as notebook JSON, read the way myst-nb reads it (so that it matches the cache)."""
    if path.suffix == ".ipynb":
        return json.loads(path.read_text(encoding="utf-8"))
    import nbformat
    from myst_nb.core.read import read_myst_markdown_notebook

    notebook = read_myst_markdown_notebook(path.read_text(encoding="utf-8"))
    return json.loads(nbformat.writes(notebook))


def phrase_templates(code: str, where: str = "a code cell") -> list[str]:
    """The templates of the ``phrase(...)`` calls in a cell's code (see book/display.py)."""
    lines = [line for line in code.splitlines() if not line.lstrip().startswith(("%", "!"))]
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError:
        return []
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else None
        name = node.func.id if isinstance(node.func, ast.Name) else name
        if name != "phrase":
            continue
        first = node.args[0] if node.args else None
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            raise ValueError(
                f"phrase() in {where}, line {node.lineno}, needs a string literal as its template "
                "(not an f-string or a variable), so that the catalogs can collect it"
            )
        found.append(first.value)
    return found


def code_messages(path: Path) -> list[str]:
    """The phrase templates of a page's code cells, in order."""
    notebook = read_notebook(path)
    return [
        template
        for index, cell in enumerate(notebook["cells"])
        if cell["cell_type"] == "code"
        for template in phrase_templates("".join(cell["source"]), f"{path.name}, cell {index}")
    ]


def site_messages() -> list[str]:
    """The site's own strings: the book's title, part captions, the extensions' notes."""
    config = yaml.safe_load((ROOT / "book" / "_config.yml").read_text(encoding="utf-8"))
    strings = [config["title"]]
    strings += [part["caption"] for part in toc().get("parts", []) if "caption" in part]
    strings += SITE_STRINGS
    return strings


SITE_STRINGS = [  # what book/_ext adds to pages, in English
    "Teaching with this chapter?",
    "A copy without solutions, with every exercise's check ready to run:",
    "open the student version in Colab",
]


def english_messages(docname: str) -> list[str]:
    """The messages of one catalog, in order of appearance, each once."""
    if docname == SITE:
        found = site_messages()
    else:
        path = source_path(docname)
        found = [m for text in markdown_sources(path) for m in messages(text)]
        found += code_messages(path)
    return list(dict.fromkeys(found))


def catalog_path(docname: str, lang: str) -> Path:
    return LOCALES / lang / "LC_MESSAGES" / f"{docname}.po"


def read_catalog(docname: str, lang: str) -> Catalog:
    path = catalog_path(docname, lang)
    if not path.is_file():
        raise FileNotFoundError(
            f"no {LANGUAGES.get(lang, lang)} catalog {path.relative_to(ROOT)}: run "
            f"`python -m lora_tutorial.book.translation update {lang}` and translate it"
        )
    with path.open("rb") as f:
        return read_po(f, locale=lang)


def _template(docname: str) -> Catalog:
    template = Catalog(project="lora-tutorial", fuzzy=False)
    for text in english_messages(docname):
        template.add(text)
    return template


def update(lang: str) -> list[Path]:
    """Bring every catalog of ``lang`` in step with the English sources; return those changed.

    New English text gets an untranslated entry; changed text gets its old translation marked
    fuzzy (babel matches it to the closest old message); removed text is dropped.
    """
    changed = []
    for docname in [*documents(), SITE]:
        path = catalog_path(docname, lang)
        if path.is_file():
            catalog = read_catalog(docname, lang)
        else:
            catalog = Catalog(locale=lang, project="lora-tutorial", fuzzy=False)
        before = _render(catalog)
        catalog.update(_template(docname), no_fuzzy_matching=False)
        catalog.obsolete.clear()
        after = _render(catalog)
        if after != before:
            with atomic_write(path) as tmp:
                tmp.write_bytes(after)
            changed.append(path)
    return changed


def _render(catalog: Catalog) -> bytes:
    import io

    for message in catalog:  # babel guesses these from braces; MyST roles are not formats
        message.flags.discard("python-format")
        message.flags.discard("python-brace-format")
    buffer = io.BytesIO()
    write_po(buffer, catalog, width=100, omit_header=False, sort_output=False)
    text = buffer.getvalue()
    return re.sub(rb'"POT-Creation-Date: [^"]*"\n|"PO-Revision-Date: [^"]*"\n', b"", text)


def _entries(catalog: Catalog) -> dict[str, tuple[str, bool]]:
    """A catalog as {English: (translation, fuzzy)}; the translation is "" when missing."""
    return {
        m.id: (m.string if isinstance(m.string, str) else "", m.fuzzy)
        for m in catalog
        if isinstance(m.id, str) and m.id
    }


def problems(lang: str, only: str | None = None) -> dict[str, list[str]]:
    """Per catalog, what keeps it from a complete and faithful translation (empty when none)."""
    found: dict[str, list[str]] = {}
    for docname in [only] if only else [*documents(), SITE]:
        issues = []
        try:
            catalog = read_catalog(docname, lang)
        except FileNotFoundError as err:
            found[docname] = [str(err)]
            continue
        english = english_messages(docname)
        entries = _entries(catalog)
        for text in english:
            entry = entries.get(text)
            short = text[:60].replace("\n", " ")
            if entry is None:
                issues.append(f"missing entry for {short!r}: run `update {lang}`")
            elif not entry[0]:
                issues.append(f"untranslated: {short!r}")
            elif entry[1]:
                issues.append(f"fuzzy (English changed, check the translation): {short!r}")
            else:
                found_here = translation_problems(text, entry[0])
                if lang == "fr":
                    found_here += french_typography(entry[0])
                issues += [f"{short!r}: {p}" for p in found_here]
        stale = set(entries) - set(english)
        issues += [f"entry for English text that is gone: {t[:60]!r}" for t in sorted(stale)]
        if issues:
            found[docname] = issues
    return found


@dataclass
class Translator:
    """Looks up the translation of messages in one language; complains about what it lacks."""

    lang: str

    def __post_init__(self) -> None:
        self._catalogs: dict[str, dict[str, str]] = {}

    def catalog(self, docname: str) -> dict[str, str]:
        if docname not in self._catalogs:
            catalog = read_catalog(docname, self.lang)
            self._catalogs[docname] = {
                english: text
                for english, (text, fuzzy) in _entries(catalog).items()
                if text and not fuzzy
            }
        return self._catalogs[docname]

    def text(self, docname: str, message: str) -> str:
        try:
            return self.catalog(docname)[message]
        except KeyError:
            raise LookupError(
                f"{catalog_path(docname, self.lang).relative_to(ROOT)} has no translation of "
                f"{message[:80]!r}: run `python -m lora_tutorial.book.translation update "
                f"{self.lang}`, translate, then `check {self.lang}`"
            ) from None

    def markdown(self, docname: str, markdown: str) -> str:
        return translate(markdown, lambda message: self.text(docname, message))


def translate_notebook(notebook: dict, docname: str, translator: Translator) -> dict:
    """A copy of a notebook (nbformat JSON) with its Markdown and glued phrases translated.

    Code and every other output stay as they are; a glued phrase is rendered again from its
    recorded values with the translated template."""
    copy = json.loads(json.dumps(notebook))
    for cell in copy["cells"]:
        if cell["cell_type"] == "markdown":
            cell["source"] = translator.markdown(docname, "".join(cell["source"]))
        for output in cell.get("outputs", []):
            record = output.get("metadata", {}).get(PHRASE_KEY)
            if record is None:
                continue
            text = Phrase.from_record(record).render(lambda t: translator.text(docname, t))
            prefix = output["metadata"].get("scrapbook", {}).get("mime_prefix", "")
            output["data"] = {f"{prefix}text/plain": repr(text)}
    copy.setdefault("metadata", {})["lora_tutorial_language"] = translator.lang
    return copy


def translate_page(text: str, docname: str, translator: Translator) -> str:
    """A MyST Markdown page translated, its front matter kept."""
    front = FRONT_MATTER.match(text)
    head = text[: front.end()] if front else ""
    return head + translator.markdown(docname, text[len(head) :])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lora_tutorial.book.translation",
        description="Keep the translated editions' gettext catalogs in step with the English.",
    )
    parser.add_argument("command", choices=["update", "check"])
    parser.add_argument("lang", choices=[lang for lang in LANGUAGES if lang != "en"])
    parser.add_argument("--only", help="check one catalog, e.g. chapters/01_low_rank or site")
    args = parser.parse_args(argv)
    if args.command == "update":
        for path in update(args.lang):
            print(f"updated {path.relative_to(ROOT)}")
        return 0
    found = problems(args.lang, only=args.only)
    for docname, issues in found.items():
        print(f"{catalog_path(docname, args.lang).relative_to(ROOT)}:")
        for issue in issues:
            print(f"  {issue}")
    total = sum(len(issues) for issues in found.values())
    print(f"{LANGUAGES[args.lang]}: {'complete' if not total else f'{total} problems'}")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
