"""The French edition: catalogs complete and in step with the English, translations faithful.

Mirrors ``lora_tutorial/book/translation.py`` (messages, catalogs, checks) and the parts of
``lora_tutorial/book/display.py`` and ``classroom`` that editions use (phrases, student notebooks).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lora_tutorial.book import translation
from lora_tutorial.book.display import PHRASE_KEY, Phrase, phrase

pytest.importorskip("babel")
nbformat = pytest.importorskip("nbformat")


def test_every_french_catalog_is_complete_faithful_and_in_step() -> None:
    found = translation.problems("fr")
    report = "\n".join(f"{doc}: {issue}" for doc, issues in found.items() for issue in issues)
    assert not found, (
        "the French catalogs are not in step with the English (see CONTRIBUTING, "
        f"'The French edition'):\n{report[:4000]}"
    )


@pytest.mark.parametrize("docname", translation.documents())
def test_splitting_a_page_into_messages_loses_nothing(docname: str) -> None:
    path = translation.source_path(docname)
    for text in translation.markdown_sources(path):
        assert "".join(piece.text for piece in translation.split(text)) == text


def test_code_math_and_directives_are_not_messages() -> None:
    text = (
        "# Title\n\nSome *prose* with $x$.\n\n```python\nprint('code')\n```\n\n$$\ny = x\n$$\n\n"
        "````{exercise}\n:label: ex-1\n\nDo this.\n\n```python\ncheck(x)\n```\n````\n\n"
        "```{admonition} A title\nInside.\n```\n"
    )
    assert translation.messages(text) == [
        "Title",
        "Some *prose* with $x$.",
        "Do this.",
        "A title",
        "Inside.",
    ]
    upper = translation.translate(text, str.upper)
    assert "print('code')" in upper and ":label: ex-1" in upper and "y = x" in upper
    assert "SOME *PROSE* WITH $X$." in upper and "DO THIS." in upper


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of chapter 1 and of the French catalogs that a test may change."""
    chapter = tmp_path / "01_low_rank.ipynb"
    shutil.copy(translation.ROOT / "chapters" / "01_low_rank.ipynb", chapter)
    locales = tmp_path / "locales"
    shutil.copytree(translation.LOCALES, locales)
    real_source = translation.source_path
    monkeypatch.setattr(
        translation,
        "source_path",
        lambda name: chapter if name == "chapters/01_low_rank" else real_source(name),
    )
    monkeypatch.setattr(translation, "LOCALES", locales)
    monkeypatch.setattr(translation, "documents", lambda: ["chapters/01_low_rank"])
    return chapter


def _change_first_paragraph(chapter: Path) -> str:
    notebook = json.loads(chapter.read_text())
    cell = next(c for c in notebook["cells"] if c["cell_type"] == "markdown")
    source = "".join(cell["source"])
    old = next(m for m in translation.messages(source) if len(m) > 80)
    cell["source"] = source.replace(old, old.replace("LoRA", "Low-rank adaptation", 1))
    chapter.write_text(json.dumps(notebook))
    return old


def test_changing_one_english_sentence_fails_the_check_until_it_is_translated(
    scratch: Path,
) -> None:
    assert translation.problems("fr") == {}
    _change_first_paragraph(scratch)
    found = translation.problems("fr")["chapters/01_low_rank"]
    assert any("missing entry" in issue for issue in found), found

    translation.update("fr")  # the old translation is kept, marked fuzzy, for a translator
    found = translation.problems("fr")["chapters/01_low_rank"]
    assert [issue for issue in found if "fuzzy" in issue], found
    with translation.catalog_path("chapters/01_low_rank", "fr").open("rb") as f:
        catalog = translation.read_po(f, locale="fr")
    fuzzy = [m for m in catalog if m.fuzzy and m.id]
    assert len(fuzzy) == 1 and "Low-rank adaptation" in fuzzy[0].id and fuzzy[0].string


def test_update_leaves_complete_catalogs_unchanged(scratch: Path) -> None:
    assert translation.update("fr") == []


@pytest.mark.parametrize(
    ("english", "french", "problem"),
    [
        ("See {cite}`hu2021lora`.", "Voir Hu et al.", "lost role"),
        ("Call `merge()` now.", "Appelez merge() maintenant.", "lost inline code"),
        ("The rank $r$ is small.", "Le rang r est petit.", "lost math"),
        ("[the data](04_spam_data.ipynb)", "[les données](autre.ipynb)", "added link target"),
        ("{n} of {total} agree", "{n} sur {totale} concordent", "lost placeholder"),
        ("- one\n- two", "- un, deux", "lines start with '-'"),
    ],
)
def test_a_translation_that_breaks_the_markup_is_reported(
    english: str, french: str, problem: str
) -> None:
    assert any(problem in p for p in translation.translation_problems(english, french))


