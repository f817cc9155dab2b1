"""The diagrams draw the package's own values, in every language of the book, and describe
themselves for screen readers."""

from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.collections import LineCollection
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

from lora_tutorial.book import diagrams
from lora_tutorial.book.translation import LANGUAGES, french_typography
from lora_tutorial.quantize import NF4_OFFSET, nf4_levels

# Every way the diagrams are drawn, so that every template of every branch is used.
DRAWINGS = {
    "lora_block": {},
    "transformer_block": {},
    "transformer_block, no adapter": {"targets": ()},
    "merge_and_swap": {},
    "dora_split": {},
    "nf4_on_normal_curve": {},
}


def draw(name: str, lang: str, **kwargs: object) -> Figure:
    return diagrams.ALL[name.split(",")[0]](lang=lang, **kwargs)


def texts_of(fig: Figure) -> str:
    """Every word a diagram shows: texts, title, axis label and legend."""
    ax = fig.axes[0]
    legend = ax.get_legend()
    words = [t.get_text() for t in ax.texts] + [ax.get_title(), ax.get_xlabel()]
    words += [t.get_text() for t in legend.get_texts()] if legend else []
    return "\n".join(words)


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("name", sorted(diagrams.ALL))
def test_every_diagram_has_alt_text_and_a_white_background(name: str, lang: str) -> None:
    fig = draw(name, lang)
    try:
        assert len(fig.alt_text) > 60  # type: ignore[attr-defined]
        assert fig.get_facecolor()[:3] == (1.0, 1.0, 1.0)
    finally:
        plt.close(fig)


# What stays as it is in every language: layer names, and names in the formulas.
KEPT = re.compile(r"LayerNorm|GELU|W_\w+|out_proj|ff\.layers\.\d|LoRA|d_in|d_out|softmax")


@pytest.mark.parametrize("name", sorted(DRAWINGS))
def test_every_diagram_is_drawn_in_french_with_other_words_and_french_typography(
    name: str,
) -> None:
    english, french = (draw(name, lang, **DRAWINGS[name]) for lang in ("en", "fr"))
    try:
        en_words, fr_words = texts_of(english).split("\n"), texts_of(french).split("\n")
        assert len(en_words) == len(fr_words)  # the same labels, one by one
        assert any(e != f for e, f in zip(en_words, fr_words)), "every diagram has words"
        same = [e for e, f in zip(en_words, fr_words) if e == f]
        untranslated = [e for e in same if re.search(r"[a-z]{3}", KEPT.sub("", e))]
        assert not untranslated, f"labels left in English: {untranslated}"
        en_alt, fr_alt = english.alt_text, french.alt_text  # type: ignore[attr-defined]
        assert fr_alt != en_alt and len(fr_alt) > 60
        for text in [*fr_words, fr_alt]:
            assert not french_typography(text), text
    finally:
        plt.close(english)
        plt.close(french)


def test_every_french_template_is_used_and_every_template_used_has_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    used: set[str] = set()
    translate = diagrams._text

    def recording(lang: str, template: str, **values: object) -> str:
        used.add(template)
        return translate(lang, template, **values)

    monkeypatch.setattr(diagrams, "_text", recording)
    for name, kwargs in DRAWINGS.items():
        plt.close(draw(name, "fr", **kwargs))  # a template without French raises a KeyError
    assert used == set(diagrams.FRENCH), f"stale French entries: {set(diagrams.FRENCH) - used}"


def test_a_template_without_french_is_an_error_and_placeholders_are_kept() -> None:
    with pytest.raises(KeyError, match="no lang='fr' template for 'a new label'"):
        diagrams._text("fr", "a new label")
    assert diagrams._text("en", "x·A: only {rank} numbers", rank=4) == "x·A: only 4 numbers"
    assert (
        diagrams._text("fr", "x·A: only {rank} numbers", rank=4) == "x·A\u00a0: seulement 4 nombres"
    )
    for english, french in diagrams.FRENCH.items():
        placeholders = re.compile(r"\{[^}]*\}")
        assert sorted(placeholders.findall(english)) == sorted(placeholders.findall(french))


