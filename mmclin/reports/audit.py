"""Shortcut audit of an injected-error corpus: can surface features alone tell erroneous reports from clean ones?

An injected error must be one a radiologist could make, not one a string match finds (the shortcut check of
error-checking benchmarks: Wu, Kim et al. 2023, arXiv:2312.13103; ReXErr, Rao et al. 2024, arXiv:2409.10829).
Two probes, printed beside every evaluation as the majority answer is for VQA:

- **marker words**: words far more frequent in the reports given an error than in the clean ones (a fixed
  insertion sentence, a replacement word no radiologist writes);
- **a context-free bag-of-words classifier** (scikit-learn: binary word counts, logistic regression) trained on
  the training reports and scored on the test reports, or cross-validated when the records have no splits.
  It sees which words occur, not where: near-chance SIMPLE accuracy means the errors leave no lexical trace.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from mmclin.reports.injection import report_words
from mmclin.reports.scoring import score_checker


def marker_words(records: Sequence[dict], min_reports: int = 5, min_ratio: float = 5.0) -> list[dict]:
    """Words whose share of erroneous reports is at least `min_ratio` times their share of clean ones.

    Args:
        records: injected records (``modified``, ``has_error``).
        min_reports: a marker occurs in at least this many erroneous reports (rarer words are noise).
        min_ratio: ratio of the add-one smoothed document frequencies, erroneous over clean.

    Returns:
        ``[{"word", "n_error", "n_clean", "ratio"}]``, highest ratio first.
    """
    error = [report_words(r["modified"]) for r in records if r["has_error"]]
    clean = [report_words(r["modified"]) for r in records if not r["has_error"]]
    df_error, df_clean = Counter(w for ws in error for w in ws), Counter(w for ws in clean for w in ws)
    out = []
    for word, n in df_error.items():
        ratio = ((n + 1) / (len(error) + 1)) / ((df_clean[word] + 1) / (len(clean) + 1))
        if n >= min_reports and ratio >= min_ratio:
            out.append({"word": word, "n_error": n, "n_clean": df_clean[word], "ratio": round(ratio, 2)})
    return sorted(out, key=lambda m: (-m["ratio"], m["word"]))


def bag_of_words_predictions(train: Sequence[dict], test: Sequence[dict] | None = None, folds: int = 5,
                             seed: int = 0) -> list[dict]:
    """SIMPLE predictions of a bag-of-words logistic regression (scikit-learn), one per test record.

    Args:
        train: records to fit on (``modified``, ``has_error``).
        test: records to predict; None = `folds`-fold cross-validated predictions on `train` itself.
        folds: folds of the cross-validation.
        seed: fold shuffling seed.

    Returns:
        ``[{"id", "has_error"}]`` in the order of `test` (or `train`).
    """
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(CountVectorizer(binary=True, token_pattern=r"(?u)\b[a-zA-Z]+\b"),
                          LogisticRegression(max_iter=2000, C=1.0))
    texts, labels = [r["modified"] for r in train], np.array([bool(r["has_error"]) for r in train])
    if min(labels.sum(), (~labels).sum()) < 2:
        raise ValueError(f"the bag-of-words baseline needs at least 2 erroneous and 2 clean reports to learn from; "
                         f"got {int(labels.sum())} and {int((~labels).sum())}")
    if test is None:
        k = max(2, min(folds, int(labels.sum()), int((~labels).sum())))
        predicted = cross_val_predict(model, texts, labels, cv=StratifiedKFold(k, shuffle=True, random_state=seed))
        rows = train
    else:
        predicted = model.fit(texts, labels).predict([r["modified"] for r in test])
        rows = test
    return [{"id": r["id"], "has_error": bool(p)} for r, p in zip(rows, predicted)]


def per_type_detection(records: Sequence[dict], predictions: Sequence[dict], max_detection: float = 0.8,
                       min_n: int = 5) -> dict:
    """Share of each fine type's erroneous reports that `predictions` flag; types above `max_detection` (with at
    least `min_n` reports) are listed under "above": surface words alone give them away.

    Returns:
        ``{"per_type": {type: {"n", "detected", "rate"}}, "max_detection", "above": [types]}``.
    """
    flagged = {p["id"]: bool(p["has_error"]) for p in predictions}
    per_type: dict[str, dict] = {}
    for r in records:
        if r["has_error"]:
            row = per_type.setdefault(r["fine_type"], {"n": 0, "detected": 0})
            row["n"] += 1
            row["detected"] += flagged[r["id"]]
    for row in per_type.values():
        row["rate"] = row["detected"] / row["n"]
    above = sorted(t for t, row in per_type.items() if row["n"] >= min_n and row["rate"] > max_detection)
    return {"per_type": per_type, "max_detection": max_detection, "above": above}


def audit(records: Sequence[dict], train: Sequence[dict] | None = None, n_boot: int = 1000, seed: int = 0,
          min_reports: int = 5, min_ratio: float = 5.0, max_type_detection: float = 0.8) -> dict:
    """Marker words and the bag-of-words baseline of `records` (see the module docstring).

    Args:
        records: the injected records scored (a test split, or a whole corpus).
        train: records the classifier is fitted on; None = cross-validation on `records`.
        n_boot: bootstrap resamples for the intervals.
        seed: bootstrap and fold seed.
        min_reports: see :func:`marker_words`.
        min_ratio: see :func:`marker_words`.
        max_type_detection: a fine type whose erroneous reports the bag of words finds more often than this is
            flagged (``per_type["above"]``).

    Returns:
        ``{"markers": [...], "bag_of_words": score_checker(...) of its predictions (None when too few reports
        to fit it, with the reason under "skipped"), "per_type": per_type_detection(...), "protocol": str}``.
    """
    result = {"markers": marker_words(records, min_reports, min_ratio), "bag_of_words": None,
              "protocol": f"fit on {len(train)} training reports" if train is not None else "5-fold cross-validation"}
    try:
        predictions = bag_of_words_predictions(train if train is not None else records,
                                               records if train is not None else None, seed=seed)
    except ValueError as err:
        return result | {"skipped": str(err)}
    return result | {"bag_of_words": score_checker(records, predictions, n_boot=n_boot, seed=seed),
                     "per_type": per_type_detection(records, predictions, max_type_detection)}


def audit_lines(result: dict, most: int = 10) -> list[str]:
    """The audit as printed lines: the bag-of-words figures with intervals, then the marker words."""
    if result["bag_of_words"] is None:
        return [f"shortcut audit: bag-of-words baseline not fitted: {result['skipped']}"]
    simple = result["bag_of_words"]["simple"]
    lines = [f"shortcut audit ({result['protocol']}): bag-of-words SIMPLE accuracy "
             f"{simple['accuracy']:.3f} [{simple['accuracy_ci'][0]:.3f}, {simple['accuracy_ci'][1]:.3f}] "
             f"(chance ~0.5)"]
    image = simple.get("image_dependent")
    if image:
        low, high = image["balanced_accuracy_ci"]
        lines.append(f"  bag-of-words image-dependent balanced accuracy {image['balanced_accuracy']:.3f} "
                     f"[{low:.3f}, {high:.3f}]")
    per_type = result.get("per_type")
    if per_type:
        rows = sorted(per_type["per_type"].items(), key=lambda kv: -kv[1]["rate"])
        lines.append("  bag-of-words detection per type: " + ", ".join(
            f"{t} {row['rate']:.2f} ({row['detected']}/{row['n']})" for t, row in rows))
        lines.append(f"  types above {per_type['max_detection']:g}: " + (
            "WORD-LEVEL GIVE-AWAY: " + ", ".join(per_type["above"]) if per_type["above"] else "none"))
    markers = result["markers"]
    lines.append(f"  marker words: {len(markers)}" + (": " + ", ".join(
        f"{m['word']} ({m['n_error']} vs {m['n_clean']})" for m in markers[:most]) if markers else " (none)"))
    return lines
