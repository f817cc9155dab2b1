"""The book's diagrams: how LoRA is wired, drawn with matplotlib from the package's own values.

One function per diagram; each returns a new figure with a white background (readable in the
site's light and dark themes) and sets ``fig.alt_text``, a one-sentence description for readers
who cannot see the picture. Sizes, layer names and levels come from the package (the NF4 levels
from :func:`lora_tutorial.quantize.nf4_levels`, the target layers from
:data:`lora_tutorial.train.LORA_TARGETS`), so a diagram cannot drift from the code it explains.

Every diagram is drawn in the book's languages (``lang="en"`` or ``"fr"``): its words are English
templates written where they are used, ``_text(lang, "x·A: only {rank} numbers", rank=rank)``,
and :data:`FRENCH` maps each template to its French one. :func:`show` draws a diagram once per
language and lets the page show the picture in its own language, so the French edition, built
from the same executed notebooks, has French diagrams.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch

from lora_tutorial.book.translation import LANGUAGES
from lora_tutorial.quantize import NF4_OFFSET, nf4_levels
from lora_tutorial.train import LORA_TARGETS

if TYPE_CHECKING:
    from IPython.display import HTML

FROZEN = "#c9d3e0"  # blue-grey: pretrained weights that stay frozen
TRAINED = "#f4b183"  # orange: weights that train (adapters, a new head)
MERGED = "#d9c3e6"  # lilac: a merged weight, fixed after training
NEUTRAL = "#ffffff"  # white: a step without weights, or the data
INK = "#222222"
NOTATION = "x: a row of d_in numbers;  W₀: d_out × d_in, as nn.Linear stores it"
"""The book's notation (chapter 3's box), which every diagram uses: y = x·W₀ᵀ + s·x·A·B."""


def _check_language(lang: str) -> None:
    """Refuse a language the diagrams are not written in, naming the ones they are."""
    if lang not in _TRANSLATIONS:
        supported = ", ".join(repr(code) for code in _TRANSLATIONS)
        raise ValueError(f"lang={lang!r}: the diagrams are drawn in {supported}; pass one of them")


def _text(lang: str, template: str, **values: object) -> str:
    """The English ``template`` in ``lang``, with ``values`` filled in by ``str.format``.

    A template that has no French entry in :data:`FRENCH` raises a KeyError, so a diagram drawn
    in French (as the tests do) cannot show an English label by mistake.
    """
    _check_language(lang)
    translations = _TRANSLATIONS[lang]
    if translations is not None:
        if template not in translations:
            raise KeyError(
                f"no lang={lang!r} template for {template!r}: add one to diagrams.FRENCH"
            )
        template = translations[template]
    return template.format(**values)


def _canvas(width: float, height: float) -> tuple[Figure, Axes]:
    """A figure with one axes in data units 0..width x 0..height, no ticks, white background."""
    fig, ax = plt.subplots(figsize=(width, height), facecolor="white")
    ax.set(xlim=(0, width), ylim=(0, height), aspect="equal")
    ax.axis("off")
    return fig, ax


def _box(
    ax: Axes,
    x: float,
    y: float,
    w: float,
    h: float,
    text: str,
    color: str = NEUTRAL,
    size: int = 10,
) -> None:
    """A rounded box with its lower-left corner at (x, y) and centred text."""
    patch = FancyBboxPatch(
        (x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color, ec=INK, lw=1.2
    )
    ax.add_patch(patch)
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, color=INK)


def _arrow(
    ax: Axes,
    start: tuple[float, float],
    end: tuple[float, float],
    text: str = "",
    offset: tuple[float, float] = (0.1, 0.12),
    connection: str = "arc3",
) -> None:
    """An arrow from ``start`` to ``end``, with an optional label beside its middle."""
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle="-|>",
            mutation_scale=12,
            color=INK,
            lw=1.2,
            connectionstyle=connection,
        )
    )
    if text:
        mid = ((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1])
        ax.text(*mid, text, fontsize=9, color=INK, va="bottom", ha="center")


Corner = Literal["upper left", "lower left", "lower right", "lower center"]


def _legend(
    ax: Axes, entries: list[tuple[str, str]], loc: Corner = "upper left", ncol: int = 1
) -> None:
    """A colour key with one entry per (label, colour); list only colours the diagram draws."""
    handles = [Patch(facecolor=color, edgecolor=INK, label=label) for label, color in entries]
    ax.legend(handles=handles, loc=loc, fontsize=8, frameon=False, ncol=ncol)


def box_colors(fig: Figure) -> set[str]:
    """The fill colours of the boxes a diagram draws (for tests: every legend colour is used)."""
    return {to_hex(p.get_facecolor()) for p in fig.axes[0].patches if isinstance(p, FancyBboxPatch)}


def legend_entries(fig: Figure) -> dict[str, str]:
    """A diagram's colour key as {label: fill colour}."""
    legend = fig.axes[0].get_legend()
    if legend is None:
        return {}
    return {
        text.get_text(): to_hex(handle.get_facecolor())
        for text, handle in zip(legend.get_texts(), legend.legend_handles, strict=True)
        if isinstance(handle, Patch)
    }


