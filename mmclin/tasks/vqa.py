"""Scoring of visual question answering over CT volumes (DeepTumorVQA-style closed and numeric questions).

The rows are the predictions :class:`~mmclin.models.mllm.MultimodalLM` writes: ``question``, ``answer``,
``generated`` (raw text), ``parsed``, ``ranked`` (the allowed choice of highest likelihood, or None),
``choices`` (may be empty) and ``meta`` (``question_type``, ``question_subtype``, and ``value``, the true
number, for numeric questions). Every closed question is scored twice, so that a parser's quirks cannot
decide a result: the *generation* path reads the choice from the generated text (the option text, else an
option letter), the *likelihood* path takes ``ranked``. ``parsed`` is recomputed here, because the model's
own parse knows neither reasoning blocks nor option letters.

Numeric answers are scored by mean relative accuracy (MRA; Yang et al. 2024, "Thinking in Space", VSI-Bench)
and by the share within relative-error bands; yes/no questions also get sensitivity and specificity.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from mmclin.errors import ConfigError, DataError
from mmclin.metrics.bootstrap import bootstrap_ci
from mmclin.tasks.qa import normalise_answer, parse_choice

PATHS = ("generation", "likelihood")
TOLERANCES = (0.05, 0.10, 0.20, 0.50)
# MRA thresholds theta = 0.50, 0.55, ..., 0.95 (VSI-Bench): a prediction passes theta when its relative error
# is below 1 - theta. Rounded so that 1 - 0.95 is exactly 0.05 and a 5 % error does not pass it.
MRA_TOLERANCES = tuple(round(1.0 - theta, 10) for theta in np.linspace(0.50, 0.95, 10))
ROW_KEYS = ("answer", "generated", "ranked", "choices", "meta")

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.S | re.I)
_STANDALONE_LETTER = re.compile(r"(?<![\w'’-])([A-Za-z])(?![\w'’-])")
_LETTER_CUE = re.compile(r"\b(?:answer|option|choice)\s*(?:is|:|=)?\s*[:=-]?\s*[(\[{*]*\s*$", re.I)
_NUMBER = re.compile(r"(?<![\w.])(-|−)?((?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)(?![dD]\b)")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve")
_NUMBER_WORD = re.compile(rf"\b({'|'.join(_NUMBER_WORDS)})\b", re.I)
_YES_NO = re.compile(r"\b(yes|no)\b", re.I)


# -- parsing -----------------------------------------------------------------------------------------------
def strip_think(text: str) -> str:
    """The answer part of a generation, without reasoning blocks.

    Removes every ``<think>...</think>`` block; a ``</think>`` without an opening tag (the chat template put
    ``<think>`` in the prompt, as Qwen3 and DeepSeek-R1 templates do) drops everything before it; an unclosed
    ``<think>`` (reasoning cut off by the token limit) drops everything after it.
    """
    text = _THINK_BLOCK.sub(" ", text)
    close = text.lower().rfind("</think>")
    if close >= 0:
        text = text[close + len("</think>"):]
    opening = text.lower().find("<think>")
    if opening >= 0:
        text = text[:opening]
    return text.strip()


def parse_letter(text: str, n_options: int = 4) -> str | None:
    """The first option letter (``A``, ``B``, ...) a generation states, upper-cased, or None.

    Reasoning blocks are ignored (:func:`strip_think`). A letter counts only as a standalone token ("B",
    "(B)", "B.", "B)", "Answer: C", "**D**"), never inside a word ("Bone"), and only among the first
    `n_options` letters. Capital "A" and "I" followed by a word read as an article or pronoun ("A lesion is
    seen") unless bracketed or after a cue such as "answer:"; a lower-case letter counts only when
    bracketed, after a cue (but "the answer is a cyst" is an article), or as the whole answer.

    Args:
        text: generated text.
        n_options: number of options; letters beyond them are ignored (1 to 26).
    """
    if not 1 <= n_options <= 26:
        raise ValueError(f"n_options must be between 1 and 26, got {n_options}")
    body = strip_think(text)
    for match in _STANDALONE_LETTER.finditer(body):
        letter = match.group(1)
        if ord(letter.upper()) - ord("A") >= n_options:
            continue
        before, after = body[: match.start()], body[match.end():]
        bracketed = before.rstrip().endswith(("(", "[")) or after.lstrip().startswith((")", "]"))
        cued = _LETTER_CUE.search(before) is not None
        followed_by_word = re.match(r"\s+[^\W_]", after) is not None
        if letter.isupper():
            if letter not in "AI" or bracketed or cued or not followed_by_word:
                return letter
        elif bracketed or (cued and not (letter in "ai" and followed_by_word)) or \
                re.fullmatch(r"[a-z][.):]?", body):
            return letter.upper()
    return None


def parse_number(text: str) -> float | None:
    """The first number in a generation (reasoning blocks ignored), or None.

    Reads "12", "-3.5", "−3.5", "1,234.5" (a comma is a thousands separator only before exactly three
    digits, so "12,5" reads 12) and numbers with units ("12 mL", "12mL"); "3D" is not a number. Number
    words from zero to twelve ("two lesions") are read only when the text holds no digits.
    """
    body = strip_think(text)
    match = _NUMBER.search(body)
    if match:
        value = float(match.group(2).replace(",", ""))
        return -value if match.group(1) else value
    word = _NUMBER_WORD.search(body)
    return float(_NUMBER_WORDS.index(word.group(1).lower())) if word else None


def parse_yes_no(text: str) -> str | None:
    """``yes`` or ``no``, whichever the answer (reasoning blocks ignored) states first, or None."""
    match = _YES_NO.search(strip_think(text))
    return match.group(1).lower() if match else None


def choice_from_generation(generated: str, choices: Sequence[str]) -> str | None:
    """The allowed choice a generation names: its option text, else its option letter; None if neither.

    The option text is read by :func:`mmclin.tasks.qa.parse_choice` (exact match, else the earliest named
    option), the letter by :func:`parse_letter` and mapped to ``choices[letter]``; reasoning blocks are
    removed first.
    """
    if not choices:
        return None
    text = strip_think(generated)
    choice = parse_choice(text, choices)
    if choice is None:
        letter = parse_letter(text, min(len(choices), 26))
        choice = choices[ord(letter) - ord("A")] if letter else None
    return choice


# -- scores ------------------------------------------------------------------------------------------------
def mean_relative_accuracy(pred: float, true: float) -> float:
    """Mean relative accuracy of one numeric answer (Yang et al. 2024, "Thinking in Space", VSI-Bench).

    ``MRA = 1/10 * sum over theta in {0.50, 0.55, ..., 0.95} of 1[|pred - true| / |true| < 1 - theta]``, so
    10 % relative error scores 0.8 and 50 % or more scores 0. A true value of 0 has no relative error: the
    score is 1 for a prediction of exactly 0, else 0. A non-finite prediction scores 0.
    """
    if not math.isfinite(pred):
        return 0.0
    if true == 0:
        return float(pred == 0)
    error = abs(pred - true) / abs(true)
    return sum(error < tol for tol in MRA_TOLERANCES) / len(MRA_TOLERANCES)


def within_tolerance(pred: float, true: float, tol: float) -> bool:
    """Whether `pred` is within a relative error `tol` (0.10 = 10 %) of `true`, bounds included.

    A true value of 0 is matched only by exactly 0.
    """
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if not math.isfinite(pred):
        return False
    if true == 0:
        return pred == 0
    return abs(pred - true) / abs(true) <= tol


def yes_no_scores(truth: Sequence[str], predicted: Sequence[str | None]) -> dict[str, float]:
    """Sensitivity and specificity of yes/no answers, positive = ``yes``.

    ``sensitivity`` = share of true "yes" answered "yes", ``specificity`` = share of true "no" answered "no";
    an unreadable answer (None or anything else) is wrong for either (NaN where a class has no rows).
    """
    truth = [t.lower() for t in truth]
    predicted = [p.lower() if isinstance(p, str) else None for p in predicted]
    out = {}
    for name, label in (("sensitivity", "yes"), ("specificity", "no")):
        hits = [p == label for t, p in zip(truth, predicted) if t == label]
        out[name] = sum(hits) / len(hits) if hits else float("nan")
    return out


# -- evaluator ---------------------------------------------------------------------------------------------
@dataclass
class _ScoredRow:
    """What one prediction row contributes to the metrics."""

    categories: tuple[str, ...]  # (question_type,) or (question_type, question_subtype) or ()
    closed: bool
    correct: dict[str, float] = field(default_factory=dict)  # path -> 1.0 / 0.0 (closed rows)
    unparsed: bool = False  # closed row whose generation names no choice
    open_correct: float | None = None  # exact match of an open row
    value: float | None = None  # true number
    number: dict[str, float | None] = field(default_factory=dict)  # path -> predicted number
    yes_no_truth: str | None = None
    yes_no_pred: dict[str, str | None] = field(default_factory=dict)


def _slug(name: object) -> str:
    """A category name usable in a metric key (no '/', no spaces)."""
    return re.sub(r"[^\w.-]+", "_", str(name)).strip("_") or "_"


class VQAEvaluator:
    """Metrics of closed and numeric VQA predictions, overall and per question type and subtype.

    Keys are flat ``{prefix}/{metric}`` (overall), ``{prefix}/{metric}/{question_type}`` and
    ``{prefix}/{metric}/{question_type}/{question_subtype}``, ready for ``LightningModule.log_dict``; e.g.
    ``test/acc_likelihood/measurement`` and its interval ``test/acc_likelihood_ci_low/measurement``.
    Metrics, wherever their rows exist:

    - ``n``; ``n_closed``, ``acc_generation``, ``acc_likelihood`` (closed rows; bootstrap ``_ci_low`` /
      ``_ci_high``), ``unparsed_generation`` (closed rows whose generation names no choice: counted wrong);
    - ``acc_generation_open``: normalised exact match of questions without choices;
    - ``n_numeric``, ``mra_{path}`` (with CI) and ``within{5,10,20,50}_{path}`` for rows with ``meta["value"]``:
      the generation path's number is that of the chosen option's text, else the first number generated
      (unreadable scores 0; counted in ``unparsed_number_generation``); the likelihood path's that of the
      ranked option;
    - ``n_yes_no``, ``sensitivity_{path}``, ``specificity_{path}`` when answers are yes/no.
    """

    def __init__(self, tolerances: Sequence[float] = TOLERANCES, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0):
        """
        Args:
            tolerances: relative-error bands for numeric answers (0.05 = 5 %), reported as ``within5`` etc.
            n_boot: bootstrap resamples per confidence interval.
            level: coverage of the intervals.
            seed: seed of the resampling.
        """
        if any(t < 0 for t in tolerances):
            raise ConfigError(f"tolerances must be >= 0, got {list(tolerances)}")
        self.tolerances = tuple(tolerances)
        self.n_boot, self.level, self.seed = n_boot, level, seed

    def __call__(self, rows: Sequence[dict], prefix: str) -> dict[str, float]:
        """Metrics of `rows` (MultimodalLM prediction dicts) under ``{prefix}/``; empty for no rows."""
        if not prefix or "/" in prefix:
            raise ValueError(f"prefix must be a non-empty name without '/', got {prefix!r}")
        scored = [self._score_row(i, row) for i, row in enumerate(rows)]
        groups: dict[tuple[str, ...], list[_ScoredRow]] = {(): scored} if scored else {}
        for row in scored:
            for depth in range(1, len(row.categories) + 1):
                groups.setdefault(row.categories[:depth], []).append(row)
        metrics = {}
        for category in sorted(groups):
            suffix = "".join(f"/{c}" for c in category)
            for name, value in self._metrics(groups[category]).items():
                metrics[f"{prefix}/{name}{suffix}"] = value
        return metrics

    # -- per row ---------------------------------------------------------------------------------------
    def _score_row(self, index: int, row: dict) -> _ScoredRow:
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise DataError(f"prediction row {index}: missing keys {missing}; expected {list(ROW_KEYS)}")
        meta, choices, answer = row["meta"] or {}, list(row["choices"] or []), row["answer"]
        if not isinstance(meta, dict):
            raise DataError(f"prediction row {index}: meta must be a dict, got {type(meta).__name__}")
        if choices and answer not in choices:
            raise DataError(f"prediction row {index}: answer {answer!r} is not one of its choices {choices}")
        qtype, subtype = meta.get("question_type"), meta.get("question_subtype")
        categories = () if qtype is None else (_slug(qtype),) if subtype is None else (_slug(qtype), _slug(subtype))
        out = _ScoredRow(categories=categories, closed=bool(choices))
        generated = str(row["generated"] or "")
        if choices:
            chosen = choice_from_generation(generated, choices)
            ranked = row["ranked"]
            out.unparsed = chosen is None
            out.correct = {"generation": float(chosen == answer), "likelihood": float(ranked == answer)}
            answers = {"generation": chosen, "likelihood": ranked}
        else:
            out.open_correct = float(normalise_answer(strip_think(generated)) == normalise_answer(answer))
            answers = {"generation": None}
        if meta.get("value") is not None:
            try:
                out.value = float(meta["value"])
            except (TypeError, ValueError):
                raise DataError(f"prediction row {index}: meta['value'] must be a number, got {meta['value']!r}") \
                    from None
            out.number = {path: parse_number(text) if text is not None else None for path, text in answers.items()}
            if out.number["generation"] is None:
                out.number["generation"] = parse_number(generated)
        if normalise_answer(answer) in ("yes", "no"):
            out.yes_no_truth = normalise_answer(answer)
            out.yes_no_pred = {path: normalise_answer(text) if text is not None else None
                               for path, text in answers.items()}
            if not choices:
                out.yes_no_pred["generation"] = parse_yes_no(generated)
        return out

    # -- per group -------------------------------------------------------------------------------------
    def _with_ci(self, out: dict[str, float], name: str, column: np.ndarray,
                 metric: Callable[[np.ndarray], float] = np.mean) -> None:
        out[name] = float(metric(column))
        low, high = bootstrap_ci(metric, column, n_boot=self.n_boot, level=self.level, seed=self.seed)
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = low, high

    def _metrics(self, rows: list[_ScoredRow]) -> dict[str, float]:
        out: dict[str, float] = {"n": float(len(rows))}
        closed = [r for r in rows if r.closed]
        if closed:
            out["n_closed"] = float(len(closed))
            for path in PATHS:
                self._with_ci(out, f"acc_{path}", np.array([r.correct[path] for r in closed]))
            out["unparsed_generation"] = float(sum(r.unparsed for r in closed))
        opened = [r.open_correct for r in rows if not r.closed]
        if opened:
            out["acc_generation_open"] = float(np.mean(opened))
        numeric = [r for r in rows if r.value is not None]
        if numeric:
            out["n_numeric"] = float(len(numeric))
            for path in PATHS:
                pairs = [(r.number[path], r.value) for r in numeric if path in r.number]
                if not pairs:
                    continue
                mra = np.array([0.0 if p is None else mean_relative_accuracy(p, t) for p, t in pairs])
                self._with_ci(out, f"mra_{path}", mra)
                for tol in self.tolerances:
                    hits = [p is not None and within_tolerance(p, t, tol) for p, t in pairs]
                    out[f"within{tol * 100:g}_{path}"] = float(np.mean(hits))
            out["unparsed_number_generation"] = float(sum(r.number["generation"] is None for r in numeric))
        yes_no = [r for r in rows if r.yes_no_truth is not None]
        if yes_no:
            out["n_yes_no"] = float(len(yes_no))
            for path in PATHS:
                scored = [r for r in yes_no if path in r.yes_no_pred]
                if scored:
                    scores = yes_no_scores([r.yes_no_truth for r in scored], [r.yes_no_pred[path] for r in scored])
                    out[f"sensitivity_{path}"], out[f"specificity_{path}"] = scores["sensitivity"], \
                        scores["specificity"]
        return out


_TABLE_HEAD = ("n", "acc_generation", "acc_likelihood", "acc_generation_open", "mra_generation", "mra_likelihood")
_TABLE_TAIL = ("sensitivity_generation", "specificity_generation", "sensitivity_likelihood",
               "specificity_likelihood", "unparsed_generation")


def summary_table(metrics: dict[str, float]) -> str:
    """A markdown table of :class:`VQAEvaluator` metrics, one line per category ("all" first).

    Figures with a bootstrap interval print as ``0.750 [0.500, 1.000]``; absent ones stay blank.
    """
    table: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) >= 2:
            table.setdefault("/".join(parts[2:]) or "all", {})[parts[1]] = value
    present = {name for row in table.values() for name in row}
    bands = sorted((n for n in present if re.fullmatch(r"within\d+_\w+", n)),
                   key=lambda n: (n.split("_", 1)[1], int(re.search(r"\d+", n).group())))
    columns = [c for c in (*_TABLE_HEAD, *bands, *_TABLE_TAIL) if c in present]

    def cell(row: dict[str, float], name: str) -> str:
        if name not in row:
            return ""
        if name.startswith(("n", "unparsed")):
            return f"{row[name]:g}"
        text = f"{row[name]:.3f}"
        if f"{name}_ci_low" in row:
            text += f" [{row[f'{name}_ci_low']:.3f}, {row[f'{name}_ci_high']:.3f}]"
        return text

    order = sorted(table, key=lambda c: (c != "all", c))
    lines = ["| category | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    lines += ["| " + " | ".join([c, *(cell(table[c], name) for name in columns)]) + " |" for c in order]
    return "\n".join(lines)
