"""Before against after: the supervised and the aligned model on the same held-out studies, paired.

For reports: ICDR grade and referral macro-F1 (read back by :mod:`mmclin.tasks.report`'s parsers), the
hallucination rate (the share of generated reports asserting a lesion the reference report does not), BLEU-4
and ROUGE-L. For closed questions: accuracy and macro-F1 of the likelihood-ranked and of the generated answers.
Each difference (after minus before) gets a paired bootstrap interval: the same resampled studies score both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mmclin.metrics.bootstrap import bootstrap_ci
from mmclin.metrics.f1 import coded_f1_scores
from mmclin.tasks.report import (
    GRADE_NAMES,
    REFERRAL_LEVELS,
    ReportEvaluator,
    parse_grade,
    parse_lesions,
    parse_referral,
)

# metric -> True when higher is better (the hallucination rate should fall)
HIGHER_IS_BETTER = {"grade_macro_f1": True, "referral_macro_f1": True, "hallucination_rate": False, "bleu": True,
                    "rouge_l": True, "acc_likelihood": True, "macro_f1_likelihood": True, "acc_generation": True,
                    "macro_f1_generation": True}


def _report_columns(rows: Sequence[dict], truth_from: Sequence[dict]) -> dict[str, np.ndarray]:
    evaluator = ReportEvaluator(n_boot=0)
    grade, referral, hallucinated, rouge, bleu = [], [], [], [], []
    for i, row in enumerate(rows):
        hypothesis, reference, _, _ = ReportEvaluator._truth(i, row)
        grade.append(_code(parse_grade(hypothesis), len(GRADE_NAMES)))
        level = parse_referral(hypothesis)
        referral.append(len(REFERRAL_LEVELS) if level is None else REFERRAL_LEVELS.index(level))
        hallucinated.append(float(bool(parse_lesions(hypothesis) - parse_lesions(reference))))
        rouge.append(evaluator.rouge.score(reference, hypothesis)["rougeL"].fmeasure)
        bleu.append(evaluator._bleu_statistics(hypothesis, reference))
    truth = [ReportEvaluator._truth(i, row)[2:] for i, row in enumerate(truth_from)]
    return {"grade": np.array(grade), "referral": np.array(referral), "hallucinated": np.array(hallucinated),
            "rouge": np.array(rouge), "bleu": np.array(bleu),
            "true_grade": np.array([g for g, _ in truth]),
            "true_referral": np.array([REFERRAL_LEVELS.index(r) for _, r in truth])}


def _code(value: int | None, unparsed: int) -> int:
    return unparsed if value is None else value


def _report_metrics() -> dict[str, Callable[[dict], float]]:
    bleu = ReportEvaluator(n_boot=0)._bleu_from_statistics
    return {
        "grade_macro_f1": lambda c: coded_f1_scores(c["true_grade"], c["grade"], len(GRADE_NAMES))[0],
        "referral_macro_f1": lambda c: coded_f1_scores(c["true_referral"], c["referral"], len(REFERRAL_LEVELS))[0],
        "hallucination_rate": lambda c: float(c["hallucinated"].mean()),
        "bleu": lambda c: bleu(c["bleu"]),
        "rouge_l": lambda c: float(c["rouge"].mean()),
    }


def _qa_columns(rows: Sequence[dict], answers: dict[str, int]) -> dict[str, np.ndarray]:
    code = lambda x: answers.get(x, len(answers))  # noqa: E731  (an answer outside the choices: its own class)
    return {"truth": np.array([code(r["answer"]) for r in rows]), "ranked": np.array([code(r["ranked"]) for r in rows]),
            "parsed": np.array([code(r["parsed"]) for r in rows])}


def _qa_metrics(n: int) -> dict[str, Callable[[dict], float]]:
    return {
        "acc_likelihood": lambda c: float((c["ranked"] == c["truth"]).mean()),
        "macro_f1_likelihood": lambda c: coded_f1_scores(c["truth"], c["ranked"], n)[0],
        "acc_generation": lambda c: float((c["parsed"] == c["truth"]).mean()),
        "macro_f1_generation": lambda c: coded_f1_scores(c["truth"], c["parsed"], n)[0],
    }


def paired_effects(before: Sequence[dict], after: Sequence[dict], n_boot: int = 1000, level: float = 0.95,
                   seed: int = 0) -> dict[str, dict[str, float]]:
    """``{metric: {before, after, delta, delta_ci_low, delta_ci_high}}`` over the same studies in the same order.

    Rows are MultimodalLM prediction rows (``generated``, ``answer``, ``choices``, ``parsed``, ``ranked``,
    ``meta``); closed questions (with choices) and reports (without) are scored by their own metrics.

    Raises:
        ValueError: the two lists are not the same studies in the same order.
    """
    if len(before) != len(after) or any(b["answer"] != a["answer"] or b["question"] != a["question"]
                                         for b, a in zip(before, after)):
        raise ValueError("before and after must score the same studies in the same order")
    closed = [i for i, r in enumerate(after) if r.get("choices")]
    reports = [i for i, r in enumerate(after) if not r.get("choices")]
    groups = []
    if reports:
        pick = lambda rows: [rows[i] for i in reports]  # noqa: E731
        groups.append((_report_columns(pick(before), pick(after)), _report_columns(pick(after), pick(after)),
                       _report_metrics()))
    if closed:
        answers = {a: k for k, a in enumerate(sorted({after[i]["answer"] for i in closed}))}
        pick = lambda rows: [rows[i] for i in closed]  # noqa: E731
        groups.append((_qa_columns(pick(before), answers), _qa_columns(pick(after), answers),
                       _qa_metrics(len(answers))))
    out = {}
    for cols_before, cols_after, metrics in groups:
        names = list(cols_before)
        columns = [cols_before[k] for k in names] + [cols_after[k] for k in names]
        for metric, fn in metrics.items():
            def delta(*cols, fn=fn):
                b, a = dict(zip(names, cols[:len(names)])), dict(zip(names, cols[len(names):]))
                return fn(a) - fn(b)

            low, high = bootstrap_ci(delta, *columns, n_boot=n_boot, level=level, seed=seed)
            b, a = fn(cols_before), fn(cols_after)
            out[metric] = {"before": b, "after": a, "delta": a - b, "delta_ci_low": low, "delta_ci_high": high}
    return out


def effects_table(effects: dict[str, dict[str, float]]) -> str:
    """The effects as aligned text lines, with whether each interval excludes 0 in the good direction."""
    lines = [f"{'metric':22s} {'before':>8s} {'after':>8s} {'delta':>8s}  95% CI (paired)"]
    for name, e in effects.items():
        better = HIGHER_IS_BETTER.get(name, True)
        verdict = ("better" if (e["delta_ci_low"] > 0) == better else "worse") \
            if e["delta_ci_low"] > 0 or e["delta_ci_high"] < 0 else "n.s."
        lines.append(f"{name:22s} {e['before']:8.3f} {e['after']:8.3f} {e['delta']:+8.3f}  "
                     f"[{e['delta_ci_low']:+.3f}, {e['delta_ci_high']:+.3f}] {verdict}")
    return "\n".join(lines)
