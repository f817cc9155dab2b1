"""The book's diagrams: how LoRA is wired, drawn with matplotlib from the package's own values.

One function per diagram; each returns a new figure with a white background (readable in the
site's light and dark themes) and sets ``fig.alt_text``, a one-sentence description for readers
who cannot see the picture. Sizes, layer names and levels come from the package (the NF4 levels
from :func:`lora_tutorial.quantize.nf4_levels`, the target layers from
:data:`lora_tutorial.train.LORA_TARGETS`), so a diagram cannot drift from the code it explains.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import TYPE_CHECKING, Literal

import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch

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


def lora_block(in_dim: int = 768, out_dim: int = 768, rank: int = 16) -> Figure:
    """One adapted linear layer: x goes through the frozen W₀ and, beside it, through A then B."""
    fig, ax = _canvas(8.4, 5.6)
    _box(ax, 3.3, 0.2, 1.8, 0.6, f"x   (…, {in_dim})")
    _box(ax, 0.5, 1.6, 2.8, 1.3, f"W₀   {out_dim} × {in_dim}\n(d_out × d_in)\nfrozen", FROZEN)
    _box(ax, 5.0, 1.2, 2.4, 0.8, f"A   {in_dim} × {rank}\n(d_in × r), starts random", TRAINED, 9)
    _box(ax, 5.0, 2.6, 2.4, 0.8, f"B   {rank} × {out_dim}\n(r × d_out), starts at 0", TRAINED, 9)
    _box(ax, 3.7, 4.0, 1.0, 0.6, "+")
    _arrow(ax, (3.7, 0.8), (1.9, 1.6))
    _arrow(ax, (4.7, 0.8), (6.2, 1.2))
    _arrow(ax, (6.2, 2.0), (6.2, 2.6), f"x·A: only {rank} numbers", offset=(1.05, -0.12))
    _arrow(ax, (1.9, 2.9), (3.75, 4.05), "x·W₀ᵀ", offset=(-0.3, 0.12))
    _arrow(ax, (6.2, 3.4), (4.65, 4.05), "× s = α/r", offset=(0.55, 0.1))
    ax.text(4.2, 5.3, "y = x·W₀ᵀ + s·x·A·B,   s = α/r", ha="center", fontsize=12, color=INK)
    ax.text(4.2, 4.85, NOTATION, ha="center", fontsize=8, color=INK)
    _legend(
        ax,
        [("frozen: pretrained weight", FROZEN), ("trained: adapter A, B", TRAINED)],
        loc="lower left",
    )
    fig.alt_text = (  # type: ignore[attr-defined]
        f"An adapted linear layer. The input row x of width {in_dim} passes through the frozen "
        f"weight W0 ({out_dim} by {in_dim}, as nn.Linear stores it, so this path computes x times "
        f"W0 transposed) and, beside it, through the trained A ({in_dim} by {rank}, random at the "
        f"start) and then the trained B ({rank} by {out_dim}, zero at the start); the low-rank "
        "path is multiplied by s = alpha over r and added to the frozen path."
    )
    return fig


def transformer_block(targets: tuple[str, ...] = LORA_TARGETS) -> Figure:
    """A GPT-2 block from bottom to top, with residual paths and the layers LoRA adapts marked.

    Every weight of the block stays frozen; an adapted layer gets a trained adapter beside it.
    """
    fig, ax = _canvas(9, 8.6)
    x_mid, width, height, gap = 4.2, 4.8, 0.45, 0.22
    rows: list[tuple[str, tuple[str, ...] | None, str]] = [
        ("x  (input of the block)", None, NEUTRAL),
        ("LayerNorm 1", None, FROZEN),
        ("W_query   W_key   W_value", ("W_query", "W_key", "W_value"), FROZEN),
        ("causal self-attention (softmax)", None, NEUTRAL),
        ("out_proj", ("out_proj",), FROZEN),
        ("⊕  add the residual", None, NEUTRAL),
        ("LayerNorm 2", None, FROZEN),
        ("ff.layers.0  (768 → 3072)", ("ff.layers.0",), FROZEN),
        ("GELU", None, NEUTRAL),
        ("ff.layers.2  (3072 → 768)", ("ff.layers.2",), FROZEN),
        ("⊕  add the residual", None, NEUTRAL),
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
    ax.text(x_mid, y + 0.2, "to the next block", ha="center", fontsize=9)
    # The two residual paths: each half's input branches off, skips the half and is added to
    # the half's output at ⊕.
    left = x_mid - width / 2
    for side, (start, end) in ((left - 0.7, (0, 5)), (left - 0.35, (5, 10))):
        branch = centres[start] + (height + gap) / 2
        ax.plot([x_mid, side, side], [branch, branch, centres[end]], color=INK, lw=1.2)
        _arrow(ax, (side, centres[end]), (left, centres[end]))
        middle = (branch + centres[end]) / 2
        ax.text(side - 0.08, middle, "residual", rotation=90, ha="right", va="center", fontsize=9)
    ax.text(x_mid, y + 0.75, "one transformer block (GPT-2 has 12)", ha="center", fontsize=11)
    entries = [("frozen: pretrained weights", FROZEN), ("no weights", NEUTRAL)]
    if any_adapted:
        entries.insert(1, ("trained: LoRA adapter (A, B)", TRAINED))
    _legend(ax, entries, loc="lower right")
    adapted_names = [
        name for _, names, _ in rows if names and all(n in targets for n in names) for name in names
    ]
    fig.alt_text = (  # type: ignore[attr-defined]
        "A GPT-2 transformer block from input to output: layer norm, the query, key and value "
        "projections, attention, the output projection and a residual sum that adds the block's "
        "input back, then layer norm, the two feed-forward layers around a GELU, and a second "
        "residual sum. All pretrained weights stay frozen; "
        + (
            f"a trained LoRA adapter sits beside {', '.join(adapted_names)}."
            if adapted_names
            else "no layer has an adapter."
        )
    )
    return fig


def merge_and_swap() -> Figure:
    """One layer in three states: unmerged (two paths), merged (one weight), another task in."""
    fig, ax = _canvas(10.4, 4.4)
    panels = [
        (0.2, "training / unmerged", [("W₀", FROZEN), ("+ s·(A₁B₁)ᵀ   task 1", TRAINED)]),
        (3.7, "merged", [("W = W₀ + s·(A₁B₁)ᵀ", MERGED)]),
        (7.2, "unmerged, task 2 loaded", [("W₀", FROZEN), ("+ s·(A₂B₂)ᵀ   task 2", TRAINED)]),
    ]
    for x, title, parts in panels:
        ax.text(x + 1.45, 3.2, title, ha="center", fontsize=10)
        for j, (label, color) in enumerate(parts):
            _box(ax, x + 0.2, 2.0 - 1.0 * j, 2.5, 0.7, label, color)
    _arrow(ax, (2.95, 2.35), (3.85, 2.35), "merge")
    _arrow(ax, (6.45, 2.35), (7.35, 2.35), "unmerge\n+ swap")
    ax.text(
        5.2,
        3.75,
        "W₀: d_out × d_in (nn.Linear's weight);  A: d_in × r;  B: r × d_out;  s = α/r",
        ha="center",
        fontsize=9,
    )
    ax.text(
        5.2,
        0.55,
        "merged: no extra cost per token  ·  unmerged: many small adapters share one base",
        ha="center",
        fontsize=9,
    )
    _legend(
        ax,
        [
            ("frozen: pretrained W₀", FROZEN),
            ("trained: adapter", TRAINED),
            ("merged: fixed after training", MERGED),
        ],
        loc="lower center",
        ncol=3,
    )
    fig.alt_text = (  # type: ignore[attr-defined]
        "Three states of one layer. Unmerged: the frozen W0 plus the trained update of task 1, "
        "s times (A1 B1) transposed, with s = alpha over r. Merged: a single fixed weight W0 plus "
        "that update. After unmerging, the trained adapter of task 2 is loaded beside the same "
        "frozen W0."
    )
    return fig


def dora_split(seed: int = 0) -> Figure:
    """DoRA writes each output unit's weight row as a magnitude times a unit direction."""
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
        (w, f"a row of W₀ (one output unit): length m = {m:.2f}", "#4a6fa5", "-"),
        (w / m, "its direction: the row / its length (unit circle)", "#1f3b63", "-"),
        (
            new_direction,
            "new direction: that row of V = W₀ + s·(AB)ᵀ, over its length",
            "#c55a11",
            "-",
        ),
        (m * new_direction, "DoRA's row: m times the new direction", "#c55a11", "--"),
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
    ax.set_title(
        "DoRA, row by row: W = m · V / ‖V‖,  V = W₀ + s·(AB)ᵀ\n"
        "m (one length per output unit) trains on its own; A, B only turn the direction",
        fontsize=9.5,
    )
    ax.legend(loc="lower left", fontsize=7.5)
    fig.alt_text = (  # type: ignore[attr-defined]
        "A two-dimensional picture of one row of W0, the weights of one output unit: its length "
        "m, its unit direction on the unit circle, and the direction of the same row after adding "
        "the LoRA update s times (AB) transposed; DoRA trains the length m separately and lets "
        "LoRA change only the direction."
    )
    return fig


