"""Figures that reports and tools write (matplotlib, headless)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classnames: Sequence[str], path: str | os.PathLike,
                          title: str = "") -> None:
    """Save a confusion matrix (rows = truth, columns = prediction) with counts and row-normalised colour."""
    counts = np.asarray(matrix)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts, dtype=float), where=rows > 0)
    k = len(classnames)
    fig, ax = plt.subplots(figsize=(1.2 + 0.75 * k, 1.0 + 0.65 * k))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classnames, rotation=40, ha="right")
    ax.set_yticks(range(k), classnames)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                    color="white" if share[i, j] > 0.6 else "black", fontsize=8)
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
