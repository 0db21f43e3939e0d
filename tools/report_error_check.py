"""Radiology report error-checking: inject synthetic errors into a report corpus, then score a checker on it.

The SIMPLE (is there an error?) and COMPLEX (which type?) levels and the insert / remove / substitute types are
those of Wu, Kim et al. 2023, "Exploring Multimodal Large Language Models for Radiology Report Error-checking"
(arXiv:2312.13103); the fine types are listed in mmclin/reports/injection.py.

``inject`` writes ``errors.jsonl`` (one report per line: id, original, modified, has_error, coarse_type,
fine_type, span, ...) and ``summary.json`` (errors injected and "no site" counts per type, reports skipped).
``evaluate`` writes ``metrics.json``, ``predictions.jsonl`` and ``confusion_{simple,coarse,fine}.png``. The checkers
read English reports only: a report that is not English (:func:`mmclin.reports.language.non_english_reason`) stops
``evaluate`` with its id, or with ``--on-non-english skip`` is left out of every checker's scores and counted
(``n_refused`` and ``refused`` in metrics.json).

Examples:
    python tools/report_error_check.py inject --reports iu_xray/indiana_reports.csv --format iu-csv \
        --error-rate 0.5 --seed 0 --out runs/errcheck-iu
    python tools/report_error_check.py inject --reports mimic-cxr-reports --format mimic --on-error skip \
        --split test --out runs/errcheck-mimic
    python tools/report_error_check.py evaluate --data runs/errcheck-iu --checker rule --out runs/errcheck-iu/rule
    python tools/report_error_check.py evaluate --data runs/errcheck-iu --checker ckpt:runs/checker/last.ckpt \
        --out runs/errcheck-iu/model
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from datamodules.reports import FORMATS, read_reports
from mmclin.errors import CheckpointError, ConfigError, DataError, run_entry_point
from mmclin.reports.audit import audit, audit_lines
from mmclin.reports.injection import FINE_TYPES, corpus_summary, inject_corpus
from mmclin.reports.language import non_english_reason
from mmclin.reports.rules import RuleChecker
from mmclin.reports.scoring import (
    clean_version_scores,
    image_dependent_difference,
    score_checker,
    write_confusion_matrices,
)

# The trained checker a checkpoint without a recorded class (no LightningCLI "_class_path") is taken to be.
DEFAULT_CHECKER_CLASS = "mmclin.models.report_checker.ReportChecker"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    inj = sub.add_parser("inject", help="write errors.jsonl: reports with and without one synthetic error")
    inj.add_argument("--reports", required=True, help="indiana_reports.csv | annotation.json (or their folder) | "
                                                      "MIMIC reports root (holding files/)")
    inj.add_argument("--format", required=True, choices=FORMATS)
    inj.add_argument("--image-root", default=None, help="image folder; given, every report's images must exist")
    inj.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="bad reports: stop or skip")
    inj.add_argument("--split", default=None, help="keep only this split (train / val / test)")
    inj.add_argument("--limit", type=int, default=None, help="use the first N reports read")
    inj.add_argument("--error-rate", type=float, default=0.5, help="share of reports given an error")
    inj.add_argument("--max-errors-per-report", type=int, default=1, metavar="K",
                     help="a report given errors gets 1 to K of different types (ReXErr samples up to 3); its "
                          "fine_type is the first one's, errors lists all")
    inj.add_argument("--types", nargs="+", default=None, choices=list(FINE_TYPES), help="fine types (default all)")
    inj.add_argument("--seed", type=int, default=0)
    inj.add_argument("--out", required=True, help="output directory")
    au = sub.add_parser("audit", help="shortcut audit: marker words and a bag-of-words baseline on errors.jsonl")
    au.add_argument("--data", required=True, help="errors.jsonl or the folder holding it")
    au.add_argument("--train", default=None, help="errors.jsonl to fit the bag-of-words classifier on (default: "
                                                   "the data's own train split when it has one, else 5-fold "
                                                   "cross-validation)")
    au.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    au.add_argument("--seed", type=int, default=0)
    au.add_argument("--out", default=None, help="folder for audit.json (default: beside the data)")
    ev = sub.add_parser("evaluate", help="run a checker on errors.jsonl and score it")
    ev.add_argument("--data", required=True, help="errors.jsonl or the folder holding it")
    ev.add_argument("--checker", required=True, nargs="+",
                    help="'rule' or 'ckpt:PATH' (a Lightning checkpoint); several are scored on the same reports, each "
                         "into its own folder of --out, and compared side by side")
    ev.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    ev.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ev.add_argument("--on-non-english", choices=["error", "skip"], default="error",
                    help="a report not in English: stop naming it, or leave it unchecked (counted in metrics.json)")
    ev.add_argument("--out", required=True, help="output directory")
    return p.parse_args(argv)


def _finite(obj):
    """NaN (an undefined metric) -> None, so the JSON is standard."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    path = path / "errors.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"{path}: not found (write it with `report_error_check.py inject`)")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {i}: not JSON ({err})") from err
            missing = [k for k in ("id", "modified", "has_error", "coarse_type", "fine_type") if k not in rows[-1]]
            if missing:
                raise DataError(f"{path} line {i}: missing key(s) {missing}")
    return rows