def nf4_on_normal_curve() -> Figure:
    """The 16 NF4 levels on the standard normal density they are built from."""
    levels = nf4_levels()
    fig, ax = plt.subplots(figsize=(8, 3.6), facecolor="white")
    x = torch.linspace(-3.2, 3.2, 400)
    density = torch.exp(-(x**2) / 2) / math.sqrt(2 * math.pi)
    ax.plot(x, density, color="#4a6fa5", lw=1.5, label="normal density (weights, scaled)")
    # NF4's levels are quantiles of the normal divided by the largest one, Φ⁻¹(offset); multiplying
    # by it puts them back where they came from on the normal curve.
    largest = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(NF4_OFFSET)))
    ax.vlines(levels * largest, 0, 0.42, color="#c55a11", lw=1.2, label="the 16 NF4 levels")
    evenly = torch.linspace(-1, 1, 16) * largest
    ax.vlines(evenly, -0.06, 0, color="#888888", lw=1.2, label="16 evenly spaced levels")
    ax.set(xlabel="weight, in standard deviations", yticks=[], ylim=(-0.08, 0.45))
    ax.set_title("NF4 places its levels where normally distributed weights are dense")
    ax.legend(loc="upper right", fontsize=8)
    fig.alt_text = (  # type: ignore[attr-defined]
        "A bell-shaped normal density with the 16 NF4 quantisation levels drawn as vertical lines: "
        "they crowd near zero where most weights are and spread out in the tails, unlike 16 evenly "
        "spaced levels drawn below the axis."
    )
    return fig


def show(fig: Figure, width: int = 640) -> HTML:
    """The figure as an HTML image carrying its alt text, for a chapter cell to display; closes it.

    Jupyter's usual figure output has no alt text, so screen readers would announce only "image".
    """
    from IPython.display import HTML

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    alt = html.escape(getattr(fig, "alt_text", ""), quote=True)
    return HTML(f'<img src="data:image/png;base64,{data}" alt="{alt}" width="{width}">')


ALL = {
    "lora_block": lora_block,
    "transformer_block": transformer_block,
    "merge_and_swap": merge_and_swap,
    "dora_split": dora_split,
    "nf4_on_normal_curve": nf4_on_normal_curve,
}