def lora_block(
    in_dim: int = 768, out_dim: int = 768, rank: int = 16, *, lang: str = "en"
) -> Figure:
    """One adapted linear layer: x goes through the frozen W₀ and, beside it, through A then B."""
    _check_language(lang)
    sizes = {"in_dim": in_dim, "out_dim": out_dim, "rank": rank}
    fig, ax = _canvas(8.4, 5.6)
    _box(ax, 3.3, 0.2, 1.8, 0.6, f"x   (…, {in_dim})")
    w0 = _text(lang, "W₀   {out_dim} × {in_dim}\n(d_out × d_in)\nfrozen", **sizes)
    _box(ax, 0.5, 1.6, 2.8, 1.3, w0, FROZEN)
    a = _text(lang, "A   {in_dim} × {rank}\n(d_in × r), starts random", **sizes)
    _box(ax, 5.0, 1.2, 2.4, 0.8, a, TRAINED, 9)
    b = _text(lang, "B   {rank} × {out_dim}\n(r × d_out), starts at 0", **sizes)
    _box(ax, 5.0, 2.6, 2.4, 0.8, b, TRAINED, 9)
    _box(ax, 3.7, 4.0, 1.0, 0.6, "+")
    _arrow(ax, (3.7, 0.8), (1.9, 1.6))
    _arrow(ax, (4.7, 0.8), (6.2, 1.2))
    xa = _text(lang, "x·A: only {rank} numbers", rank=rank)
    _arrow(ax, (6.2, 2.0), (6.2, 2.6), xa, offset=(1.05, -0.12))
    _arrow(ax, (1.9, 2.9), (3.75, 4.05), "x·W₀ᵀ", offset=(-0.3, 0.12))
    _arrow(ax, (6.2, 3.4), (4.65, 4.05), "× s = α/r", offset=(0.55, 0.1))
    ax.text(4.2, 5.3, "y = x·W₀ᵀ + s·x·A·B,   s = α/r", ha="center", fontsize=12, color=INK)
    ax.text(4.2, 4.85, _text(lang, NOTATION), ha="center", fontsize=8, color=INK)
    _legend(
        ax,
        [
            (_text(lang, "frozen: pretrained weight"), FROZEN),
            (_text(lang, "trained: adapter A, B"), TRAINED),
        ],
        loc="lower left",
    )
    fig.alt_text = _text(  # type: ignore[attr-defined]
        lang,
        "An adapted linear layer. The input row x of width {in_dim} passes through the frozen "
        "weight W0 ({out_dim} by {in_dim}, as nn.Linear stores it, so this path computes x times "
        "W0 transposed) and, beside it, through the trained A ({in_dim} by {rank}, random at the "
        "start) and then the trained B ({rank} by {out_dim}, zero at the start); the low-rank "
        "path is multiplied by s = alpha over r and added to the frozen path.",
        **sizes,
    )
    return fig


