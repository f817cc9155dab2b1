"""The diagrams draw the package's own values and describe themselves for screen readers."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.collections import LineCollection
from matplotlib.colors import to_hex
from matplotlib.patches import FancyBboxPatch

from lora_tutorial.book import diagrams
from lora_tutorial.quantize import NF4_OFFSET, nf4_levels


@pytest.mark.parametrize("name", sorted(diagrams.ALL))
def test_every_diagram_has_alt_text_and_a_white_background(name: str) -> None:
    fig = diagrams.ALL[name]()
    try:
        assert len(fig.alt_text) > 60  # type: ignore[attr-defined]
        assert fig.get_facecolor()[:3] == (1.0, 1.0, 1.0)
    finally:
        plt.close(fig)


def test_the_nf4_diagram_draws_the_packages_levels_where_the_normal_puts_them() -> None:
    fig = diagrams.nf4_on_normal_curve()
    try:
        largest = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(NF4_OFFSET))
        drawn = [c for c in fig.axes[0].collections if isinstance(c, LineCollection)]
        xs = torch.tensor([float(seg[0][0]) for seg in drawn[0].get_segments()])
        assert torch.allclose(xs, nf4_levels() * largest, atol=1e-5)
    finally:
        plt.close(fig)


def texts_of(fig) -> str:
    return " ".join(t.get_text() for t in fig.axes[0].texts) + " " + fig.axes[0].get_title()


def test_the_block_diagram_marks_exactly_the_chosen_targets() -> None:
    def marked(targets: tuple[str, ...]) -> int:
        fig = diagrams.transformer_block(targets)
        count = sum("← LoRA" in t.get_text() for t in fig.axes[0].texts)
        plt.close(fig)
        return count

    assert marked(("W_query", "W_key", "W_value", "out_proj", "ff.layers.0", "ff.layers.2")) == 4
    assert marked(("ff.layers.0", "ff.layers.2")) == 2
    assert marked(()) == 0


@pytest.mark.parametrize("name", ["lora_block", "transformer_block", "merge_and_swap"])
def test_every_legend_colour_is_drawn_and_frozen_and_trained_mean_what_they_say(name: str) -> None:
    fig = diagrams.ALL[name]()
    try:
        legend = diagrams.legend_entries(fig)
        assert legend, "a diagram that colours boxes needs a colour key"
        assert set(legend.values()) <= diagrams.box_colors(fig), "a legend entry nothing uses"
        assert diagrams.box_colors(fig) - {diagrams.NEUTRAL} <= set(legend.values())
        by_colour = {colour: label for label, colour in legend.items()}
        assert by_colour[diagrams.FROZEN].startswith("frozen")
        assert by_colour[diagrams.TRAINED].startswith("trained")
    finally:
        plt.close(fig)


def test_the_block_diagram_keeps_the_adapted_weights_frozen_and_draws_the_residuals() -> None:
    fig = diagrams.transformer_block()
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
        assert texts_of(fig).count("residual") >= 2  # both residual paths
        assert texts_of(fig).count("add the residual") == 2
        alt = fig.alt_text  # type: ignore[attr-defined]
        assert "frozen" in alt and "trained LoRA adapter" in alt and "residual" in alt
    finally:
        plt.close(fig)


def test_the_lora_block_uses_the_books_notation() -> None:
    fig = diagrams.lora_block(in_dim=1024, out_dim=4096, rank=8)
    texts = texts_of(fig)
    plt.close(fig)
    assert "A   1024 × 8" in texts and "(d_in × r)" in texts  # A: (d_in, r)
    assert "B   8 × 4096" in texts and "(r × d_out)" in texts  # B: (r, d_out)
    assert "W₀   4096 × 1024" in texts and "(d_out × d_in)" in texts  # nn.Linear's layout
    assert "y = x·W₀ᵀ + s·x·A·B" in texts and "s = α/r" in texts
    assert "B·A" not in texts and "x·W₀ " not in texts.replace("x·W₀ᵀ", "")


@pytest.mark.parametrize("name", ["merge_and_swap", "dora_split"])
def test_merging_and_dora_write_the_update_as_s_times_AB_transposed(name: str) -> None:
    fig = diagrams.ALL[name]()
    legend = fig.axes[0].get_legend()
    texts = texts_of(fig) + " ".join(t.get_text() for t in legend.get_texts())
    alt = fig.alt_text  # type: ignore[attr-defined]
    plt.close(fig)
    assert "s·(A" in texts and "B·A" not in texts and "column" not in texts
    assert "transposed" in alt and "column" not in alt
    if name == "merge_and_swap":
        assert "s = α/r" in texts and "frozen W0" in alt and "trained adapter" in alt
    else:
        assert "row" in texts and "row" in alt


def test_show_embeds_the_picture_with_its_alt_text() -> None:
    fig = diagrams.merge_and_swap()
    alt = fig.alt_text  # type: ignore[attr-defined]
    rendered = diagrams.show(fig).data
    assert rendered.startswith('<img src="data:image/png;base64,')
    assert f'alt="{alt}"' in rendered
    assert not plt.fignum_exists(fig.number)  # closed, so Jupyter does not show it a second time
