"""The book's figures, one function per kind of figure.

Each function draws on a new figure (or on ``ax`` when given) and returns the figure; pass
``path`` to also save it as an image. Chapters show the returned figure; the command line
saves and closes it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import cast

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from lora_tutorial.data import LABELS
from lora_tutorial.runtime.files import atomic_write
from lora_tutorial.train import History, MethodResult


def save_figure(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Save ``fig`` to ``path`` atomically (format from the suffix, e.g. ``.png``)."""
    path = Path(path)
    with atomic_write(path) as tmp:  # the temporary name keeps the suffix, which picks the format
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    return path


def _axes(ax: Axes | None, size: tuple[float, float] = (6, 4)) -> tuple[Figure, Axes]:
    if ax is not None:  # the book's axes sit on a Figure, never on a SubFigure
        return cast(Figure, ax.figure), ax
    fig, ax = plt.subplots(figsize=size)
    return fig, ax


def plot_losses(
    history: History,
    *,
    ax: Axes | None = None,
    path: str | Path | None = None,
    title: str = "Training and validation loss",
) -> Figure:
    """Cross-entropy loss against the number of training messages seen."""
    fig, ax = _axes(ax)
    ax.plot(
        history.examples_seen,
        history.train_losses,
        marker=".",
        label="training (mean since last point)",
    )
    ax.plot(
        history.examples_seen, history.val_losses, marker=".", linestyle="--", label="validation"
    )
    ax.set(title=title, xlabel="training messages seen", ylabel="cross-entropy loss (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_accuracy(
    history: History,
    *,
    ax: Axes | None = None,
    path: str | Path | None = None,
    title: str = "Accuracy per epoch",
) -> Figure:
    """Training and validation accuracy (%) at the end of each epoch."""
    fig, ax = _axes(ax)
    epochs = range(1, len(history.train_accuracy) + 1)
    ax.plot(epochs, [100 * a for a in history.train_accuracy], marker="o", label="training")
    ax.plot(
        epochs,
        [100 * a for a in history.val_accuracy],
        marker="o",
        linestyle="--",
        label="validation",
    )
    ax.set(title=title, xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 102))
    ax.set_xticks(list(epochs))
    ax.legend()
    ax.grid(alpha=0.3)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_confusion(
    confusion: Sequence[Sequence[int]],
    *,
    labels: Sequence[str] = LABELS,
    ax: Axes | None = None,
    path: str | Path | None = None,
    title: str = "Confusion matrix",
) -> Figure:
    """Counts of true class (rows) against predicted class (columns), each cell annotated."""
    fig, ax = _axes(ax, (4.5, 4))
    image = ax.imshow(confusion, cmap="Blues")
    peak = max(max(row) for row in confusion) or 1
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            ax.text(
                j,
                i,
                str(count),
                ha="center",
                va="center",
                color="white" if count > peak / 2 else "black",
            )
    ticks = range(len(labels))
    ax.set(
        title=title,
        xlabel="predicted class",
        ylabel="true class",
        xticks=ticks,
        yticks=ticks,
        xticklabels=labels,
        yticklabels=labels,
    )
    fig.colorbar(image, ax=ax, label="messages")
    if path is not None:
        save_figure(fig, path)
    return fig


def _short(value: float) -> str:
    """3 significant digits with k/M/G: 124441346 -> '124M'."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def plot_method_comparison(
    results: Sequence[MethodResult],
    *,
    path: str | Path | None = None,
    title: str = "Fine-tuning methods compared",
) -> Figure:
    """Four bar charts side by side: trainable parameters, seconds per epoch, peak memory,
    accuracy."""
    names = [r.method for r in results]
    accuracy = [
        100 * (r.test_accuracy if r.test_accuracy is not None else r.val_accuracy) for r in results
    ]
    accuracy_label = (
        "test accuracy (%)"
        if all(r.test_accuracy is not None for r in results)
        else "validation accuracy (%)"
    )
    panels: list[tuple[str, Sequence[float], bool]] = [
        ("trainable parameters (log scale)", [r.trainable_params for r in results], True),
        ("time per epoch (s)", [r.seconds_per_epoch for r in results], False),
        ("peak memory (GiB)", [r.peak_memory_bytes / 2**30 for r in results], False),
        (accuracy_label, accuracy, False),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    for ax, (label, values, log) in zip(axes, panels):
        plot_bars(
            names, values, title="", ylabel=label, xlabel="method", log=log, fmt=_short, ax=ax
        )
    fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_bars(
    names: Sequence[str],
    values: Sequence[float],
    *,
    title: str,
    ylabel: str,
    xlabel: str = "",
    log: bool = False,
    fmt: str | Callable[[float], str] = "{:,.3g}",
    ax: Axes | None = None,
    path: str | Path | None = None,
) -> Figure:
    """One bar per name, each labelled with its value (class counts, file sizes, latencies).

    ``fmt`` is a format string like ``"{:.1f}"`` or a function from the value to its label.
    """
    fig, ax = _axes(ax, (5, 3.5))
    bars = ax.bar(names, values, color=[f"C{i}" for i in range(len(names))])
    ax.bar_label(bars, fmt=fmt)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if log:
        ax.set_yscale("log")
    ax.margins(y=0.15)  # headroom above the tallest bar for its value label
    ax.grid(axis="y", alpha=0.3)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_length_histogram(
    lengths: Sequence[int] | Mapping[str, Sequence[int]],
    *,
    max_length: int | None = None,
    title: str = "Message lengths",
    ax: Axes | None = None,
    path: str | Path | None = None,
) -> Figure:
    """Histogram of lengths in tokens (one per group when given a dict), with the padding length
    as a vertical line."""
    fig, ax = _axes(ax)
    groups = dict(lengths) if isinstance(lengths, Mapping) else {"messages": lengths}
    bins = range(0, max(max(v) for v in groups.values()) + 4, 3)
    for i, (name, values) in enumerate(groups.items()):
        ax.hist(values, bins=bins, color=f"C{i}", alpha=0.6 if len(groups) > 1 else 1.0, label=name)
    if max_length is not None:
        ax.axvline(
            max_length, color="C3", linestyle="--", label=f"padding length ({max_length} tokens)"
        )
    if max_length is not None or len(groups) > 1:
        ax.legend()
    ax.set(title=title, xlabel="length (tokens)", ylabel="messages")
    ax.grid(alpha=0.3)
    if path is not None:
        save_figure(fig, path)
    return fig