def transformer_block(targets: tuple[str, ...] = LORA_TARGETS, *, lang: str = "en") -> Figure:
    """A GPT-2 block from bottom to top, with residual paths and the layers LoRA adapts marked.

    Every weight of the block stays frozen; an adapted layer gets a trained adapter beside it.
    """
    _check_language(lang)
    fig, ax = _canvas(9, 8.6)
    x_mid, width, height, gap = 4.2, 4.8, 0.45, 0.22
    add_residual = _text(lang, "⊕  add the residual")
    rows: list[tuple[str, tuple[str, ...] | None, str]] = [
        (_text(lang, "x  (input of the block)"), None, NEUTRAL),
        ("LayerNorm 1", None, FROZEN),
        ("W_query   W_key   W_value", ("W_query", "W_key", "W_value"), FROZEN),
        (_text(lang, "causal self-attention (softmax)"), None, NEUTRAL),
        ("out_proj", ("out_proj",), FROZEN),
        (add_residual, None, NEUTRAL),
        ("LayerNorm 2", None, FROZEN),
        ("ff.layers.0  (768 → 3072)", ("ff.layers.0",), FROZEN),
        ("GELU", None, NEUTRAL),
        ("ff.layers.2  (3072 → 768)", ("ff.layers.2",), FROZEN),
        (add_residual, None, NEUTRAL),
    ]
    y, centres, any_adapted = 0.3, [], False
    for i, (label, names, color) in enumerate(rows):
        adapted = names is not None and all(n in targets for n in names)
        any_adapted |= adapted
        _box(ax, x_mid - width / 2, y, width, height, label, color)
        if adapted:
            _box(ax, x_mid + width / 2 + 0.35, y, 1.7, height, "+ s·x·A·B  ← LoRA", TRAINED, 9)
            ax.plot([x_mid + width / 2, x_mid + width / 2 + 0.35], [y + height / 2] * 2, color=INK)
        if i:
            _arrow(ax, (x_mid, y - gap), (x_mid, y))
        centres.append(y + height / 2)
        y += height + gap
    _arrow(ax, (x_mid, y - gap), (x_mid, y + 0.1))
    ax.text(x_mid, y + 0.2, _text(lang, "to the next block"), ha="center", fontsize=9)
    # The two residual paths: each half's input branches off, skips the half and is added to
    # the half's output at ⊕.
    left = x_mid - width / 2
    for side, (start, end) in ((left - 0.7, (0, 5)), (left - 0.35, (5, 10))):
        branch = centres[start] + (height + gap) / 2
        ax.plot([x_mid, side, side], [branch, branch, centres[end]], color=INK, lw=1.2)
        _arrow(ax, (side, centres[end]), (left, centres[end]))
        middle = (branch + centres[end]) / 2
        residual = _text(lang, "residual")
        ax.text(side - 0.08, middle, residual, rotation=90, ha="right", va="center", fontsize=9)
    title = _text(lang, "one transformer block (GPT-2 has 12)")
    ax.text(x_mid, y + 0.75, title, ha="center", fontsize=11)
    entries = [
        (_text(lang, "frozen: pretrained weights"), FROZEN),
        (_text(lang, "no weights"), NEUTRAL),
    ]
    if any_adapted:
        entries.insert(1, (_text(lang, "trained: LoRA adapter (A, B)"), TRAINED))
    _legend(ax, entries, loc="lower right")
    adapted_names = [
        name for _, names, _ in rows if names and all(n in targets for n in names) for name in names
    ]
    adapters = (
        _text(lang, "a trained LoRA adapter sits beside {names}.", names=", ".join(adapted_names))
        if adapted_names
        else _text(lang, "no layer has an adapter.")
    )
    fig.alt_text = _text(  # type: ignore[attr-defined]
        lang,
        "A GPT-2 transformer block from input to output: layer norm, the query, key and value "
        "projections, attention, the output projection and a residual sum that adds the block's "
        "input back, then layer norm, the two feed-forward layers around a GELU, and a second "
        "residual sum. All pretrained weights stay frozen; {adapters}",
        adapters=adapters,
    )
    return fig


