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
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from lora_tutorial.quantize import NF4_OFFSET, nf4_levels
from lora_tutorial.train import LORA_TARGETS

if TYPE_CHECKING:
    from IPython.display import HTML

FROZEN = "#c9d3e0"  # blue-grey: weights that do not train
TRAINED = "#f4b183"  # orange: weights that train
NEUTRAL = "#ffffff"
INK = "#222222"


def _canvas(width: float, height: float) -> tuple[Figure, Axes]:
    """A figure with one axes in data units 0..width x 0..height, no ticks, white background."""
    fig, ax = plt.subplots(figsize=(width, height), facecolor="white")
    ax.set(xlim=(0, width), ylim=(0, height), aspect="equal")
    ax.axis("off")
    return fig, ax


def _box(ax: Axes, x: float, y: float, w: float, h: float, text: str, color: str = NEUTRAL) -> None:
    """A rounded box with its lower-left corner at (x, y) and centred text."""
    patch = FancyBboxPatch(
        (x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color, ec=INK, lw=1.2
    )
    ax.add_patch(patch)
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=10, color=INK)


def _arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float], text: str = "") -> None:
    """An arrow from ``start`` to ``end``, with an optional label beside its middle."""
    ax.add_patch(
        FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color=INK, lw=1.2)
    )
    if text:
        mid = ((start[0] + end[0]) / 2 + 0.1, (start[1] + end[1]) / 2 + 0.12)
        ax.text(*mid, text, fontsize=9, color=INK, va="bottom", ha="center")


def _legend(ax: Axes, x: float, y: float) -> None:
    """The colour key: frozen and trained weights."""
    _box(ax, x, y, 0.35, 0.3, "", FROZEN)
    ax.text(x + 0.45, y + 0.15, "frozen", va="center", fontsize=9)
    _box(ax, x + 1.4, y, 0.35, 0.3, "", TRAINED)
    ax.text(x + 1.85, y + 0.15, "trained", va="center", fontsize=9)


def lora_block(in_dim: int = 768, out_dim: int = 768, rank: int = 16) -> Figure:
    """x goes through the frozen W0 and, beside it, through A then B; their sum is the output."""
    fig, ax = _canvas(8, 5)
    _box(ax, 3.2, 0.2, 1.6, 0.6, f"x  (…, {in_dim})")
    _box(ax, 0.6, 1.7, 2.6, 1.2, f"frozen W₀\n{in_dim} × {out_dim}", FROZEN)
    _box(ax, 4.6, 1.3, 2.0, 0.7, f"A  {in_dim} × {rank}\n(random)", TRAINED)
    _box(ax, 4.6, 2.5, 2.0, 0.7, f"B  {rank} × {out_dim}\n(zeros)", TRAINED)
    _box(ax, 3.45, 3.9, 1.1, 0.6, "+")
    _arrow(ax, (3.6, 0.8), (1.9, 1.7))
    _arrow(ax, (4.4, 0.8), (5.6, 1.3))
    _arrow(ax, (5.6, 2.0), (5.6, 2.5), f"rank {rank}")
    _arrow(ax, (1.9, 2.9), (3.5, 3.95), "x·W₀")
    _arrow(ax, (5.6, 3.2), (4.5, 3.95), "× α/r")
    ax.text(4.0, 4.75, "h = x·W₀ + (α/r)·x·A·B", ha="center", fontsize=11, color=INK)
    _legend(ax, 0.3, 4.4)
    fig.alt_text = (  # type: ignore[attr-defined]
        f"The input x of width {in_dim} passes through the frozen weight W0 and, beside it, "
        f"through A ({in_dim} by {rank}, random) and B ({rank} by {out_dim}, zeros); the "
        "low-rank path is scaled by alpha over r and added to the frozen path."
    )
    return fig