# ------------------------------------------------------------------------------------------------ checkers


def load_checker(spec: str) -> Callable[[list[dict]], list[dict]]:
    """A checker: maps ``[{"id", "modified", "text", "images"}]`` (the report to check under both ``modified``
    and ``text``, never its label) to ``[{"has_error", "coarse_type", "fine_type", ...}]`` in the same order
    (an ``id`` in a prediction, when given, must be its record's).

    Args:
        spec: ``rule`` (RuleChecker, its typo vocabulary widened by the words of the reports it checks that occur
            in 3 or more of them: labels are never read) or ``ckpt:PATH``: a Lightning checkpoint whose module has
            ``predict_reports(records) -> list[dict]`` (the trained ``mmclin.models.report_checker.ReportChecker``),
            or a ``MultimodalLM`` trained by ``configs/cxr-error-check.yaml`` (image + report).
    """
    if spec == "rule":
        def check(records: list[dict]) -> list[dict]:
            checker = RuleChecker(corpus=[r["text"] for r in records])
            return [{"id": r["id"], **checker.check(r["text"])}
                    for r in tqdm(records, desc="rule checker", unit="report")]
        return check
    if spec.startswith("ckpt:"):
        path = Path(spec[len("ckpt:"):])
        from mmclin.checkpoints import load_module  # only here: `evaluate --checker rule` starts without Lightning

        module, data = load_module(path, default_class=DEFAULT_CHECKER_CLASS)
        predict = getattr(module, "predict_reports", None)
        if predict is None and hasattr(module, "rank_choices"):  # a MultimodalLM trained on image + report QA
            from mmclin.reports.mllm_checker import MultimodalReportChecker

            return MultimodalReportChecker(module, image_size=data.get("image_size"),
                                           error_types=data.get("error_types"))
        if not callable(predict):
            raise CheckpointError(f"{path}: {type(module).__module__}.{type(module).__qualname__} has no "
                            "predict_reports(records) method, so it cannot check reports; expected a report checker "
                            f"such as {DEFAULT_CHECKER_CLASS}")
        return predict
    raise ConfigError(f"--checker {spec!r}: unknown; use 'rule' or 'ckpt:PATH'")


# -------------------------------------------------------------------------------------------------- commands


