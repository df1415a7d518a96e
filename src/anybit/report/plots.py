"""Plots written next to run outputs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path


def plot_accuracy_vs_bits(
    series: Mapping[str, Mapping[int, float]],
    path: str | os.PathLike,
    trained: Mapping[str, Iterable[int]] | None = None,
    title: str = "Top-1 accuracy by bit-width",
) -> Path:
    """Accuracy (y) against bit-width (x, 32 drawn as "FP") for one or more labelled series.

    Points at bit-widths listed in ``trained[label]`` are filled, the others (evaluated without
    training at that precision) hollow. Returns the written path (PNG).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    all_bits = sorted({b for s in series.values() for b in s})
    position = {b: i for i, b in enumerate(all_bits)}
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    try:
        for label, points in series.items():
            bits = sorted(points)
            xs = [position[b] for b in bits]
            line, = ax.plot(xs, [points[b] for b in bits], "-", label=label, alpha=0.8)
            done = set(trained.get(label, bits)) if trained else set(bits)
            for b in bits:
                ax.plot(position[b], points[b], "o", color=line.get_color(),
                        markerfacecolor=line.get_color() if b in done else "white")
        ax.set_xticks(range(len(all_bits)), ["FP" if b == 32 else str(b) for b in all_bits])
        ax.set_xlabel("bit-width (weights and activations); hollow = not trained at that bit-width")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    finally:
        plt.close(fig)
    return out