@pytest.mark.parametrize("name", sorted(diagrams.ALL))
def test_a_language_the_diagrams_are_not_written_in_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="lang='de'.*'en', 'fr'"):
        diagrams.ALL[name](lang="de")


@pytest.mark.parametrize("lang", LANGUAGES)
def test_the_nf4_diagram_draws_the_packages_levels_where_the_normal_puts_them(lang: str) -> None:
    fig = diagrams.nf4_on_normal_curve(lang=lang)
    try:
        largest = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(NF4_OFFSET))
        drawn = [c for c in fig.axes[0].collections if isinstance(c, LineCollection)]
        xs = torch.tensor([float(seg[0][0]) for seg in drawn[0].get_segments()])
        assert torch.allclose(xs, nf4_levels() * largest, atol=1e-5)
    finally:
        plt.close(fig)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_the_block_diagram_marks_exactly_the_chosen_targets(lang: str) -> None:
    def marked(targets: tuple[str, ...]) -> int:
        fig = diagrams.transformer_block(targets, lang=lang)
        count = sum("← LoRA" in t.get_text() for t in fig.axes[0].texts)
        plt.close(fig)
        return count

    assert marked(("W_query", "W_key", "W_value", "out_proj", "ff.layers.0", "ff.layers.2")) == 4
    assert marked(("ff.layers.0", "ff.layers.2")) == 2
    assert marked(()) == 0


# What the colour key's frozen and trained entries start with, in each language.
FROZEN_TRAINED = {"en": ("frozen", "trained"), "fr": ("gelé", "entraîné")}


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("name", ["lora_block", "transformer_block", "merge_and_swap"])
def test_every_legend_colour_is_drawn_and_frozen_and_trained_mean_what_they_say(
    name: str, lang: str
) -> None:
    fig = draw(name, lang)
    try:
        legend = diagrams.legend_entries(fig)
        assert legend, "a diagram that colours boxes needs a colour key"
        assert set(legend.values()) <= diagrams.box_colors(fig), "a legend entry nothing uses"
        assert diagrams.box_colors(fig) - {diagrams.NEUTRAL} <= set(legend.values())
        by_colour = {colour: label for label, colour in legend.items()}
        frozen, trained = FROZEN_TRAINED[lang]
        assert by_colour[diagrams.FROZEN].startswith(frozen)
        assert by_colour[diagrams.TRAINED].startswith(trained)
    finally:
        plt.close(fig)


# The block diagram's words for the residual paths and the alt text's key phrases.
BLOCK_WORDS = {
    "en": ("residual", "add the residual", ("frozen", "trained LoRA adapter", "residual")),
    "fr": (
        "connexion résiduelle",
        "ajouter la connexion résiduelle",
        ("gelés", "adaptateur LoRA entraîné", "connexion résiduelle"),
    ),
}


