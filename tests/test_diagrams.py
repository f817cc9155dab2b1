"""The diagrams draw the package's own values and describe themselves for screen readers."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.collections import LineCollection

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


def test_the_block_diagram_marks_exactly_the_chosen_targets() -> None:
    def marked(targets: tuple[str, ...]) -> list[str]:
        fig = diagrams.transformer_block(targets)
        texts = [t.get_text() for t in fig.axes[0].texts if "← LoRA" in t.get_text()]
        plt.close(fig)
        return texts

    assert (
        len(marked(("W_query", "W_key", "W_value", "out_proj", "ff.layers.0", "ff.layers.2"))) == 4
    )
    only_ff = marked(("ff.layers.0", "ff.layers.2"))
    assert len(only_ff) == 2 and all(t.startswith("ff.") for t in only_ff)


def test_the_lora_block_labels_its_shapes() -> None:
    fig = diagrams.lora_block(in_dim=1024, out_dim=4096, rank=8)
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    plt.close(fig)
    assert "A  1024 × 8" in texts and "B  8 × 4096" in texts


def test_show_embeds_the_picture_with_its_alt_text() -> None:
    fig = diagrams.merge_and_swap()
    alt = fig.alt_text  # type: ignore[attr-defined]
    rendered = diagrams.show(fig).data
    assert rendered.startswith('<img src="data:image/png;base64,')
    assert f'alt="{alt}"' in rendered
    assert not plt.fignum_exists(fig.number)  # closed, so Jupyter does not show it a second time