def merge_and_swap(*, lang: str = "en") -> Figure:
    """One layer in three states: unmerged (two paths), merged (one weight), another task in."""
    _check_language(lang)
    fig, ax = _canvas(10.4, 4.4)
    task_1 = _text(lang, "+ s·(A₁B₁)ᵀ   task 1")
    task_2 = _text(lang, "+ s·(A₂B₂)ᵀ   task 2")
    panels = [
        (0.2, _text(lang, "training / unmerged"), [("W₀", FROZEN), (task_1, TRAINED)]),
        (3.7, _text(lang, "merged"), [("W = W₀ + s·(A₁B₁)ᵀ", MERGED)]),
        (7.2, _text(lang, "unmerged, task 2 loaded"), [("W₀", FROZEN), (task_2, TRAINED)]),
    ]
    for x, title, parts in panels:
        ax.text(x + 1.45, 3.2, title, ha="center", fontsize=10)
        for j, (label, color) in enumerate(parts):
            _box(ax, x + 0.2, 2.0 - 1.0 * j, 2.5, 0.7, label, color)
    _arrow(ax, (2.95, 2.35), (3.85, 2.35), _text(lang, "merge"), offset=(0, 0.12))
    unmerge = _text(lang, "unmerge\n+ swap")
    _arrow(ax, (6.45, 2.35), (7.35, 2.35), unmerge, offset=(0, 0.12))
    ax.text(
        5.2,
        3.75,
        _text(lang, "W₀: d_out × d_in (nn.Linear's weight);  A: d_in × r;  B: r × d_out;  s = α/r"),
        ha="center",
        fontsize=9,
    )
    ax.text(
        5.2,
        0.55,
        _text(
            lang, "merged: no extra cost per token  ·  unmerged: many small adapters share one base"
        ),
        ha="center",
        fontsize=9,
    )
    _legend(
        ax,
        [
            (_text(lang, "frozen: pretrained W₀"), FROZEN),
            (_text(lang, "trained: adapter"), TRAINED),
            (_text(lang, "merged: fixed after training"), MERGED),
        ],
        loc="lower center",
        ncol=3,
    )
    fig.alt_text = _text(  # type: ignore[attr-defined]
        lang,
        "Three states of one layer. Unmerged: the frozen W0 plus the trained update of task 1, "
        "s times (A1 B1) transposed, with s = alpha over r. Merged: a single fixed weight W0 plus "
        "that update. After unmerging, the trained adapter of task 2 is loaded beside the same "
        "frozen W0.",
    )
    return fig


def dora_split(seed: int = 0, *, lang: str = "en") -> Figure:
    """DoRA writes each output unit's weight row as a magnitude times a unit direction."""
    _check_language(lang)
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(2, generator=generator)
    w = w / w.norm() * 1.6
    delta = torch.tensor([-0.5, 0.6])
    fig, ax = plt.subplots(figsize=(7.2, 5.4), facecolor="white")
    theta = torch.linspace(0, 2 * math.pi, 200)
    ax.plot(torch.cos(theta), torch.sin(theta), color="#888888", lw=0.8, ls=":")
    m = float(w.norm())
    new_direction = (w + delta) / (w + delta).norm()
    arrows = [
        (w, _text(lang, "a row of W₀ (one output unit): length m = {m:.2f}", m=m), "#4a6fa5", "-"),
        (w / m, _text(lang, "its direction: the row / its length (unit circle)"), "#1f3b63", "-"),
        (
            new_direction,
            _text(lang, "new direction: that row of V = W₀ + s·(AB)ᵀ, over its length"),
            "#c55a11",
            "-",
        ),
        (m * new_direction, _text(lang, "DoRA's row: m times the new direction"), "#c55a11", "--"),
    ]
    for vec, label, color, style in arrows:
        ax.annotate(
            "",
            xy=(float(vec[0]), float(vec[1])),
            xytext=(0, 0),
            arrowprops={"arrowstyle": "-|>", "color": color, "lw": 2, "linestyle": style},
        )
        ax.plot([], [], color=color, lw=2, ls=style, label=label)
    ax.set(aspect="equal", xlim=(-2.2, 2.2), ylim=(-2.2, 2.2))
    ax.axhline(0, color="#cccccc", lw=0.6)
    ax.axvline(0, color="#cccccc", lw=0.6)
    title = _text(
        lang,
        "DoRA, row by row: W = m · V / ‖V‖,  V = W₀ + s·(AB)ᵀ\n"
        "m (one length per output unit) trains on its own; A, B only turn the direction",
    )
    ax.set_title(title, fontsize=9.5)
    ax.legend(loc="lower left", fontsize=7.5)
    fig.alt_text = _text(  # type: ignore[attr-defined]
        lang,
        "A two-dimensional picture of one row of W0, the weights of one output unit: its length "
        "m, its unit direction on the unit circle, and the direction of the same row after adding "
        "the LoRA update s times (AB) transposed; DoRA trains the length m separately and lets "
        "LoRA change only the direction.",
    )
    return fig