@pytest.mark.parametrize("lang", LANGUAGES)
def test_the_block_diagram_keeps_the_adapted_weights_frozen_and_draws_the_residuals(
    lang: str,
) -> None:
    fig = diagrams.transformer_block(lang=lang)
    try:
        ax = fig.axes[0]

        def colour_of(label: str) -> str:
            text = next(t for t in ax.texts if t.get_text().startswith(label))
            x, y = text.get_position()
            (box,) = [
                p
                for p in ax.patches
                if isinstance(p, FancyBboxPatch)
                and p.get_x() <= x <= p.get_x() + p.get_width()
                and p.get_y() <= y <= p.get_y() + p.get_height()
            ]
            return to_hex(box.get_facecolor())

        for layer in ("W_query", "out_proj", "ff.layers.0", "ff.layers.2"):
            assert colour_of(layer) == diagrams.FROZEN, f"{layer}'s pretrained weight is frozen"
        assert colour_of("+ s·x·A·B") == diagrams.TRAINED
        residual, add_residual, alt_words = BLOCK_WORDS[lang]
        assert texts_of(fig).count(residual) >= 4  # both residual paths and both sums
        assert texts_of(fig).count(add_residual) == 2
        alt = fig.alt_text  # type: ignore[attr-defined]
        assert all(word in alt for word in alt_words), alt
    finally:
        plt.close(fig)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_the_lora_block_uses_the_books_notation(lang: str) -> None:
    fig = diagrams.lora_block(in_dim=1024, out_dim=4096, rank=8, lang=lang)
    texts = texts_of(fig)
    alt = fig.alt_text  # type: ignore[attr-defined]
    plt.close(fig)
    assert "A   1024 × 8" in texts and "(d_in × r)" in texts  # A: (d_in, r)
    assert "B   8 × 4096" in texts and "(r × d_out)" in texts  # B: (r, d_out)
    assert "W₀   4096 × 1024" in texts and "(d_out × d_in)" in texts  # nn.Linear's layout
    assert "y = x·W₀ᵀ + s·x·A·B" in texts and "s = α/r" in texts
    assert "B·A" not in texts and "x·W₀ " not in texts.replace("x·W₀ᵀ", "")
    assert "1024" in alt and "4096" in alt and "(8 " in alt


# The merge and DoRA diagrams' words for "transposed", "row", "frozen W0", "trained adapter".
UPDATE_WORDS = {
    "en": ("transposed", "row", "frozen W0", "trained adapter"),
    "fr": ("transposée", "ligne", "poids gelé W0", "adaptateur entraîné"),
}


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("name", ["merge_and_swap", "dora_split"])
def test_merging_and_dora_write_the_update_as_s_times_AB_transposed(name: str, lang: str) -> None:
    fig = draw(name, lang)
    texts = texts_of(fig)
    alt = fig.alt_text  # type: ignore[attr-defined]
    plt.close(fig)
    transposed, row, frozen_w0, trained_adapter = UPDATE_WORDS[lang]
    assert "s·(A" in texts and "B·A" not in texts and "colon" not in texts.lower()
    assert transposed in alt and "colon" not in alt.lower()  # column, colonne
    if name == "merge_and_swap":
        assert "s = α/r" in texts and frozen_w0 in alt and trained_adapter in alt
    else:
        assert row in texts and row in alt


def test_show_draws_the_diagram_in_every_language_and_the_page_picks_its_own() -> None:
    before = set(plt.get_fignums())
    rendered = diagrams.show(diagrams.lora_block, width=500, rank=4).data
    assert set(plt.get_fignums()) == before  # closed, so Jupyter does not show them again
    assert rendered.startswith('<div class="lt-diagram"><style>') and rendered.endswith("</div>")
    images = re.findall(r"<img [^>]*>", rendered)
    assert [re.search(r' lang="(\w+)"', img)[1] for img in images] == list(LANGUAGES)  # type: ignore[index]
    for image, lang in zip(images, LANGUAGES):
        fig = diagrams.lora_block(rank=4, lang=lang)
        alt = fig.alt_text  # type: ignore[attr-defined]
        plt.close(fig)
        assert f'alt="{alt}"' in image and 'width="500"' in image
        assert 'src="data:image/png;base64,' in image
    assert images[0] != images[1]
    style = re.search(r"<style>(.*)</style>", rendered)[1]  # type: ignore[index]
    assert ".lt-diagram img:not(:lang(en)){display:none}" in style  # English by default
    assert "html:lang(fr) .lt-diagram img:lang(en){display:none}" in style
    assert "html:lang(fr) .lt-diagram img:lang(fr){display:inline}" in style


def test_show_passes_the_arguments_and_only_keywords() -> None:
    rendered = diagrams.show(diagrams.transformer_block, targets=()).data
    assert "no layer has an adapter" in rendered and "aucune couche" in rendered
    with pytest.raises(TypeError):
        diagrams.show(diagrams.lora_block, 768)  # type: ignore[call-arg]
