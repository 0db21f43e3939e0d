"""Scores of a report error checker at the two levels of Wu, Kim et al. 2023 (arXiv:2312.13103).

SIMPLE: is there an error? Accuracy, F1 (error = positive class), precision, sensitivity (recall of erroneous
reports) and specificity (recall of clean reports), plus the sensitivity per true error type. ``image_dependent``
scores the same question on the clean reports and those with an error of IMAGE_DEPENDENT_TYPES only (errors the
image can show when the text agrees with itself): sensitivity, balanced accuracy ((sensitivity + specificity) / 2,
so flagging every report scores 0.5) and F1.

COMPLEX: which error? A report's class is its error type, or "none" for a clean report, at the coarse level
(none / insert / remove / substitute) and at the fine level (none + FINE_TYPES). ``macro_f1`` averages the
per-class F1 over every report and over the classes that occur in the truth or the predictions, "none"
included, so that calling a clean report erroneous costs as it does in the paper's prompt ("no error" is an
answer). ``macro_f1_errors`` is the mean F1 over the true error types, scored on the erroneous reports only
(the type question asked where there is an error to type). A prediction that flags an error but names no
type is the class "unspecified".

Headline numbers come with percentile bootstrap confidence intervals over reports. Two checkers on the same
reports are compared by :func:`image_dependent_difference`: a paired bootstrap (both resampled with the same
reports) of the difference in their image-dependent scores.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_f1_score,
    binary_precision,
    binary_recall,
    binary_specificity,
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from mmclin.metrics.bootstrap import bootstrap_ci
from mmclin.plots import plot_confusion_matrix
from mmclin.reports.injection import COARSE_TYPES, FINE_TYPES, IMAGE_DEPENDENT_TYPES

NONE = "none"
UNSPECIFIED = "unspecified"


def _predicted_types(pred: dict, where: str) -> tuple[str, str]:
    """(coarse, fine) class of a prediction; a fine type implies its coarse type."""
    if not pred.get("has_error"):
        return NONE, NONE
    fine, coarse = pred.get("fine_type"), pred.get("coarse_type")
    if fine is not None and fine not in FINE_TYPES:
        raise ValueError(f"{where}: unknown fine_type {fine!r}; expected one of {list(FINE_TYPES)} or None")
    if coarse is not None and coarse not in COARSE_TYPES:
        raise ValueError(f"{where}: unknown coarse_type {coarse!r}; expected one of {list(COARSE_TYPES)} or None")
    if fine is not None and coarse is not None and FINE_TYPES[fine] != coarse:
        raise ValueError(f"{where}: fine_type {fine!r} is a {FINE_TYPES[fine]!r} error, not {coarse!r}")
    return coarse or (FINE_TYPES[fine] if fine else UNSPECIFIED), fine or UNSPECIFIED


def _image_dependent_case(record: dict) -> bool:
    """A clean report, or one whose error is of IMAGE_DEPENDENT_TYPES: the reports the image-dependent scores use."""
    return not record["has_error"] or record["fine_type"] in IMAGE_DEPENDENT_TYPES


def _binary(name: str):
    fn = {"accuracy": binary_accuracy, "f1": binary_f1_score, "precision": binary_precision,
          "sensitivity": binary_recall, "specificity": binary_specificity}[name]

    def metric(truth: np.ndarray, pred: np.ndarray) -> float:
        if name == "sensitivity" and not truth.any() or name == "specificity" and truth.all():
            return float("nan")  # undefined on a resample without erroneous (clean) reports
        return float(fn(torch.as_tensor(pred.astype(np.int64)), torch.as_tensor(truth.astype(np.int64))))
    return metric


def _balanced_accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    return (_binary("sensitivity")(truth, pred) + _binary("specificity")(truth, pred)) / 2


def _macro_f1(k: int):
    def metric(truth: np.ndarray, pred: np.ndarray) -> float:
        return float(multiclass_f1_score(torch.as_tensor(pred.astype(np.int64)),
                                         torch.as_tensor(truth.astype(np.int64)), num_classes=k, average="macro"))
    return metric


def _complex(truth: list[str], pred: list[str], classes: list[str], n_boot: int, level: float, seed: int) -> dict:
    k = len(classes)
    t = torch.tensor([classes.index(c) for c in truth])
    p = torch.tensor([classes.index(c) for c in pred])
    f1 = multiclass_f1_score(p, t, num_classes=k, average=None)
    precision = multiclass_precision(p, t, num_classes=k, average=None)
    recall = multiclass_recall(p, t, num_classes=k, average=None)
    support = torch.bincount(t, minlength=k)
    predicted = torch.bincount(p, minlength=k)
    per_type = {c: {"f1": float(f1[i]), "precision": float(precision[i]), "recall": float(recall[i]),
                    "support": int(support[i]), "predicted": int(predicted[i])}
                for i, c in enumerate(classes) if support[i] or predicted[i]}
    erroneous = t != classes.index(NONE)
    error_types = [i for i in range(k) if support[i] and i != classes.index(NONE)]
    if erroneous.any():
        f1_err = multiclass_f1_score(p[erroneous], t[erroneous], num_classes=k, average=None)
        macro_f1_errors = float(f1_err[error_types].mean())
        type_accuracy = float(multiclass_accuracy(p[erroneous], t[erroneous], num_classes=k, average="micro"))
    else:
        macro_f1_errors = type_accuracy = float("nan")
    macro = _macro_f1(k)
    return {
        "classes": classes,
        "macro_f1": macro(t.numpy(), p.numpy()),
        "macro_f1_ci": list(bootstrap_ci(macro, t.numpy(), p.numpy(), n_boot=n_boot, level=level, seed=seed)),
        "macro_f1_errors": macro_f1_errors,
        "type_accuracy_errors": type_accuracy,
        "per_type": per_type,
        "confusion_matrix": multiclass_confusion_matrix(p, t, num_classes=k).tolist(),
    }


def score_checker(records: Sequence[dict], predictions: Sequence[dict], n_boot: int = 1000, level: float = 0.95,
                  seed: int = 0) -> dict:
    """SIMPLE and COMPLEX scores of `predictions` against the injected `records` (see the module docstring).

    Args:
        records: dicts with id, has_error, coarse_type, fine_type (``inject_corpus`` / errors.jsonl rows); with
            ``errors`` (several per report), naming any one of their types is the right type.
        predictions: dicts with id, has_error and optionally coarse_type / fine_type; one per record.
        n_boot: bootstrap resamples for the confidence intervals.
        level: coverage of the intervals.
        seed: bootstrap seed.

    Returns:
        ``{"n", "n_error", "n_clean", "simple": {...}, "complex_coarse": {...}, "complex_fine": {...}}``;
        every interval is ``[low, high]`` under the metric's name + ``_ci``.
    """
    by_id = {}
    for i, p in enumerate(predictions):
        if "id" not in p:
            raise ValueError(f"prediction {i} has no id")
        if p["id"] in by_id:
            raise ValueError(f"prediction {i}: id {p['id']!r} given twice")
        by_id[p["id"]] = p
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("record ids repeat; each report needs its own id to be matched with its prediction")
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} record(s), e.g. ids {missing[:5]}")
    if not records:
        raise ValueError("no records to score")

    truth_bin = np.array([bool(r["has_error"]) for r in records])
    pred_bin = np.array([bool(by_id[i].get("has_error")) for i in ids])
    pred_coarse, pred_fine = zip(*(_predicted_types(by_id[i], f"prediction for id {i!r}") for i in ids))
    # A report with several errors (``errors``): a predicted type that is one of them is the right type.
    truth_coarse, truth_fine = [], []
    for r, pc, pf in zip(records, pred_coarse, pred_fine):
        errors = r.get("errors") or []
        truth_coarse.append(NONE if not r["has_error"] else pc if pc in {e["coarse_type"] for e in errors}
                            else r["coarse_type"])
        truth_fine.append(NONE if not r["has_error"] else pf if pf in {e["fine_type"] for e in errors}
                          else r["fine_type"])

    def with_intervals(metrics, truth: np.ndarray, pred: np.ndarray) -> dict:
        out = {}
        for name, metric in metrics:
            out[name] = metric(truth, pred)
            out[f"{name}_ci"] = list(bootstrap_ci(metric, truth, pred, n_boot=n_boot, level=level, seed=seed))
        return out

    simple = with_intervals([(name, _binary(name)) for name in ("accuracy", "f1", "precision", "sensitivity",
                                                                 "specificity")], truth_bin, pred_bin)
    simple["classes"] = ["no error", "error"]
    simple["confusion_matrix"] = [[int((~truth_bin & ~pred_bin).sum()), int((~truth_bin & pred_bin).sum())],
                                  [int((truth_bin & ~pred_bin).sum()), int((truth_bin & pred_bin).sum())]]
    for level_name, truth in (("coarse", truth_coarse), ("fine", truth_fine)):
        detected = {}
        for c in dict.fromkeys(t for t in truth if t != NONE):
            hits = pred_bin[[t == c for t in truth]]
            detected[c] = {"n": int(hits.size), "detected": int(hits.sum()), "sensitivity": float(hits.mean())}
        simple[f"sensitivity_by_{level_name}_type"] = detected
    subset = np.array([_image_dependent_case(r) for r in records])
    truth_image, pred_image = truth_bin[subset], pred_bin[subset]
    if truth_image.any() and not truth_image.all():
        simple["image_dependent"] = {
            "n_error": int(truth_image.sum()), "types": list(IMAGE_DEPENDENT_TYPES),
            **with_intervals([("sensitivity", _binary("sensitivity")), ("balanced_accuracy", _balanced_accuracy),
                              ("f1", _binary("f1"))], truth_image, pred_image)}

    def classes(names, pred):
        return [NONE, *names] + ([UNSPECIFIED] if UNSPECIFIED in pred else [])

    return {
        "n": len(records), "n_error": int(truth_bin.sum()), "n_clean": int((~truth_bin).sum()),
        "ci_level": level, "n_boot": n_boot,
        "simple": simple,
        "complex_coarse": _complex(truth_coarse, list(pred_coarse), classes(COARSE_TYPES, pred_coarse), n_boot,
                                   level, seed),
        "complex_fine": _complex(truth_fine, list(pred_fine), classes(FINE_TYPES, pred_fine), n_boot, level, seed),
    }


def image_dependent_difference(records: Sequence[dict], reference: Sequence[dict], other: Sequence[dict],
                               n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """``other`` minus ``reference`` in image-dependent balanced accuracy and F1, with paired bootstrap intervals.

    Args:
        records: the injected records both checkers were run on.
        reference: predictions of the reference checker (dicts with id and has_error), one per record.
        other: predictions of the compared checker, likewise.
        n_boot: bootstrap resamples of the reports; each resample scores both checkers on the same reports.
        level: coverage of the intervals.
        seed: bootstrap seed.

    Returns:
        ``{"balanced_accuracy": d, "balanced_accuracy_ci": [low, high], "f1": d, "f1_ci": [...]}``; an interval
        above 0 means ``other`` does better on these reports beyond resampling noise. Empty when the records hold
        no image-dependent error or no clean report.
    """
    subset = [r for r in records if _image_dependent_case(r)]
    truth = np.array([bool(r["has_error"]) for r in subset])
    if not truth.any() or truth.all():
        return {}
    columns = []
    for name, predictions in (("reference", reference), ("other", other)):
        by_id = {p["id"]: bool(p.get("has_error")) for p in predictions}
        missing = [r["id"] for r in subset if r["id"] not in by_id]
        if missing:
            raise ValueError(f"{name} checker: no prediction for {len(missing)} record(s), e.g. ids {missing[:5]}")
        columns.append(np.array([by_id[r["id"]] for r in subset]))
    out = {}
    for name, metric in (("balanced_accuracy", _balanced_accuracy), ("f1", _binary("f1"))):
        def difference(t, a, b, metric=metric):
            return metric(t, b) - metric(t, a)
        out[name] = difference(truth, *columns)
        out[f"{name}_ci"] = list(bootstrap_ci(difference, truth, *columns, n_boot=n_boot, level=level, seed=seed))
    return out


def _rate(flags: np.ndarray) -> float:
    return float(flags.mean()) if flags.size else float("nan")


def clean_version_scores(records: Sequence[dict], predictions: Sequence[dict], on_originals: Sequence[dict],
                         n_boot: int = 1000, level: float = 0.95, seed: int = 0, longest: float = 0.1) -> dict:
    """What a checker says of every report's clean version, and what it finds beyond it.

    A checker that flags a report's original already (a false alarm on real phrasing) gets no credit for
    "detecting" the error injected into it: ``beyond_clean`` scores detection on the erroneous reports whose
    original passes, overall and per fine type.

    Args:
        records: injected records (``original``, ``modified``, ``has_error``, ``fine_type``).
        predictions: the checker's predictions on the modified reports, one per record, in order.
        on_originals: its predictions on the originals, one per record, in order.
        n_boot, level, seed: bootstrap of the intervals.
        longest: the share of longest originals (characters) scored apart: false alarms gather in long reports.

    Returns:
        ``{"clean_flagged", "clean_flagged_ci", "longest": {"min_chars", "n", "clean_flagged", ...},
        "beyond_clean": {"n", "sensitivity", "sensitivity_ci", "per_type": {type: {"n", "detected",
        "sensitivity"}}}}``.
    """
    flagged = np.array([bool(p.get("has_error")) for p in on_originals])
    detected = np.array([bool(p.get("has_error")) for p in predictions])
    lengths = np.array([len(r["original"]) for r in records])
    cut = float(np.quantile(lengths, 1 - longest)) if len(lengths) else 0.0
    top = lengths >= cut

    def rate_with_ci(values: np.ndarray) -> tuple[float, list[float]]:
        if not values.size:
            return float("nan"), [float("nan"), float("nan")]
        return _rate(values), list(bootstrap_ci(_rate, values, n_boot=n_boot, level=level, seed=seed))

    out = {"n": len(records)}
    out["clean_flagged"], out["clean_flagged_ci"] = rate_with_ci(flagged)
    out["longest"] = {"share": longest, "min_chars": int(cut), "n": int(top.sum())}
    out["longest"]["clean_flagged"], out["longest"]["clean_flagged_ci"] = rate_with_ci(flagged[top])
    erroneous = np.array([bool(r["has_error"]) for r in records]) & ~flagged
    beyond = {"n": int(erroneous.sum())}
    beyond["sensitivity"], beyond["sensitivity_ci"] = rate_with_ci(detected[erroneous])
    types = np.array([r.get("fine_type") or "" for r in records])
    beyond["per_type"] = {t: {"n": int((erroneous & (types == t)).sum()),
                              "detected": int((detected & erroneous & (types == t)).sum()),
                              "sensitivity": _rate(detected[erroneous & (types == t)])}
                          for t in FINE_TYPES if (erroneous & (types == t)).any()}
    return out | {"beyond_clean": beyond}


def write_confusion_matrices(scores: dict, out_dir: str | os.PathLike, prefix: str = "confusion") -> list[Path]:
    """PNG confusion matrices (rows = truth) of `score_checker` output: ``{prefix}_simple.png``,
    ``{prefix}_coarse.png`` and ``{prefix}_fine.png``. Fine classes absent from truth and predictions are
    left out so the figure stays readable."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    simple = scores["simple"]
    paths = [out / f"{prefix}_simple.png"]
    plot_confusion_matrix(simple["confusion_matrix"], simple["classes"], paths[0],
                          title=f"SIMPLE, n={scores['n']}, acc {simple['accuracy']:.3f}, F1 {simple['f1']:.3f}")
    for level in ("coarse", "fine"):
        block = scores[f"complex_{level}"]
        matrix = np.asarray(block["confusion_matrix"])
        keep = [i for i in range(len(block["classes"])) if matrix[i].sum() or matrix[:, i].sum()]
        path = out / f"{prefix}_{level}.png"
        plot_confusion_matrix(matrix[np.ix_(keep, keep)], [block["classes"][i] for i in keep], path,
                              title=f"COMPLEX {level}, macro-F1 {block['macro_f1']:.3f}")
        paths.append(path)
    return paths