def nf4_on_normal_curve(*, lang: str = "en") -> Figure:
    """The 16 NF4 levels on the standard normal density they are built from."""
    _check_language(lang)
    levels = nf4_levels()
    fig, ax = plt.subplots(figsize=(8, 3.6), facecolor="white")
    x = torch.linspace(-3.2, 3.2, 400)
    density = torch.exp(-(x**2) / 2) / math.sqrt(2 * math.pi)
    label = _text(lang, "normal density (weights, scaled)")
    ax.plot(x, density, color="#4a6fa5", lw=1.5, label=label)
    # NF4's levels are quantiles of the normal divided by the largest one, Φ⁻¹(offset); multiplying
    # by it puts them back where they came from on the normal curve.
    largest = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(NF4_OFFSET)))
    label = _text(lang, "the 16 NF4 levels")
    ax.vlines(levels * largest, 0, 0.42, color="#c55a11", lw=1.2, label=label)
    evenly = torch.linspace(-1, 1, 16) * largest
    label = _text(lang, "16 evenly spaced levels")
    ax.vlines(evenly, -0.06, 0, color="#888888", lw=1.2, label=label)
    xlabel = _text(lang, "weight, in standard deviations")
    ax.set(xlabel=xlabel, yticks=[], ylim=(-0.08, 0.45))
    ax.set_title(_text(lang, "NF4 places its levels where normally distributed weights are dense"))
    ax.legend(loc="upper right", fontsize=8)
    fig.alt_text = _text(  # type: ignore[attr-defined]
        lang,
        "A bell-shaped normal density with the 16 NF4 quantisation levels drawn as vertical lines: "
        "they crowd near zero where most weights are and spread out in the tails, unlike 16 evenly "
        "spaced levels drawn below the axis.",
    )
    return fig


