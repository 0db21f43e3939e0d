"""Does the model look? The same model scored with each medium replaced by another study's or by a blank one.

A model that answers from the question alone (the prior of the answers, a word of the question) scores the same
with any medium; medical VLMs are often found to keep their answers when the image is replaced by noise. So every
evaluation of a :class:`~mmclin.models.MultimodalLM` can be repeated with

* ``shuffled_media``: each medium replaced by the nearest other medium of the split with different content (the
  next one in the batch, else the most recent one of the batches before, that is not the same study), and
* ``blank_media``: each medium replaced by zeros of its shape,

and reported beside the majority baseline as ``baseline/shuffled_media_<metric>`` and
``baseline/blank_media_<metric>``, with the paired difference of the real score to each and its bootstrap interval
(``<metric>_minus_shuffled_media``).
"""

from __future__ import annotations

import numpy as np
import torch

from mmclin.metrics.bootstrap import bootstrap_ci

BLIND_VARIANTS = ("shuffled_media", "blank_media")
PREDICTION_KEYS = ("generated", "parsed", "ranked", "choice_loglik")


def other_media_index(media: torch.Tensor, previous: torch.Tensor | None = None) -> list[int | None]:
    """For each medium of `media` (N, ...), the index into ``cat([media, previous])`` of the nearest following medium
    whose content differs (cyclically); None where every candidate is the same (one study's media only).

    Content, not position, decides "another study": several questions on one record come one after another.
    """
    pool = media if previous is None or previous.shape[1:] != media.shape[1:] else torch.cat([media, previous])
    chosen: list[int | None] = []
    for i in range(len(media)):
        chosen.append(next((j % len(pool) for j in range(i + 1, i + len(pool))
                            if not torch.equal(pool[j % len(pool)], media[i])), None))
    return chosen


def recent_distinct(media: torch.Tensor, keep: int = 16) -> list[int]:
    """Indices of the first `keep` media of `media` (N, ...) whose contents differ from every earlier one kept."""
    kept: list[int] = []
    for i in range(len(media)):
        if len(kept) == keep:
            break
        if not any(torch.equal(media[i], media[j]) for j in kept):
            kept.append(i)
    return kept


def variant_rows(rows: list[dict], variant: str) -> list[dict]:
    """The rows as scored under `variant` (their predictions replaced), leaving out rows without one."""
    out = []
    for row in rows:
        blind = (row.get("blind") or {}).get(variant)
        if blind is not None:
            out.append({k: v for k, v in row.items() if k != "blind"} | blind)
    return out


def paired_accuracy_differences(rows: list[dict], prefix: str, n_boot: int = 1000) -> dict[str, float]:
    """Accuracy by likelihood and by generation minus the same under each blind variant, over the closed questions
    scored both ways, with percentile bootstrap 95% intervals of the paired difference."""
    metrics = {}
    for variant in BLIND_VARIANTS:
        pairs = [(r, r["blind"][variant]) for r in rows
                 if r["choices"] and (r.get("blind") or {}).get(variant) is not None]
        for name, key in (("likelihood", "ranked"), ("generation", "parsed")):
            if not pairs:
                continue
            difference = np.array([float(r[key] == r["answer"]) - float(b[key] == r["answer"]) for r, b in pairs])
            base = f"{prefix}/acc_{name}_minus_{variant}"
            metrics[base] = float(difference.mean())
            low, high = bootstrap_ci(np.mean, difference, n_boot=n_boot)
            metrics[f"{base}_ci_low"], metrics[f"{base}_ci_high"] = low, high
    return metrics
