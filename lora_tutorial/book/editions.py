"""The book in every language: the English site, then each translation, from one execution.

``python -m lora_tutorial.book.editions [jupyter-book options]`` (README, command 1) builds the
English site with Jupyter Book into ``_build/html/``, executing each page once (myst-nb's cache,
``_build/.jupyter_cache``), then each translated edition into ``_build/html/<lang>/``. A
translation executes nothing: it takes every page's notebook *with its outputs* from that cache,
replaces the Markdown by its translation (``translation.py``), keeps the code and outputs as
they are, and builds with execution off. ``.ci/assemble-site`` does the same from notebooks
executed elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from lora_tutorial.book import translation
from lora_tutorial.book.translation import ROOT, Translator

BUILD = ROOT / "_build"
CACHE = BUILD / ".jupyter_cache"


def jupyter_book() -> str:
    return shutil.which("jupyter-book") or str(Path(sys.executable).parent / "jupyter-book")


def is_notebook(docname: str, root: Path = ROOT) -> bool:
    """Whether the page has code to execute: an .ipynb, or MyST Markdown with a kernelspec."""
    path = translation.source_path(docname) if root == ROOT else _source(root, docname)
    if path.suffix == ".ipynb":
        return True
    front = translation.FRONT_MATTER.match(path.read_text(encoding="utf-8"))
    return bool(front and "\nkernelspec:" in front.group(0))


def _source(root: Path, docname: str) -> Path:
    for suffix in (".ipynb", ".md"):
        if (path := root / f"{docname}{suffix}").is_file():
            return path
    raise FileNotFoundError(f"{docname} has no .ipynb or .md source in {root}")


def executed_from_cache(docnames: Sequence[str], cache: Path = CACHE) -> dict[str, dict]:
    """Each page's notebook merged with the outputs of its cached execution."""
    import nbformat
    from jupyter_cache import get_cache

    if not cache.is_dir():
        raise FileNotFoundError(
            f"no execution cache at {cache}: build the English edition first (README, command 1)"
        )
    store = get_cache(str(cache))
    executed = {}
    for docname in docnames:
        notebook = nbformat.reads(
            json.dumps(translation.read_notebook(translation.source_path(docname))), as_version=4
        )
        try:
            _, merged = store.merge_match_into_notebook(notebook)
        except KeyError:
            raise LookupError(
                f"{docname} has no cached execution of its current code in {cache}: the English "
                "build must run first and succeed (a translation never executes code)"
            ) from None
        executed[docname] = json.loads(nbformat.writes(merged))
    return executed


def stage(
    lang: str,
    executed: dict[str, dict],
    work: Path,
    *,
    root: Path = ROOT,
    repository: dict[str, str] | None = None,
) -> None:
    """Lay out the ``lang`` edition's sources in ``work``: translated pages, execution off.

    ``executed`` holds, for every page with code, its notebook with outputs; plain Markdown
    pages are translated from their source. ``repository`` overrides ``repository:`` in
    ``book/_config.yml`` for the Colab buttons: its ``branch`` and ``url``, and
    ``path_to_book`` where the edition's notebooks lie (default: the English ones, same code).
    """
    translator = Translator(lang)
    shutil.copytree(root / "book", work / "book", ignore=shutil.ignore_patterns("locales"))
    for docname in translation.documents():
        source = _source(root, docname)
        target = work / f"{docname}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        (work / f"{docname}.md").unlink(missing_ok=True)
        if docname in executed:
            notebook = translation.translate_notebook(executed[docname], docname, translator)
            target.write_text(json.dumps(notebook, ensure_ascii=False), encoding="utf-8")
        else:
            text = source.read_text(encoding="utf-8")
            page = translation.translate_page(text, docname, translator)
            (work / f"{docname}.md").write_text(page, encoding="utf-8")

    _retarget_links(
        work, converted=[name for name in executed if _source(root, name).suffix == ".md"]
    )

    path = work / "book" / "_config.yml"
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    site = translator.catalog(translation.SITE)
    config["title"] = site.get(config["title"], config["title"])
    config.setdefault("execute", {})["execute_notebooks"] = "off"
    sphinx = config.setdefault("sphinx", {}).setdefault("config", {})
    sphinx["nb_execution_mode"] = "off"
    sphinx["language"] = lang
    sphinx["edition_language"] = lang
    sphinx["edition_root"] = "../"
    sphinx["edition_strings"] = {
        text: translator.text(translation.SITE, text) for text in translation.SITE_STRINGS
    }
    config.setdefault("repository", {}).update(repository or {})
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")

    toc_path = work / "book" / "_toc.yml"
    toc = yaml.safe_load(toc_path.read_text(encoding="utf-8"))
    for part in toc.get("parts", []):
        if "caption" in part:
            part["caption"] = translator.text(translation.SITE, part["caption"])
    toc_path.write_text(yaml.safe_dump(toc, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _retarget_links(work: Path, converted: list[str]) -> None:
    """Point links at the staged notebooks: a MyST Markdown page with code is staged as .ipynb."""
    link = re.compile(r"\]\((?P<target>[^)\s#]+)\.md(?P<anchor>#[^)\s]*)?\)")
    for page in work.rglob("*.ipynb"):
        folder = page.parent.relative_to(work)
        text = page.read_text(encoding="utf-8")
        for match in reversed(list(link.finditer(text))):
            if os.path.normpath(folder / match["target"]) in converted:
                new = f"]({match['target']}.ipynb{match['anchor'] or ''})"
                text = text[: match.start()] + new + text[match.end() :]
        page.write_text(text, encoding="utf-8")


def build(work: Path, out: Path, options: Sequence[str]) -> Path:
    """Build the staged sources in ``work`` with execution off; return the built HTML folder."""
    command = [
        jupyter_book(),
        "build",
        str(work),
        "--config",
        str(work / "book" / "_config.yml"),
        "--toc",
        str(work / "book" / "_toc.yml"),
        "--path-output",
        str(out),
        *options,
    ]
    print("::: " + " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=work)
    html = out / "_build" / "html"
    if not (html / "index.html").is_file():
        raise RuntimeError(f"the build of {work} made no index.html")
    return html


def place(html: Path, target: Path) -> None:
    """Put a built edition at ``target``, replacing an older one only once the new one exists."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    shutil.copytree(html, target)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    options = list(sys.argv[1:] if argv is None else argv)
    english = [
        jupyter_book(),
        "build",
        str(ROOT),
        "--config",
        str(ROOT / "book" / "_config.yml"),
        "--toc",
        str(ROOT / "book" / "_toc.yml"),
        *options,
    ]
    print("::: English edition: " + " ".join(english), flush=True)
    if subprocess.run(english, cwd=ROOT).returncode != 0:
        print("editions: the English build failed", file=sys.stderr)
        return 1
    notebooks = [name for name in translation.documents() if is_notebook(name)]
    for lang in translation.LANGUAGES:
        if lang == "en":
            continue
        print(f"::: {translation.LANGUAGES[lang]} edition (no execution)", flush=True)
        work = BUILD / lang
        shutil.rmtree(work, ignore_errors=True)
        try:
            stage(lang, executed_from_cache(notebooks), work / "src")
            html = build(work / "src", work / "out", options)
        except (FileNotFoundError, LookupError) as err:
            print(f"editions: the {lang} edition cannot be built: {err}", file=sys.stderr)
            return 1
        except subprocess.CalledProcessError:
            print(f"editions: the {lang} build failed", file=sys.stderr)
            return 1
        place(html, BUILD / "html" / lang)
        print(f"::: {translation.LANGUAGES[lang]}: {BUILD / 'html' / lang}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