def _image(fig: Figure, lang: str, width: int) -> str:
    """The figure as an HTML image in ``lang`` carrying its alt text; closes the figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    alt = html.escape(getattr(fig, "alt_text", ""), quote=True)
    return f'<img lang="{lang}" src="data:image/png;base64,{data}" alt="{alt}" width="{width}">'


def _language_style() -> str:
    """CSS that shows the image in the page's language: the source language's by default."""
    source, *translated = LANGUAGES
    rules = [f".lt-diagram img:not(:lang({source})){{display:none}}"]
    for lang in translated:
        page = f"html:lang({lang}) .lt-diagram"
        rules += [f"{page} img:lang({source}){{display:none}}"]
        rules += [f"{page} img:lang({lang}){{display:inline}}"]
    return "<style>" + " ".join(rules) + "</style>"


def show(draw: Callable[..., Figure], /, *, width: int = 640, **kwargs: object) -> HTML:
    """The diagram drawn in every language of the book, as HTML images for a chapter cell.

    ``draw`` is a diagram function and ``kwargs`` its arguments: ``show(lora_block, rank=8)``.
    Each image carries its alt text (Jupyter's usual figure output has none, so screen readers
    would announce only "image") and its language; a small style shows the one that matches
    the page's language, English in Jupyter and Colab, French on the French site. The figures
    are closed, so Jupyter does not show them a second time.
    """
    from IPython.display import HTML

    images = [_image(draw(lang=lang, **kwargs), lang, width) for lang in LANGUAGES]
    return HTML(f'<div class="lt-diagram">{_language_style()}{"".join(images)}</div>')


ALL = {
    "lora_block": lora_block,
    "transformer_block": transformer_block,
    "merge_and_swap": merge_and_swap,
    "dora_split": dora_split,
    "nf4_on_normal_curve": nf4_on_normal_curve,
}


# --- French ------------------------------------------------------------------------------------

# Each English template above, in French. Symbols, layer names, shapes and numbers stay as they
# are; before : ; ! ? French typography puts a no-break space (U+00A0), which these strings hold.
FRENCH: dict[str, str] = {
    # lora_block
    NOTATION: "x : une ligne de d_in nombres ;  W₀ : d_out × d_in, comme nn.Linear la stocke",
    "W₀   {out_dim} × {in_dim}\n(d_out × d_in)\nfrozen": (
        "W₀   {out_dim} × {in_dim}\n(d_out × d_in)\npoids gelés"
    ),
    "A   {in_dim} × {rank}\n(d_in × r), starts random": (
        "A   {in_dim} × {rank}\n(d_in × r), aléatoire au départ"
    ),
    "B   {rank} × {out_dim}\n(r × d_out), starts at 0": (
        "B   {rank} × {out_dim}\n(r × d_out), nulle au départ"
    ),
    "x·A: only {rank} numbers": "x·A : seulement {rank} nombres",
    "frozen: pretrained weight": "gelé : poids pré-entraîné",
    "trained: adapter A, B": "entraîné : adaptateur A, B",
    "An adapted linear layer. The input row x of width {in_dim} passes through the frozen "
    "weight W0 ({out_dim} by {in_dim}, as nn.Linear stores it, so this path computes x times "
    "W0 transposed) and, beside it, through the trained A ({in_dim} by {rank}, random at the "
    "start) and then the trained B ({rank} by {out_dim}, zero at the start); the low-rank "
    "path is multiplied by s = alpha over r and added to the frozen path.": (
        "Une couche linéaire adaptée. La ligne d’entrée x, de largeur {in_dim}, traverse le poids "
        "gelé W0 ({out_dim} par {in_dim}, tel que nn.Linear le stocke ; ce chemin calcule donc x "
        "multiplié par la transposée de W0) et, à côté, la matrice entraînée A ({in_dim} par "
        "{rank}, aléatoire au départ) puis la matrice entraînée B ({rank} par {out_dim}, nulle au "
        "départ) ; le chemin de faible rang est multiplié par s = alpha sur r et ajouté au chemin "
        "gelé."
    ),
    # transformer_block
    "x  (input of the block)": "x  (entrée du bloc)",
    "causal self-attention (softmax)": "auto-attention causale (softmax)",
    "⊕  add the residual": "⊕  ajouter la connexion résiduelle",
    "to the next block": "vers le bloc suivant",
    "residual": "connexion résiduelle",
    "one transformer block (GPT-2 has 12)": "un bloc Transformer (GPT-2 en compte 12)",
    "frozen: pretrained weights": "gelés : poids pré-entraînés",
    "no weights": "sans poids",
    "trained: LoRA adapter (A, B)": "entraîné : adaptateur LoRA (A, B)",
    "a trained LoRA adapter sits beside {names}.": (
        "un adaptateur LoRA entraîné se trouve à côté de {names}."
    ),
    "no layer has an adapter.": "aucune couche n’a d’adaptateur.",
    "A GPT-2 transformer block from input to output: layer norm, the query, key and value "
    "projections, attention, the output projection and a residual sum that adds the block's "
    "input back, then layer norm, the two feed-forward layers around a GELU, and a second "
    "residual sum. All pretrained weights stay frozen; {adapters}": (
        "Un bloc Transformer de GPT-2, de l’entrée à la sortie : normalisation de couche, les "
        "projections de requête, de clé et de valeur, l’attention, la projection de sortie et une "
        "connexion résiduelle qui rajoute l’entrée du bloc, puis une normalisation de couche, les "
        "deux couches du réseau à propagation avant autour d’une GELU, et une seconde connexion "
        "résiduelle. Tous les poids pré-entraînés restent gelés ; {adapters}"
    ),
    # merge_and_swap
    "+ s·(A₁B₁)ᵀ   task 1": "+ s·(A₁B₁)ᵀ   tâche 1",
    "+ s·(A₂B₂)ᵀ   task 2": "+ s·(A₂B₂)ᵀ   tâche 2",
    "training / unmerged": "entraînement / non fusionné",
    "merged": "fusionné",
    "unmerged, task 2 loaded": "non fusionné, tâche 2 chargée",
    "merge": "fusionner",
    "unmerge\n+ swap": "défusionner\n+ échanger",
    "W₀: d_out × d_in (nn.Linear's weight);  A: d_in × r;  B: r × d_out;  s = α/r": (
        "W₀ : d_out × d_in (le poids de nn.Linear) ;  A : d_in × r ;  B : r × d_out ;  s = α/r"
    ),
    "merged: no extra cost per token  ·  unmerged: many small adapters share one base": (
        "fusionné : aucun coût supplémentaire par token  ·  "
        "non fusionné : plusieurs petits adaptateurs partagent une même base"
    ),
    "frozen: pretrained W₀": "gelé : W₀ pré-entraîné",
    "trained: adapter": "entraîné : adaptateur",
    "merged: fixed after training": "fusionné : fixé après l’entraînement",
    "Three states of one layer. Unmerged: the frozen W0 plus the trained update of task 1, "
    "s times (A1 B1) transposed, with s = alpha over r. Merged: a single fixed weight W0 plus "
    "that update. After unmerging, the trained adapter of task 2 is loaded beside the same "
    "frozen W0.": (
        "Trois états d’une même couche. Non fusionnée : le poids gelé W0 plus la mise à jour "
        "entraînée de la tâche 1, s fois la transposée de (A1 B1), avec s = alpha sur r. "
        "Fusionnée : un seul poids fixe, W0 plus cette mise à jour. Une fois la fusion défaite, "
        "l’adaptateur entraîné de la tâche 2 est chargé à côté du même poids gelé W0."
    ),
    # dora_split
    "a row of W₀ (one output unit): length m = {m:.2f}": (
        "une ligne de W₀ (une unité de sortie) : longueur m = {m:.2f}"
    ),
    "its direction: the row / its length (unit circle)": (
        "sa direction : la ligne / sa longueur (cercle unité)"
    ),
    "new direction: that row of V = W₀ + s·(AB)ᵀ, over its length": (
        "nouvelle direction : cette ligne de V = W₀ + s·(AB)ᵀ, divisée par sa longueur"
    ),
    "DoRA's row: m times the new direction": "ligne de DoRA : m fois la nouvelle direction",
    "DoRA, row by row: W = m · V / ‖V‖,  V = W₀ + s·(AB)ᵀ\n"
    "m (one length per output unit) trains on its own; A, B only turn the direction": (
        "DoRA, ligne par ligne : W = m · V / ‖V‖,  V = W₀ + s·(AB)ᵀ\n"
        "m (une longueur par unité de sortie) s’entraîne à part ; A, B ne font que tourner "
        "la direction"
    ),
    "A two-dimensional picture of one row of W0, the weights of one output unit: its length "
    "m, its unit direction on the unit circle, and the direction of the same row after adding "
    "the LoRA update s times (AB) transposed; DoRA trains the length m separately and lets "
    "LoRA change only the direction.": (
        "Une image en deux dimensions d’une ligne de W0, les poids d’une unité de sortie : sa "
        "longueur m, sa direction unitaire sur le cercle unité, et la direction de la même ligne "
        "après ajout de la mise à jour LoRA, s fois la transposée de (AB) ; DoRA entraîne la "
        "longueur m à part et ne laisse LoRA changer que la direction."
    ),
    # nf4_on_normal_curve
    "normal density (weights, scaled)": "densité normale (poids, mis à l’échelle)",
    "the 16 NF4 levels": "les 16 niveaux NF4",
    "16 evenly spaced levels": "16 niveaux régulièrement espacés",
    "weight, in standard deviations": "poids, en écarts-types",
    "NF4 places its levels where normally distributed weights are dense": (
        "NF4 place ses niveaux là où les poids de loi normale sont denses"
    ),
    "A bell-shaped normal density with the 16 NF4 quantisation levels drawn as vertical lines: "
    "they crowd near zero where most weights are and spread out in the tails, unlike 16 evenly "
    "spaced levels drawn below the axis.": (
        "Une densité normale en cloche avec les 16 niveaux de quantification NF4 tracés en lignes "
        "verticales : ils se resserrent près de zéro, là où se trouvent la plupart des poids, et "
        "s’espacent dans les queues, contrairement aux 16 niveaux régulièrement espacés tracés "
        "sous l’axe."
    ),
}
"""Each English template of the diagrams, in French (a missing one is a KeyError in French)."""

_TRANSLATIONS: dict[str, dict[str, str] | None] = {"en": None, "fr": FRENCH}
"""The templates of each language the diagrams are drawn in; None: the English ones as written."""
