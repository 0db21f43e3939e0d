"""Percentile bootstrap confidence intervals for any per-sample metric."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def bootstrap_ci(
    metric: Callable[..., float],
    *columns: Sequence,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric(*columns)``, resampling rows with replacement.

    Args:
        metric: maps the resampled columns (numpy arrays of equal length) to one number.
        columns: per-sample columns of equal length (e.g. truth and prediction).
        n_boot: number of bootstrap resamples.
        level: coverage of the interval (0.95 for a 95% CI).
        seed: seed of the resampling, so intervals are reproducible.

    Returns:
        (low, high); (nan, nan) when there are no rows. Resamples on which the metric is undefined (nan) are
        dropped.
    """
    arrays = [np.asarray(c, dtype=object) if not isinstance(c, np.ndarray) else c for c in columns]
    n = len(arrays[0]) if arrays else 0
    if any(len(a) != n for a in arrays):
        raise ValueError(f"columns differ in length: {[len(a) for a in arrays]}")
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = np.array([metric(*(a[idx] for a in arrays)) for idx in (rng.integers(0, n, size=n) for _ in range(n_boot))],
                     dtype=float)
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)
