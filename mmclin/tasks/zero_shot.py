"""Zero-shot classification and retrieval scoring for CLIP-style models.

The classifier is open_clip's prompt-template ensemble (``build_zero_shot_classifier``); retrieval
ranks come from open_clip_train's ``get_clip_metrics``. What they lack, and this file adds: balanced
accuracy, macro one-vs-rest AUROC over the classes present, and per-class figures.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from open_clip import build_zero_shot_classifier
from open_clip_train.train import get_clip_metrics
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from mmclin.errors import ConfigError

# Dermatology prompt templates in the DermLIP style (Yan et al. 2025): the ensemble averages the class
# embedding over phrasings a caption might use.
DERM_TEMPLATES: tuple[str, ...] = (
    "a dermoscopic image of {}.",
    "dermoscopy of {}.",
    "a dermoscopy image showing {}.",
    "this is a skin image of {}.",
    "a skin lesion diagnosed as {}.",
    "a close-up photograph of {} on the skin.",
    "diagnosis: {}.",
    "a lesion that is {}.",
)
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"derm": DERM_TEMPLATES, "plain": ("{}",), "photo": ("a photo of {}.",)}


def resolve_templates(templates: str | Sequence[str]) -> list[str]:
    """A template-set name (``derm``, ``plain``, ``photo``) or a list of ``str.format`` templates with one ``{}``."""
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ConfigError(f"unknown template set '{templates}'; choose one of {sorted(TEMPLATE_SETS)} or a list")
        return list(TEMPLATE_SETS[templates])
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ConfigError(f"each template needs exactly one '{{}}' for the class name; bad: {bad or 'empty list'}")
    return list(templates)


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames: Sequence[str], templates: str | Sequence[str],
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """Class embeddings (D, K), L2-normalised, averaged over the template ensemble."""
    return build_zero_shot_classifier(model, tokenizer, list(classnames), resolve_templates(templates),
                                      device=device, use_tqdm=False)


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, macro one-vs-rest AUROC and per-class figures.

    Args:
        scores: (N, K) logits or probabilities.
        labels: (N,) class indices in [0, K).
        classnames: K names, for the per-class table.
    Returns:
        dict with ``accuracy``, ``balanced_accuracy`` (mean recall over the classes present),
        ``macro_auroc`` (over the classes present with both positives and negatives; NaN if none),
        ``per_class`` and ``confusion_matrix`` (K x K, rows = truth).
    """
    k = len(classnames)
    scores, labels = scores.float().cpu(), labels.long().cpu()
    present = torch.bincount(labels, minlength=k) > 0
    recall = multiclass_recall(scores, labels, k, average=None)
    precision = multiclass_precision(scores, labels, k, average=None)
    f1 = multiclass_f1_score(scores, labels, k, average=None)
    aurocs = {}
    for c in range(k):
        target = labels == c
        if 0 < int(target.sum()) < len(labels):
            aurocs[c] = float(binary_auroc(scores.softmax(-1)[:, c], target.long()))
    support = torch.bincount(labels, minlength=k)
    return {
        "accuracy": float(multiclass_accuracy(scores, labels, k, average="micro")),
        "balanced_accuracy": float(recall[present].mean()),
        "macro_auroc": float(sum(aurocs.values()) / len(aurocs)) if aurocs else float("nan"),
        "n": len(labels),
        "per_class": {
            name: {"recall": float(recall[c]), "precision": float(precision[c]), "f1": float(f1[c]),
                   "auroc": aurocs.get(c, float("nan")), "support": int(support[c])}
            for c, name in enumerate(classnames)
        },
        "confusion_matrix": multiclass_confusion_matrix(scores, labels, k).tolist(),
    }


def binary_auroc_between(scores: torch.Tensor, labels: torch.Tensor, positive: int, negative: int) -> float:
    """AUROC of telling class `positive` from class `negative` among the rows of those two classes, scored by the
    difference of their logits (e.g. melanoma against melanocytic nevus); NaN without rows of both."""
    rows = (labels == positive) | (labels == negative)
    target = (labels[rows] == positive).long()
    if not 0 < int(target.sum()) < len(target):
        return float("nan")
    return float(binary_auroc((scores[rows, positive] - scores[rows, negative]).float(), target))


def zero_shot_figures_with_ci(scores: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str],
                              binary_pairs: dict[str, Sequence[str]] | None = None, n_boot: int = 500,
                              seed: int = 0) -> dict[str, float]:
    """Headline zero-shot figures with percentile bootstrap 95% intervals over the images.

    Returns ``zs_bacc``, ``zs_auroc`` (macro one-vs-rest), ``zs_auroc_<pair>`` for each named pair of classes
    (``{"mel_vs_nv": ["melanoma", "melanocytic nevus"]}``) and each with ``_ci_low``/``_ci_high``, plus
    ``zs_recall/<class>`` per class.
    """
    scores, labels = scores.float().cpu(), labels.long().cpu()
    index = {name: i for i, name in enumerate(classnames)}
    pairs = {}
    for name, (positive, negative) in (binary_pairs or {}).items():
        missing = [c for c in (positive, negative) if c not in index]
        if missing:
            raise ConfigError(f"binary AUROC {name!r}: class(es) {missing} not among {list(classnames)}")
        pairs[name] = (index[positive], index[negative])

    probabilities = scores.softmax(-1)
    k = len(classnames)

    def figures(rows: np.ndarray) -> dict[str, float]:
        s, y = scores[rows], labels[rows]
        support = torch.bincount(y, minlength=k)
        hits = torch.bincount(y[s.argmax(-1) == y], minlength=k)
        present = support > 0
        aurocs = [float(binary_auroc(probabilities[rows][:, c], (y == c).long())) for c in range(k)
                  if 0 < int(support[c]) < len(y)]
        out = {"zs_bacc": float((hits[present] / support[present]).mean()),
               "zs_auroc": float(np.mean(aurocs)) if aurocs else float("nan")}
        out.update({f"zs_auroc_{n}": binary_auroc_between(s, y, p, q) for n, (p, q) in pairs.items()})
        return out

    result = figures(np.arange(len(labels)))
    headline = list(result)
    report = classification_metrics(scores, labels, classnames)
    result.update({f"zs_recall/{name}": v["recall"] for name, v in report["per_class"].items() if v["support"]})
    rng = np.random.default_rng(seed)
    draws = [figures(rng.integers(0, len(labels), len(labels))) for _ in range(n_boot)]
    for key in headline:
        values = np.array([d[key] for d in draws], dtype=float)
        values = values[~np.isnan(values)]
        if values.size:
            result[f"{key}_ci_low"], result[f"{key}_ci_high"] = (float(v) for v in np.percentile(values, [2.5, 97.5]))
    return result


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, float]:
    """Image->text and text->image recall@1/5/10 for paired rows (row i's image goes with row i's text)."""
    raw = get_clip_metrics(image_features.float(), text_features.float(), logit_scale=1.0)
    return {
        f"{short}_r{k}": float(raw[f"{name}_R@{k}"])
        for short, name in (("i2t", "image_to_text"), ("t2i", "text_to_image"))
        for k in (1, 5, 10)
    }
