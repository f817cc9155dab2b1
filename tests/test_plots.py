"""The book's bar charts leave room for their value labels."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure

from lora_tutorial.book import plots
from lora_tutorial.train import MethodResult


def labels_outside_their_axes(fig: Figure) -> list[str]:
    """The value labels whose box reaches past the top or bottom of their axes, once drawn."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    outside = []
    for ax in fig.axes:
        frame = ax.get_window_extent(renderer)
        for text in ax.texts:
            box = text.get_window_extent(renderer)
            if box.y1 > frame.y1 or box.y0 < frame.y0:
                outside.append(text.get_text())
    return outside


def result(
    method: str, trainable: int, seconds: float, memory_gib: float, accuracy: float
) -> MethodResult:
    return MethodResult(
        method, trainable, 124_000_000, seconds, int(memory_gib * 2**30), "test", accuracy, accuracy
    )


def test_method_comparison_labels_fit_inside_the_panels() -> None:
    results = [
        result("lora", 2_666_000, 41.0, 3.1, 0.97),
        result("full", 124_441_000, 95.0, 7.9, 0.99),
        result("last-block", 7_100_000, 30.0, 2.2, 0.95),
    ]
    fig = plots.plot_method_comparison(results)
    try:
        assert sum(len(ax.texts) for ax in fig.axes) == 4 * len(results)
        assert labels_outside_their_axes(fig) == []
    finally:
        plt.close(fig)


@pytest.mark.parametrize("log", [False, True])
def test_bar_labels_fit_inside_the_axes(log: bool) -> None:
    fig = plots.plot_bars(
        ["a", "b", "c"], [12.0, 950.0, 87.0], title="sizes", ylabel="size (KiB)", log=log
    )
    try:
        assert [t.get_text() for t in fig.axes[0].texts] == ["12", "950", "87"]
        assert labels_outside_their_axes(fig) == []
    finally:
        plt.close(fig)