def inject_main(args: argparse.Namespace) -> dict:
    result = read_reports(args.reports, args.format, image_root=args.image_root, on_error=args.on_error,
                          split=args.split)
    reports = result.reports[:args.limit] if args.limit is not None else result.reports
    if not reports:
        raise DataError(f"{args.reports}: no reports to inject errors into"
                        + (f" in split {args.split!r}" if args.split else ""))
    records = inject_corpus(reports, error_rate=args.error_rate, seed=args.seed, types=args.types, progress=True,
                            max_errors_per_report=args.max_errors_per_report)
    summary = corpus_summary(records)
    summary.update(source=str(args.reports), format=args.format, error_rate=args.error_rate, seed=args.seed,
                   max_errors_per_report=args.max_errors_per_report,
                   n_skipped_reports=len(result.skipped),
                   skipped_reports=[{"where": w, "why": y} for w, y in result.skipped])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "errors.jsonl", records)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    print(f"{args.reports}: {len(reports)} reports ({len(result.skipped)} skipped while reading), "
          f"{summary['n_with_error']} with an error, {summary['n_clean']} clean "
          f"({summary['n_without_any_site']} of them had no site for any type)")
    print(f"  {'fine type':<22}{'coarse':<12}{'injected':>9}{'no site':>9}")
    for name, row in summary["per_type"].items():
        print(f"  {name:<22}{row['coarse_type']:<12}{row['injected']:>9}{row['no_site']:>9}")
    print(f"wrote {out}/errors.jsonl, summary.json")
    return summary


def audit_main(args: argparse.Namespace) -> dict:
    """Marker words and the bag-of-words baseline; scored on the test split when the records carry splits."""
    records, train = read_jsonl(args.data), None
    if args.train is not None:
        train = read_jsonl(args.train)
    elif {r.get("split") for r in records} >= {"train", "test"}:
        train = [r for r in records if r.get("split") == "train"]
        records = [r for r in records if r.get("split") == "test"]
    result = audit(records, train, n_boot=args.n_boot, seed=args.seed)
    data = Path(args.data)
    out = Path(args.out) if args.out else (data if data.is_dir() else data.parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(_finite(result), indent=2))
    print(f"{args.data}: {len(records)} reports audited ({sum(bool(r['has_error']) for r in records)} with an error)")
    print("\n".join(audit_lines(result)))
    print(f"wrote {out}/audit.json")
    return result


def _ci(block: dict, name: str) -> str:
    low, high = block[f"{name}_ci"]
    return f"{block[name]:.3f} [{low:.3f}, {high:.3f}]"


def evaluate_main(args: argparse.Namespace) -> dict:
    """Score each checker; with several, also a side-by-side table (comparison.md / comparison.json in --out)
    with the last checker's paired difference to each other one on the image-dependent error types."""
    specs = [args.checker] if isinstance(args.checker, str) else list(args.checker)
    checkers = {spec: load_checker(spec) for spec in specs}  # a bad checkpoint stops before any scoring
    records, args.refused = english_records(read_jsonl(args.data), args.data, args.on_non_english)
    shortcut = audit(records, n_boot=args.n_boot, seed=args.seed)  # what surface words alone score here
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "audit.json").write_text(json.dumps(_finite(shortcut), indent=2))
    print("\n".join(audit_lines(shortcut)))
    if len(specs) == 1:
        return evaluate_one(args, records, specs[0], checkers[specs[0]], Path(args.out))[0]
    runs, predictions = {}, {}
    for i, spec in enumerate(specs):
        label = spec if spec == "rule" else f"{i}-{Path(spec.partition(':')[2]).stem}"
        out = Path(args.out) / re.sub(r"[^\w.-]+", "_", label)
        runs[spec], predictions[spec] = evaluate_one(args, records, spec, checkers[spec], out)
    for spec in specs[:-1]:  # the last checker (the one under test) against each other one, on the same reports
        runs[spec]["last_minus_this"] = _finite(image_dependent_difference(
            records, predictions[spec], predictions[specs[-1]], n_boot=args.n_boot, seed=args.seed))
    table = comparison_table(runs)
    print(table)
    Path(args.out, "comparison.md").write_text(table + "\n")
    Path(args.out, "comparison.json").write_text(json.dumps(runs, indent=2))
    return runs