class CheckerEvaluator:
    """Checker scores of a MultimodalLM trained to answer ``error: no`` / ``error: yes; type: X`` (the
    ``evaluator`` of ``configs/cxr-error-check.yaml``), from its prediction rows: for the likelihood-ranked and the
    generated answer, SIMPLE accuracy, image-dependent balanced accuracy (clean reports against those with an
    error only the image shows, `IMAGE_DEPENDENT_TYPES`) and fine macro-F1, with bootstrap intervals, as
    ``{prefix}/simple_acc_likelihood``, ``{prefix}/image_dependent_bacc_likelihood`` (``_ci_low`` / ``_ci_high``)..."""

    def __init__(self, n_boot: int = 1000, level: float = 0.95, seed: int = 0):
        """
        Args:
            n_boot: bootstrap resamples per interval.
            level: coverage of the intervals.
            seed: seed of the resampling.
        """
        self.n_boot, self.level, self.seed = n_boot, level, seed

    def __call__(self, rows: Sequence[dict], prefix: str) -> dict[str, float]:
        from mmclin.reports.qa import parse_error_answer

        records = [{"id": str(i), "has_error": bool(r["meta"]["has_error"]), "fine_type": r["meta"]["fine_type"],
                    "coarse_type": r["meta"].get("coarse_type")} for i, r in enumerate(rows)]
        if not records:
            return {}
        out = {}
        for path, key in (("likelihood", "ranked"), ("generation", "parsed")):
            predictions = [{"id": str(i), **parse_error_answer(r[key])} for i, r in enumerate(rows)]
            scores = score_checker(records, predictions, n_boot=self.n_boot, level=self.level, seed=self.seed)
            figures = {"simple_acc": (scores["simple"], "accuracy"),
                       "complex_fine_macro_f1": (scores["complex_fine"], "macro_f1")}
            if "image_dependent" in scores["simple"]:
                figures["image_dependent_bacc"] = (scores["simple"]["image_dependent"], "balanced_accuracy")
            for name, (block, metric) in figures.items():
                out[f"{prefix}/{name}_{path}"] = float(block[metric])
                low, high = block[f"{metric}_ci"]
                out[f"{prefix}/{name}_{path}_ci_low"], out[f"{prefix}/{name}_{path}_ci_high"] = float(low), float(high)
        return out