@pytest.mark.parametrize(
    ("french", "ok"),
    [
        ("Ainsi\u00a0: le rang est petit\u00a0; voyez\u00a0!", True),
        ("Le rôle {glue:text}`ch1_top` et `a:b` et $x:y$ restent.", True),
        ("Ainsi : le rang", False),
        ("Ainsi: le rang", False),
        ('Le mot "rang"', False),
        ("« rang »", False),
        ("«\u00a0rang\u00a0»", True),
    ],
)
def test_french_typography(french: str, ok: bool) -> None:
    assert (translation.french_typography(french) == []) is ok


def test_a_phrase_renders_in_each_language_from_its_record() -> None:
    verdict = phrase("larger than {noise}", noise="0.5")
    sentence = phrase("The gap is {gap:.1f} points, {verdict}.", gap=1.25, verdict=verdict)
    assert str(sentence) == "The gap is 1.2 points, larger than 0.5."
    french = {
        "larger than {noise}": "plus grand que {noise}",
        "The gap is {gap:.1f} points, {verdict}.": "L'écart est de {gap:.1f} points, {verdict}.",
    }
    again = Phrase.from_record(json.loads(json.dumps(sentence.record())))
    assert again.render(french.__getitem__) == "L'écart est de 1.2 points, plus grand que 0.5."


def test_a_phrase_refuses_values_it_cannot_carry() -> None:
    with pytest.raises(ValueError, match="cannot be filled"):
        phrase("{missing} here")
    with pytest.raises(TypeError, match="pass a number, a string or a phrase"):
        phrase("{table}", table=[1, 2])


def test_phrase_templates_are_collected_and_must_be_literals() -> None:
    code = 'x = phrase("one {a}", a=1)\ny = display.phrase("two")\n%time z = 1'
    assert translation.phrase_templates(code) == ["one {a}", "two"]
    with pytest.raises(ValueError, match="string literal"):
        translation.phrase_templates('phrase(f"{a} b")')


def test_a_translated_notebook_keeps_code_and_re_renders_glued_phrases() -> None:
    record = phrase("{n} of {total} agree", n=3, total=4).record()
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_markdown_cell("Some text."),
        nbformat.v4.new_code_cell("print('code')"),
    ]
    notebook.cells[1].outputs = [
        nbformat.v4.new_output(
            "display_data",
            data={"application/papermill.record/text/plain": "'3 of 4 agree'"},
            metadata={
                "scrapbook": {"name": "k", "mime_prefix": "application/papermill.record/"},
                PHRASE_KEY: record,
            },
        )
    ]

    class Catalog(translation.Translator):
        def text(self, docname: str, message: str) -> str:
            return {"Some text.": "Du texte.", "{n} of {total} agree": "{n} sur {total} d'accord"}[
                message
            ]

    out = translation.translate_notebook(json.loads(nbformat.writes(notebook)), "x", Catalog("fr"))
    assert out["cells"][0]["source"] == "Du texte."
    assert "".join(out["cells"][1]["source"]) == "print('code')"
    data = out["cells"][1]["outputs"][0]["data"]
    assert data == {"application/papermill.record/text/plain": repr("3 sur 4 d'accord")}


def test_french_student_notebooks_are_translated_and_keep_their_answer_cells() -> None:
    from lora_tutorial import classroom

    chapter = translation.ROOT / "chapters" / "03_lora_from_scratch.ipynb"
    english = classroom.student_notebook(chapter)
    french = classroom.student_notebook(chapter, lang="fr")
    assert len(english.cells) == len(french.cells)
    translator = translation.Translator("fr")
    for en, fr in zip(english.cells, french.cells, strict=True):
        assert en.cell_type == fr.cell_type
        if en.cell_type == "code" and "exercise" not in en.metadata.get("tags", []):
            assert en.source == fr.source  # code stays as it is
        if en.metadata.get("lora_tutorial") is not None:
            assert en.metadata == fr.metadata  # the grader finds the answer cells again
    english_text = {
        m
        for c in english.cells[1:]
        if c.cell_type == "markdown"
        for m in translation.messages(c.source)
    }
    french_text = "\n".join(c.source for c in french.cells if c.cell_type == "markdown")
    untranslated = [m for m in english_text if len(m) > 40 and m in french_text]
    assert not untranslated, untranslated[:3]
    assert french.metadata["lora_tutorial"]["language"] == "fr"
    assert translator.catalog("chapters/03_lora_from_scratch")