def english_records(records: list[dict], source: str, on_non_english: str = "error") -> tuple[list[dict], list[dict]]:
    """The records whose report (``modified``) is English, and ``[{"id", "why"}]`` of those left out.

    Raises:
        DataError: no records, none left, or a report not in English with ``on_non_english="error"``.
    """
    if not records:
        raise DataError(f"{source}: no reports")
    kept, refused = [], []
    for record in records:
        reason = non_english_reason(record["modified"])
        if reason and on_non_english != "skip":
            raise DataError(f"{source}: report {record['id']}: {reason}; the checkers read English reports only "
                            "(--on-non-english skip leaves such reports out, counted)")
        if reason:
            refused.append({"id": record["id"], "why": reason})
        else:
            kept.append(record)
    if refused:
        print(f"{len(refused)} of {len(records)} reports not in English left out of every checker's scores "
              f"(--on-non-english skip), e.g. {refused[0]['id']}: {refused[0]['why']}")
    if not kept:
        raise DataError(f"{source}: none of the {len(records)} reports is in English")
    return kept, refused


def comparison_table(runs: dict[str, dict]) -> str:
    """Markdown: one column per checker; SIMPLE and COMPLEX figures, the detection rate of each true type, and the
    last checker's paired difference to each column on the image-dependent types (``last_minus_this``)."""
    names = list(runs)
    first = runs[names[0]]
    rows = [("SIMPLE accuracy", lambda m: m["simple"]["accuracy"]), ("SIMPLE F1", lambda m: m["simple"]["f1"]),
            ("SIMPLE sensitivity", lambda m: m["simple"]["sensitivity"]),
            ("SIMPLE specificity", lambda m: m["simple"]["specificity"]),
            ("COMPLEX fine macro-F1", lambda m: m["complex_fine"]["macro_f1"]),
            ("image-dependent types: sensitivity", lambda m: m["simple"]["image_dependent"]["sensitivity"]),
            ("image-dependent types: balanced accuracy",
             lambda m: m["simple"]["image_dependent"]["balanced_accuracy"]),
            ("image-dependent types: F1", lambda m: m["simple"]["image_dependent"]["f1"])]
    rows += [(f"detected: {t}", lambda m, t=t: m["simple"]["sensitivity_by_fine_type"][t]["sensitivity"])
             for t in first["simple"]["sensitivity_by_fine_type"]]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, get in rows:
        cells = []
        for name in names:
            try:
                cells.append(f"{float(get(runs[name])):.3f}")
            except (KeyError, TypeError, ValueError):
                cells.append("")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for metric, label in (("balanced_accuracy", "balanced accuracy"), ("f1", "F1")):
        cells = []
        for name in names:
            difference = runs[name].get("last_minus_this", {})
            value, (low, high) = difference.get(metric), difference.get(f"{metric}_ci", (None, None))
            cells.append("" if None in (value, low, high) else f"{value:+.3f} [{low:+.3f}, {high:+.3f}]")
        lines.append(f"| image-dependent {label}: last column minus this (paired 95% CI) | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def _check(checker: Callable[[list[dict]], list[dict]], spec: str, records: list[dict], field: str) -> list[dict]:
    """The checker's predictions on each record's `field` text ("modified", or "original": its clean version)."""
    predictions = checker([{"id": r["id"], "modified": r[field], "text": r[field], "images": r.get("images", [])}
                           for r in records])
    if not isinstance(predictions, list) or len(predictions) != len(records):
        raise ValueError(f"checker {spec!r} returned {len(predictions)} predictions for {len(records)} "
                         "reports")
    for i, (record, prediction) in enumerate(zip(records, predictions)):
        if prediction.setdefault("id", record["id"]) != record["id"]:
            raise ValueError(f"checker {spec!r}: prediction {i} is for id {prediction['id']!r}, "
                             f"record {i} is {record['id']!r}")
    return predictions


def evaluate_one(args: argparse.Namespace, records: list[dict], spec: str,
                 checker: Callable[[list[dict]], list[dict]], out: Path) -> tuple[dict, list[dict]]:
    """Run `checker` (loaded from `spec`) on `records` (read from ``args.data``), write its metrics, predictions and
    plots to `out` and print them; returns the metrics and the predictions."""
    predictions = _check(checker, spec, records, "modified")
    scores = score_checker(records, predictions, n_boot=args.n_boot, seed=args.seed)
    if all("original" in r for r in records):  # errors.jsonl of `inject` has them; hand-made records may not
        scores["clean_versions"] = clean_version_scores(records, predictions, _check(checker, spec, records,
                                                                                     "original"),
                                                        n_boot=args.n_boot, seed=args.seed)
    out.mkdir(parents=True, exist_ok=True)
    truth = {r["id"]: r for r in records}
    _write_jsonl(out / "predictions.jsonl", [
        {**p, "true_has_error": truth[p["id"]]["has_error"], "true_coarse_type": truth[p["id"]]["coarse_type"],
         "true_fine_type": truth[p["id"]]["fine_type"]} for p in predictions])
    write_confusion_matrices(scores, out)
    refused = getattr(args, "refused", [])
    metrics = _finite({**scores, "checker": spec, "data": str(args.data), "n_refused": len(refused),
                       "refused": refused})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    s, c, f = scores["simple"], scores["complex_coarse"], scores["complex_fine"]
    print(f"{args.data}: n={scores['n']} ({scores['n_error']} with an error), checker {spec}"
          + (f"; {len(refused)} not in English left out" if refused else ""))
    print(f"SIMPLE   accuracy {_ci(s, 'accuracy')}  F1 {_ci(s, 'f1')}")
    print(f"         sensitivity {_ci(s, 'sensitivity')}  specificity {_ci(s, 'specificity')}  "
          f"clean reports flagged {1 - s['specificity']:.3f} [{1 - s['specificity_ci'][1]:.3f}, "
          f"{1 - s['specificity_ci'][0]:.3f}]")
    print(f"COMPLEX  coarse macro-F1 {_ci(c, 'macro_f1')}  fine macro-F1 {_ci(f, 'macro_f1')}")
    if "image_dependent" in s:
        image = s["image_dependent"]
        print(f"IMAGE-DEPENDENT types (clean vs {image['n_error']} reports with such an error): sensitivity "
              f"{_ci(image, 'sensitivity')}  balanced accuracy {_ci(image, 'balanced_accuracy')}  "
              f"F1 {_ci(image, 'f1')}")
    clean = scores.get("clean_versions")
    beyond = clean["beyond_clean"] if clean else {"per_type": {}}
    if clean:
        longest = clean["longest"]
        print(f"CLEAN VERSIONS of all {clean['n']} reports flagged {_ci(clean, 'clean_flagged')}; longest tenth "
              f"(>= {longest['min_chars']} characters, n={longest['n']}) {_ci(longest, 'clean_flagged')}")
        print(f"BEYOND THE CLEAN VERSION ({beyond['n']} erroneous reports whose original passes): sensitivity "
              f"{_ci(beyond, 'sensitivity')}")
    print(f"  {'true type':<22}{'n':>5}{'detected':>10}{'type F1':>9}  beyond clean")
    for name, row in s["sensitivity_by_fine_type"].items():
        new = beyond["per_type"].get(name)
        new = f"{new['sensitivity']:.3f} ({new['detected']}/{new['n']})" if new else "-"
        print(f"  {name:<22}{row['n']:>5}{row['sensitivity']:>10.3f}{f['per_type'][name]['f1']:>9.3f}  {new}")
    print(f"wrote {out}/metrics.json, predictions.jsonl, confusion_simple.png, confusion_coarse.png, "
          "confusion_fine.png")
    return metrics, predictions


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return {"inject": inject_main, "audit": audit_main, "evaluate": evaluate_main}[args.command](args)


if __name__ == "__main__":
    run_entry_point(main)