def transformer_block(targets: tuple[str, ...] = LORA_TARGETS) -> Figure:
    """A GPT-2 block from bottom to top, with the linear layers LoRA adapts highlighted."""
    fig, ax = _canvas(8, 6.4)
    ax.set_ylim(-0.4, 6.4)
    x_mid = 4.0
    rows = [
        ("LayerNorm 1", None),
        ("W_query   W_key   W_value", ("W_query", "W_key", "W_value")),
        ("causal self-attention (softmax)", None),
        ("out_proj", ("out_proj",)),
        ("+ residual, LayerNorm 2", None),
        ("ff.layers.0  (768 → 3072)", ("ff.layers.0",)),
        ("GELU", None),
        ("ff.layers.2  (3072 → 768)", ("ff.layers.2",)),
        ("+ residual", None),
    ]
    height, gap = 0.45, 0.2
    y = 0.3
    for i, (label, names) in enumerate(rows):
        adapted = names is not None and all(n in targets for n in names)
        color = TRAINED if adapted else FROZEN if names else NEUTRAL
        text = label + ("   ← LoRA" if adapted else "")
        _box(ax, x_mid - 2.4, y, 4.8, height, text, color)
        if i:
            _arrow(ax, (x_mid, y - gap), (x_mid, y))
        y += height + gap
    ax.text(x_mid, y + 0.05, "one transformer block (GPT-2 has 12)", ha="center", fontsize=11)
    ax.text(6.55, 0.45, "input", fontsize=9)
    _legend(ax, 0.2, 0.3 - 0.55)
    adapted_names = ", ".join(targets)
    fig.alt_text = (  # type: ignore[attr-defined]
        "A GPT-2 transformer block from input to output: layer norm, the query, key and value "
        "projections, attention, the output projection, a residual sum and layer norm, the two "
        "feed-forward layers around a GELU, and a residual sum. "
        f"Highlighted for LoRA: {adapted_names}."
    )
    return fig


def merge_and_swap() -> Figure:
    """One layer in three states: unmerged (two paths), merged (one weight), another task in."""
    fig, ax = _canvas(10, 3.6)
    panels = [
        (0.2, "training / unmerged", [("W₀", FROZEN), ("+ B·A (task 1)", TRAINED)]),
        (3.6, "merged: W = W₀ + ΔW₁", [("W₀ + ΔW₁", FROZEN)]),
        (7.0, "unmerge, load task 2", [("W₀", FROZEN), ("+ B·A (task 2)", TRAINED)]),
    ]
    for x, title, parts in panels:
        ax.text(x + 1.4, 3.2, title, ha="center", fontsize=10)
        for j, (label, color) in enumerate(parts):
            _box(ax, x + 0.2, 2.0 - 1.0 * j, 2.4, 0.7, label, color)
    _arrow(ax, (2.9, 2.35), (3.7, 2.35), "merge")
    _arrow(ax, (6.3, 2.35), (7.1, 2.35), "unmerge\n+ swap")
    ax.text(
        5.0,
        0.2,
        "merged: no extra cost per token  ·  unmerged: many small adapters share one base",
        ha="center",
        fontsize=9,
    )
    fig.alt_text = (  # type: ignore[attr-defined]
        "Three states of one layer. Unmerged: the frozen W0 plus the trained update BA of task 1. "
        "Merged: a single weight W0 plus delta W1. After unmerging, the adapter of task 2 is "
        "loaded beside the same W0."
    )
    return fig


def dora_split(seed: int = 0) -> Figure:
    """DoRA writes each output unit's weight vector as a magnitude times a unit direction."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(2, generator=generator)
    w = w / w.norm() * 1.6
    delta = torch.tensor([-0.5, 0.6])
    fig, ax = plt.subplots(figsize=(6, 4.6), facecolor="white")
    theta = torch.linspace(0, 2 * math.pi, 200)
    ax.plot(torch.cos(theta), torch.sin(theta), color="#888888", lw=0.8, ls=":")
    m = float(w.norm())
    new_direction = (w + delta) / (w + delta).norm()
    arrows = [
        (w, f"a row of W₀: magnitude m = {m:.2f} times a direction", "#4a6fa5", "-"),
        (w / m, "its direction W₀ / ‖W₀‖ (unit length)", "#1f3b63", "-"),
        (new_direction, "new direction (W₀ + ΔW) / ‖W₀ + ΔW‖", "#c55a11", "-"),
        (m * new_direction, "DoRA's weight: m times the new direction", "#c55a11", "--"),
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
        "DoRA: W = m · (W₀ + ΔW) / ‖W₀ + ΔW‖\n"
        "the magnitude m trains on its own; LoRA only turns the direction"
    )
    ax.legend(loc="lower left", fontsize=8)
    fig.alt_text = (  # type: ignore[attr-defined]
        "A two-dimensional picture of one output unit's weight vector: its magnitude m, its unit "
        "direction on the unit circle, and the direction after adding the LoRA update; DoRA trains "
        "the magnitude separately and lets LoRA change only the direction."
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
