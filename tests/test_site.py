"""The built site, checked in a real browser (headless Chromium through Playwright).

Every page in the table of contents, in every edition (English at the site's root, French in
``fr/``), is served from 127.0.0.1 and opened; a page fails when it shows a Python traceback or
error output, leaves math unrendered, breaks an image or a script, makes any request to another
origin, shows a diagram in the other language, or lacks its link to the other edition. Two
screenshots of each page (its top, and the whole page) land in ``_build/screenshots/`` for a
person to look at.

Needs a built site (``_build/html``, README command 1): without one these tests skip, unless
``LORA_TUTORIAL_REQUIRE_BUILD=1`` (as in CI, after the build), which makes a missing site fail.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from _helpers import REQUIRE_BUILD_ENV, SITE, LocalServer, build_required, toc_pages

SCREENSHOTS = SITE.parent / "screenshots"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ERROR_TEXT = re.compile(
    r"Traceback \(most recent call last\)|^\w*(Error|Exception): ", re.MULTILINE
)


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium is not installed: `apt-get install -y chromium` (.ci/run does this)")
    return path


@pytest.fixture(scope="module")
def site() -> Iterator[LocalServer]:
    if not (SITE / "index.html").is_file():
        if build_required():
            pytest.fail(
                f"no built site at {SITE} although {REQUIRE_BUILD_ENV}=1: "
                "build the book first (README, command 1)"
            )
        pytest.skip(f"no built site at {SITE}; build the book to run the browser tests")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with LocalServer(SITE) as server:
        yield server


@pytest.fixture(scope="module")
def browser(site: LocalServer, tmp_path_factory: pytest.TempPathFactory):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=chromium_path(),
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        yield context
        context.close()


EDITIONS = {"en": "", "fr": "fr/"}  # each edition's folder in the site


def pages() -> list[tuple[str, str]]:
    """(edition, page) for every page of every edition."""
    return [(lang, page) for lang in EDITIONS for page in toc_pages()]


@pytest.mark.parametrize("lang", EDITIONS)
def test_every_toc_page_was_built(site: LocalServer, lang: str) -> None:
    folder = SITE / EDITIONS[lang]
    missing = [page for page in toc_pages() if not (folder / f"{page}.html").is_file()]
    assert not missing, f"pages in book/_toc.yml missing from the {lang} site: {missing}"


@pytest.mark.parametrize("lang", EDITIONS)
def test_every_chapter_links_its_student_version(site: LocalServer, lang: str) -> None:
    chapters = [page for page in toc_pages() if page.startswith("chapters/")]
    students = "students" if lang == "en" else f"students/{lang}"
    missing = [
        page
        for page in chapters
        if f"/blob/notebooks/{students}/{page.split('/')[-1]}.ipynb"
        not in (SITE / EDITIONS[lang] / f"{page}.html").read_text()
    ]
    assert chapters and not missing, f"{lang} pages without a student-version link: {missing}"


@pytest.mark.parametrize(("lang", "page"), pages(), ids=lambda v: v.replace("/", "-"))
def test_page_renders_cleanly_and_stays_on_site(
    site: LocalServer, browser, lang: str, page: str
) -> None:
    path = f"{EDITIONS[lang]}{page}"
    if not (SITE / f"{path}.html").is_file():
        pytest.fail(f"{path}.html was not built")
    origin = site.base_url
    foreign: list[str] = []
    failed: list[str] = []
    js_errors: list[str] = []

    def on_request(request) -> None:
        parts = urlsplit(request.url)
        if parts.scheme in ("http", "https") and f"{parts.scheme}://{parts.netloc}" != origin:
            foreign.append(request.url)

    tab = browser.new_page()
    tab.route(re.compile(r"^https?://(?!127\.0\.0\.1[:/])"), lambda route: route.abort())
    tab.on("request", on_request)
    tab.on("requestfailed", lambda r: failed.append(r.url) if r.url.startswith(origin) else None)
    tab.on("pageerror", lambda exc: js_errors.append(str(exc)))
    tab.goto(site.url(f"{path}.html"), wait_until="load")

    has_math = tab.locator(".math").count() > 0
    if has_math:
        tab.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise")
        tab.evaluate("() => MathJax.startup.promise")
    report = tab.evaluate(
        """() => {
        const text = (nodes) => [...nodes].map((n) => n.textContent.slice(0, 60));
        const maths = [...document.querySelectorAll('.math')];
        return {
            unrendered: text(maths.filter((m) => !m.querySelector('mjx-container'))),
            texErrors: text(document.querySelectorAll('mjx-merror')),
            outputs: [...document.querySelectorAll('.cell_output')].map((o) => o.innerText),
            tracebacks: document.querySelectorAll('.output.traceback, .output.error').length,
            brokenImages: [...document.images]
                .filter((i) => i.complete && i.naturalWidth === 0)
                .map((i) => i.src),
            nav: [...document.querySelectorAll('.bd-sidebar-primary a.reference')]
                .map((a) => a.getAttribute('href')),
            lang: document.documentElement.lang,
            diagrams: [...document.querySelectorAll('.lt-diagram img')]
                .filter((i) => i.offsetWidth > 0)
                .map((i) => i.lang),
            editionLinks: [...document.querySelectorAll('a.edition-link')]
                .map((a) => [a.hreflang, new URL(a.href).pathname]),
        };
    }"""
    )

    colab = None
    if "chapters/" in path:
        launch = tab.locator(".dropdown-launch-buttons button").first
        if launch.count():
            launch.click()
        colab = tab.locator("a[href*='colab.research.google.com']").first
        if colab.count():
            colab.wait_for(state="visible")
    name = path.replace("/", "__")
    # The top (navigation, math, the Colab menu), then the whole page (every figure and table).
    tab.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
    tab.screenshot(path=str(SCREENSHOTS / f"{name}--full.png"), full_page=True)
    colab_href = colab.get_attribute("href") if colab is not None and colab.count() else None
    tab.close()

    page = path  # the messages name the edition's folder
    assert not foreign, f"{page}: requests to other origins: {foreign[:5]}"
    assert not failed, f"{page}: failed requests on the site: {failed[:5]}"
    assert not js_errors, f"{page}: JavaScript errors: {js_errors[:3]}"
    assert report["tracebacks"] == 0, f"{page}: shows error output from a cell"
    bad_outputs = [o[:200] for o in report["outputs"] if ERROR_TEXT.search(o)]
    assert not bad_outputs, f"{page}: an output shows a Python error: {bad_outputs[0]}"
    assert not report["unrendered"], f"{page}: math left unrendered: {report['unrendered'][:3]}"
    assert not report["texErrors"], f"{page}: MathJax could not typeset: {report['texErrors'][:3]}"
    assert not report["brokenImages"], f"{page}: broken images: {report['brokenImages'][:3]}"
    assert len(report["nav"]) >= len(toc_pages()) - 1, (
        f"{page}: navigation is missing chapters: {report['nav']}"
    )
    assert report["lang"] == lang, f"{page}: <html lang={report['lang']!r}>, not {lang!r}"
    assert all(shown == lang for shown in report["diagrams"]), (
        f"{page}: shows diagrams in {report['diagrams']}, not only in {lang}"
    )
    others = {
        other: f"/{EDITIONS[other]}{page.removeprefix(EDITIONS[lang])}.html"
        for other in EDITIONS
        if other != lang
    }
    links = dict(report["editionLinks"])
    for other, expected_path in others.items():
        assert links.get(other, "").endswith(expected_path), (
            f"{page}: no link to its {other} counterpart {expected_path}: {links}"
        )
        assert (SITE / expected_path.lstrip("/")).is_file(), f"{page}: {expected_path} missing"
    if "chapters/" in page:
        # A site assembled for publishing opens the executed notebooks of the `notebooks` branch,
        # the French edition's in fr/; a local build opens the chapters on main (same code).
        branch = os.environ.get("LORA_TUTORIAL_SITE_BRANCH", "main")
        folder = EDITIONS[lang] if branch == "notebooks" else ""
        expected = f"/blob/{branch}/{folder}{page.removeprefix(EDITIONS[lang])}.ipynb"
        assert colab_href and expected in colab_href, (
            f"{page}: no Colab launch button for {expected}"
        )
