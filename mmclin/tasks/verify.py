"""Scores of yes/no verify questions asked of every study: per attribute and as the benchmark's macro AUROC.

For a model that ranks "yes" and "no" by likelihood, p("yes") = softmax over the two choices' log-likelihoods is a
score per study and attribute, so each attribute gets an AUROC as a classifier would, beside the balanced accuracy
of the ranked answer. Over the PTB-XL diagnostic superclasses the macro AUROC is the PTB-XL benchmark's metric
(Strodthoff et al., IEEE JBHI 2021). Rows come from :meth:`mmclin.models.MultimodalLM.answer_rows` with
``meta["attribute"]``, ``meta["group"]`` and a study id (``meta["ecg_id"]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from mmclin.tasks.blind import BLIND_VARIANTS


def p_yes(row: dict) -> float | None:
    """p("yes") from the row's choice log-likelihoods (softmax over "yes" and "no"); None without both."""
    scores = row.get("choice_loglik") or {}
    if "yes" not in scores or "no" not in scores:
        return None
    return float(1.0 / (1.0 + np.exp(scores["no"] - scores["yes"])))


def _auroc(truth: np.ndarray, score: np.ndarray) -> float:
    keep = ~np.isnan(score) & ~np.isnan(truth)
    truth, score = truth[keep], score[keep]
    return float(roc_auc_score(truth, score)) if 0 < truth.sum() < len(truth) else float("nan")


def _balanced_accuracy(truth: np.ndarray, said_yes: np.ndarray) -> float:
    recalls = [np.mean(said_yes[truth == v] == v) for v in (0, 1) if (truth == v).any()]
    return float(np.mean(recalls)) if recalls else float("nan")


class VerifyEvaluator:
    """Per attribute: AUROC of p("yes") and balanced accuracy of the likelihood-ranked answer; per group (e.g.
    ``superclass``, ``statement``): their macro averages, with a bootstrap interval over studies for the macro
    AUROC; and, where the rows carry blind predictions (:mod:`mmclin.tasks.blind`), the paired difference of each
    group's macro AUROC to the blind one with its interval.

    Keys: ``{prefix}/{group}_macro_auroc`` (+ ``_ci_low``/``_ci_high``), ``{prefix}/{group}_macro_bacc``,
    ``{prefix}/{group}_macro_auroc_minus_{variant}`` (+ interval), ``{prefix}/auroc/{attribute}`` and
    ``{prefix}/bacc/{attribute}`` for the `shown` groups, ``{prefix}/auroc/{group}/{attribute}`` for the others.
    """

    def __init__(self, shown: Sequence[str] = ("superclass",), study_key: str = "ecg_id", n_boot: int = 1000,
                 seed: int = 0):
        """
        Args:
            shown: groups whose per-attribute figures are named at the top level (printed after a fit).
            study_key: the ``meta`` field that identifies a study; bootstrap resamples studies, not questions.
            n_boot: bootstrap resamples per interval.
            seed: seed of the resampling.
        """
        self.shown, self.study_key, self.n_boot, self.seed = tuple(shown), study_key, n_boot, seed

    def _matrices(self, rows: list[dict], group: str, predictions=None):
        """Studies x attributes matrices of truth, p(yes) and the ranked answer (NaN where not asked)."""
        rows = [r for r in rows if r["meta"].get("group") == group and r["answer"] in ("yes", "no")]
        studies = sorted({r["meta"][self.study_key] for r in rows})
        attributes = sorted({r["meta"]["attribute"] for r in rows})
        s_index = {s: i for i, s in enumerate(studies)}
        a_index = {a: j for j, a in enumerate(attributes)}
        truth, score, said = (np.full((len(studies), len(attributes)), np.nan) for _ in range(3))
        for r in rows:
            prediction = r if predictions is None else (r.get("blind") or {}).get(predictions)
            i, j = s_index[r["meta"][self.study_key]], a_index[r["meta"]["attribute"]]
            truth[i, j] = r["answer"] == "yes"
            if prediction is not None:
                probability = p_yes(prediction)
                score[i, j] = np.nan if probability is None else probability
                said[i, j] = prediction["ranked"] == "yes"
        return attributes, truth, score, said

    def __call__(self, rows: list[dict], prefix: str) -> dict[str, float]:
        metrics: dict[str, float] = {}
        groups = sorted({r["meta"].get("group") for r in rows if r["meta"].get("group")})
        rng = np.random.default_rng(self.seed)
        for group in groups:
            attributes, truth, score, said = self._matrices(rows, group)
            if not attributes:
                continue
            aurocs = [_auroc(truth[:, j], score[:, j]) for j in range(len(attributes))]
            baccs = [_balanced_accuracy(truth[~np.isnan(said[:, j]), j], said[~np.isnan(said[:, j]), j])
                     for j in range(len(attributes))]
            for name, auroc, bacc in zip(attributes, aurocs, baccs):
                name = name.replace("/", "-")  # "st/t change": one level of the metric's name
                where = name if group in self.shown else f"{group}/{name}"
                metrics[f"{prefix}/auroc/{where}"], metrics[f"{prefix}/bacc/{where}"] = auroc, bacc
            if np.isnan(aurocs).all():
                continue
            base = f"{prefix}/{group}_macro_auroc"
            metrics[base] = float(np.nanmean(aurocs))
            metrics[f"{prefix}/{group}_macro_bacc"] = float(np.nanmean(baccs))
            draws = [rng.integers(0, len(truth), len(truth)) for _ in range(self.n_boot)]

            def macro(t, s):
                values = [_auroc(t[:, j], s[:, j]) for j in range(t.shape[1])]
                return np.nan if np.isnan(values).all() else float(np.nanmean(values))

            metrics.update(_interval(base, [macro(truth[d], score[d]) for d in draws]))
            for variant in BLIND_VARIANTS:
                if not any((r.get("blind") or {}).get(variant) for r in rows):
                    continue
                _, _, blind, _ = self._matrices(rows, group, predictions=variant)
                paired = np.where(np.isnan(blind), np.nan, score)  # the questions scored both ways
                name = f"{base}_minus_{variant}"
                metrics[name] = macro(truth, paired) - macro(truth, blind)
                metrics.update(_interval(name, [macro(truth[d], paired[d]) - macro(truth[d], blind[d])
                                                for d in draws]))
        return metrics


def _interval(name: str, values: list[float]) -> dict[str, float]:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if not values.size:
        return {}
    low, high = np.percentile(values, [2.5, 97.5])
    return {f"{name}_ci_low": float(low), f"{name}_ci_high": float(high)}
