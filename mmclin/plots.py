"""Figures that reports and tools write (matplotlib, headless)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger

from mmclin.runs import run_dir  # noqa: E402


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classnames: Sequence[str],
                          path: str | os.PathLike | None, title: str = ""):
    """A confusion matrix (rows = truth, columns = prediction) with counts and row-normalised colour, saved to
    `path`; with `path` None the figure is returned (for :func:`log_figure`)."""
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
    if path is None:
        return fig
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def plot_roc_curves(scores: np.ndarray, labels: np.ndarray, classnames: Sequence[str], title: str = ""):
    """One-vs-rest ROC curves (scikit-learn's ``roc_curve``) of (N, K) class scores against (N,) labels, with each
    class's AUROC in the legend; classes absent (or alone) in `labels` are left out. Returns the figure."""
    from sklearn.metrics import auc, roc_curve

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for k, name in enumerate(classnames):
        truth = labels == k
        if 0 < truth.sum() < len(truth):
            fpr, tpr, _ = roc_curve(truth, scores[:, k])
            ax.plot(fpr, tpr, lw=1.2, label=f"{name} ({auc(fpr, tpr):.2f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or "ROC, one vs rest (AUROC)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def plot_effects(effects: dict[str, dict[str, float]], title: str = ""):
    """Paired differences (after minus before) with their 95% intervals, one row per metric (figure)."""
    names = list(effects)
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.2))
    for y, name in enumerate(names):
        e = effects[name]
        ax.errorbar(e["delta"], y, xerr=[[e["delta"] - e["delta_ci_low"]], [e["delta_ci_high"] - e["delta"]]],
                    fmt="o", color="C0", capsize=3)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(names)), [f"{n} ({effects[n]['before']:.3f} -> {effects[n]['after']:.3f})" for n in names])
    ax.set_xlabel("after minus before (paired bootstrap 95% CI)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def log_figure(module, tag: str, fig) -> None:
    """Put a figure where the run's logger shows images (TensorBoard ``add_figure``, MLflow ``log_figure``) and
    always as ``plots/<tag>-epoch<E>.png`` in the run directory; then close it. Called on every rank; rank 0
    writes."""
    trainer = module.trainer
    directory = os.path.join(run_dir(trainer), "plots")  # on every rank: log_dir is a broadcast under DDP
    if trainer.global_rank == 0:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(tag, fig, global_step=trainer.global_step, close=False)
            elif isinstance(logger, MLFlowLogger):
                logger.experiment.log_figure(logger.run_id, fig, f"{tag}-epoch{trainer.current_epoch:03d}.png")
        os.makedirs(directory, exist_ok=True)
        fig.savefig(os.path.join(directory, f"{tag.replace('/', '-')}-epoch{trainer.current_epoch:03d}.png"), dpi=110)
    plt.close(fig)


def log_text(module, tag: str, text: str) -> None:
    """Text (e.g. sample generations, as Markdown) to TensorBoard ``add_text`` / MLflow ``log_text``; rank 0."""
    trainer = module.trainer
    if trainer.global_rank != 0:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(tag, text, global_step=trainer.global_step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_text(logger.run_id, text, f"{tag}-epoch{trainer.current_epoch:03d}.md")
