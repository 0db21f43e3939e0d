"""Macro-F1 over the classes of the truth, with unreadable predictions counted wrong (torchmetrics underneath)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_f1_score


def f1_scores(truth: Sequence[int], predicted: Sequence[int | None], n_classes: int) -> tuple[float, dict[int, float]]:
    """Macro-F1 and per-class F1 over the classes present in `truth`.

    A None (unreadable) prediction is wrong: a false negative of its true class and a false positive of
    none. The classes averaged are those in `truth`, as in :func:`macro_f1`.

    Args:
        truth: class indices in [0, n_classes).
        predicted: class indices or None.
        n_classes: number of classes.
    Returns:
        (macro-F1, {class: F1}); (nan, {}) for no rows.
    """
    unreadable = np.array([n_classes if p is None else p for p in predicted], dtype=np.int64)
    return coded_f1_scores(np.asarray(truth, dtype=np.int64), unreadable, n_classes)


def coded_f1_scores(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> tuple[float, dict[int, float]]:
    """:func:`f1_scores` with unreadable predictions already coded as class `n_classes`."""
    if len(truth) == 0:
        return float("nan"), {}
    # The extra class n_classes collects unreadable predictions; it is never averaged.
    per_class = multiclass_f1_score(torch.as_tensor(predicted), torch.as_tensor(truth), n_classes + 1,
                                    average="none", validate_args=False)
    scores = {c: float(per_class[c]) for c in sorted({int(t) for t in truth})}
    return float(np.mean(list(scores.values()))), scores


def macro_f1(truth: Sequence[Hashable], predicted: Sequence[Hashable | None]) -> float:
    """Macro-F1 over the labels in `truth` (any hashable labels, e.g. answer strings); a None (unparsable)
    prediction, or one of a label not in `truth`, is a miss of its true label."""
    labels = {c: i for i, c in enumerate(dict.fromkeys([*truth, *(p for p in predicted if p is not None)]))}
    return f1_scores([labels[t] for t in truth], [None if p is None else labels[p] for p in predicted],
                     len(labels))[0]
