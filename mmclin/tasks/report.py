"""Scoring of generated fundus reports: text overlap and the clinical content (DR grade, referral).

Text overlap is corpus BLEU-4 (sacrebleu; Papineni et al. 2002, Post 2018) and ROUGE-L F (rouge-score;
Lin 2004). The clinical content is read back from free text by :func:`parse_grade` and
:func:`parse_referral` and scored as accuracy and per-class / macro F1.

Vocabulary. The demo fundus reports state the grade with the ICDR names (Wilkinson et al., Ophthalmology
2003, "Proposed international clinical diabetic retinopathy and diabetic macular edema disease severity
scales") in :data:`GRADE_NAMES` and the referral with the phrases of :data:`REFERRAL_PHRASES`. The parsers
also read what real models and clinicians write: "NPDR"/"PDR", "no DR", "no apparent retinopathy",
"background retinopathy", "ICDR grade 2", NHS Diabetic Eye Screening Programme codes R0-R3, "urgent
referral", "rescreen in 12 months", ...

Negation and hedging follow NegEx (Chapman et al., J Biomed Inform 2001) and its ConText extension for
hypothetical statements (Harkema et al., J Biomed Inform 2009): a mention is negated by a cue before it
("no", "not", "without", "negative for", "absence of", "free of", "rather than", "n't", ...) whose scope
runs to the end of the clause, or by a cue just after it ("absent", "not seen", "ruled out", ": none"),
and is hypothetical after "if"/"in case" in its sentence or before "if"/"in case" in its clause. A clause
ends at . ; ! ? or a line break, at a conjunction such as "but"/"however"/"so", and at a comma unless a
list joined by "or"/"nor" goes on ("no haemorrhages, exudates or PDR" negates all three; "no signs of
proliferative disease, refer routinely" does not negate the referral). Pseudo-negations ("no change", "not
only", "cannot be excluded") negate nothing, and referral phrases ("no referral needed") negate no grade.
negspacy would need spaCy and a downloaded language model, hence this small implementation.

Rule for several statements (no order bias: which mention comes first or last never decides): only asserted
mentions (neither negated nor hypothetical) count, and the most severe wins -- the highest ICDR grade among
graded mentions, the most urgent referral. The eye with the worse disease decides a patient's grade and
referral, and a report naming two levels ("moderate to severe NPDR") is read by the higher one. A report
with no graded mention is grade 0 when it asserts a normal fundus or negates retinopathy as a whole ("no
diabetic retinopathy", "DR: none"), else unreadable (None). Retinopathy without a severity ("NPDR",
"diabetic retinopathy is present") and lesions alone ("neovascularisation") name no grade.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics.bleu import BLEU

from mmclin.errors import DataError
from mmclin.metrics.bootstrap import bootstrap_ci
from mmclin.metrics.f1 import coded_f1_scores, f1_scores

# ICDR severity scale (Wilkinson et al. 2003): index = grade. The demo reports use exactly these names.
GRADE_NAMES: tuple[str, ...] = (
    "no diabetic retinopathy",
    "mild non-proliferative diabetic retinopathy",
    "moderate non-proliferative diabetic retinopathy",
    "severe non-proliferative diabetic retinopathy",
    "proliferative diabetic retinopathy",
)
# Referral levels, least to most urgent.
REFERRAL_LEVELS: tuple[str, ...] = ("none", "routine", "soon", "urgent")
# The demo reports' referral phrase -> level.
REFERRAL_PHRASES: dict[str, str] = {
    "no referral needed": "none",
    "refer routinely": "routine",
    "refer soon": "soon",
    "refer urgently": "urgent",
}
# NHS Diabetic Eye Screening Programme retinopathy codes -> ICDR grade. Approximate: R1 "background" is
# mild NPDR, R2 "pre-proliferative" is read as severe NPDR (it spans part of ICDR moderate), R3 is PDR.
NHS_R_GRADES: dict[str, int] = {"0": 0, "1": 1, "2": 3, "3": 4}

# -- patterns (on text normalised by _normalise: lower case, "non-proliferative" -> "nonproliferative") ----
_DR = r"(?:diabetic\s+retinopathy|retinopathy|dr)"
_NPDR = r"(?:nonproliferative(?:\s+(?:diabetic\s+retinopathy|retinopathy|dr|disease|changes|stage))?|npdr)"
_GRADE_PATTERNS: tuple[tuple[str, int | str], ...] = (
    (rf"\b(?:mild|minimal|early)\s+(?:{_NPDR}|{_DR})\b", 1),
    (rf"\bbackground\s+{_DR}\b", 1),
    (rf"\bmoderate\s+(?:{_NPDR}|{_DR})\b", 2),
    (rf"\b(?:very\s+)?severe\s+(?:{_NPDR}|{_DR})\b", 3),
    (rf"\bpreproliferative(?:\s+(?:{_DR}|disease|changes))?\b", 3),
    (rf"\b(?:proliferative(?!\s+vitreoretinopathy)(?:\s+(?:{_DR}|disease|changes|stage))?|pdr)\b", 4),
    (r"\b(?:(?:icdr|dr|retinopathy)\s+)?(?:grade|level|stage)\s*[:#=]?\s*([0-4])\b", "number"),
    (r"\br([0-3])[as]?\b", "nhs"),
    (r"\b(?:normal|healthy|unremarkable)\s+(?:fundus|fundi|retinae?|retinas|fundoscopy|retinal\s+"
     r"(?:examination|exam|appearance|photographs?|images?))\b", 0),
    (r"\b(?:fundus|fundi|retinae?)\s+(?:is|are|appears?|looks?)\s+(?:normal|healthy|unremarkable)\b", 0),
    (rf"\b(?:{_DR}|diabetic\s+eye\s+disease)\b", "generic"),
)
_GRADE_RES = tuple((re.compile(p), label) for p, label in _GRADE_PATTERNS)

_URGENT = r"urgent(?:ly)?|immediate(?:ly)?|emergency|same[\s-]day"
_SOON = r"soon|prompt(?:ly)?|early|expedited?|semi[\s-]?urgent(?:ly)?|fast[\s-]?track(?:ed)?"
_ROUTINE = r"routine(?:ly)?|non[\s-]?urgent(?:ly)?"
_GAP_WORD = r"(?!(?:not|no|non)\b)[\w-]+"  # words between "refer" and its urgency; never a negation
_ADVERBS = {"urgent": _URGENT, "soon": _SOON, "routine": _ROUTINE}
_REFERRAL_PATTERNS: list[tuple[str, str]] = [
    pattern
    for level, adverb in _ADVERBS.items()
    for pattern in (
        (rf"\brefer(?:s|red|ral)?(?:[\s:=]+{_GAP_WORD}){{0,4}}?[\s:=]+(?:{adverb})\b", level),  # "refer ... soon"
        (rf"(?<![\w-])(?:{adverb})(?:\s+{_GAP_WORD}){{0,2}}?\s+refer(?:s|red|ral)?\b", level),  # "urgent referral"
    )
]
_ANY_ADVERB = "|".join(_ADVERBS.values())
_REFERRAL_PATTERNS += [
    (rf"\bno\s+(?:referral|need\s+(?:for\s+(?:a\s+)?referral|to\s+refer))(?:\s+(?:is\s+)?(?:needed|required|"
     rf"necessary|indicated))?(?!\s+(?:{_ANY_ADVERB}))\b", "none"),
    (r"\breferral\s+(?:is\s+)?not\s+(?:needed|required|necessary|indicated)\b", "none"),
    (r"\b(?:do|does|did)\s+not\s+(?:need|require)\s+(?:a\s+|to\s+be\s+)?refer(?:ral|red)?\b", "none"),
    (r"\breferral\s*[:=]\s*(?:none|no|not\s+(?:needed|required))\b", "none"),
    (r"\b(?:annual|yearly|routine|regular)\s+(?:diabetic\s+eye\s+)?(?:re-?)?screening\b", "none"),
    (r"\bre-?screen(?:ing)?(?:\s+in\s+(?:\d+|twelve|one|two)\s+(?:months?|years?))?\b", "none"),
    (r"\b(?:continue|return\s+to)\s+(?:annual\s+|routine\s+)?(?:diabetic\s+eye\s+)?screening\b", "none"),
    (r"\brecall\s+in\s+(?:12|twelve)\s+months\b", "none"),
]
_REFERRAL_RES = tuple((re.compile(p), label) for p, label in _REFERRAL_PATTERNS)

_SENTENCE_END = re.compile(r"[;!?\n]|\.(?!\d)")
_PRE_NEGATION = re.compile(r"\b(?:no|not|none|never|without|neither|nor|absence\s+of|absent|free\s+of|negative\s+"
                           r"for|rather\s+than|instead\s+of|rules?\s+out|ruled\s+out|\w+n't)\b")
_POST_NEGATION = re.compile(r"\b(?:absent|none|negative|excluded|ruled\s+out|not\s+(?:seen|present|detected|"
                            r"identified|evident|visible|found|noted|observed|shown))\b")
_PSEUDO_NEGATION = re.compile(r"\b(?:no\s+(?:interval\s+|significant\s+)?change|no\s+increase|no\s+further|not\s+only|"
                              r"no\s+doubt|(?:cannot|can't|could\s+not|couldn't)\s+(?:be\s+)?(?:excluded?|ruled?\s+"
                              r"out)|not\s+(?:been\s+)?(?:excluded|ruled\s+out))\b")
_HYPOTHETICAL = re.compile(r"\b(?:if|in\s+case|whether)\b")
_TERMINATOR = re.compile(r"\b(?:but|however|although|though|except|apart\s+from|aside\s+from|whereas|yet|while|"
                         r"which|nevertheless|still|so|therefore|hence|thus|because|since|and\s+(?=refer))\b")
_LIST_JOIN = re.compile(r"\b(?:or|nor)\b")
_POST_WINDOW = 3  # words allowed between a mention and a negation cue after it ("PDR is not seen")
_LIST_ITEM_WORDS = 3  # longest item of a negated list ("no haemorrhages, hard exudates or PDR")


@dataclass(frozen=True)
class _Mention:
    start: int
    end: int
    label: int | str
    status: str = "asserted"  # asserted | negated | hypothetical


def _normalise(text: str) -> str:
    text = re.sub(r"[\u2010-\u2015\u2212]", "-", text.lower()).replace("\u2019", "'")
    text = re.sub(r"\bnon[\s-]?proliferative", "nonproliferative", text)
    text = re.sub(r"\bpre[\s-]?proliferative", "preproliferative", text)
    return re.sub(r"[ \t]+", " ", text)


def _find(text: str, patterns) -> list[_Mention]:
    """Non-overlapping mentions, longer ones first (so "proliferative diabetic retinopathy" is one mention)."""
    found = []
    for pattern, label in patterns:
        for m in pattern.finditer(text):
            if label == "number":
                found.append(_Mention(m.start(), m.end(), int(m.group(1))))
            elif label == "nhs":
                found.append(_Mention(m.start(), m.end(), NHS_R_GRADES[m.group(1)]))
            else:
                found.append(_Mention(m.start(), m.end(), label))
    kept: list[_Mention] = []
    for mention in sorted(found, key=lambda m: (m.start - m.end, m.start)):
        if all(mention.end <= k.start or mention.start >= k.end for k in kept):
            kept.append(mention)
    return sorted(kept, key=lambda m: m.start)


def _scope_end(text: str, start: int, sentence_end: int) -> int:
    """Where the scope of a negation cue ending at `start` ends (see the module docstring)."""
    end = sentence_end
    terminator = _TERMINATOR.search(text, start, sentence_end)
    if terminator:
        end = terminator.start()
    commas = [start + i for i, ch in enumerate(text[start:end]) if ch == ","]
    for k, comma in enumerate(commas):
        # The comma goes on a negated list when "or"/"nor" follows it, through list items if need be.
        bounds = [*commas[k + 1:], end]
        continues, left = False, comma + 1
        for right in bounds:
            segment = text[left:right]
            if _LIST_JOIN.search(segment):
                continues = True
                break
            if right == end or len(segment.split()) > _LIST_ITEM_WORDS:
                break
            left = right + 1
        if not continues:
            return comma
    return end


def _status(text: str, mention: _Mention, masked: list[tuple[int, int]]) -> str:
    def free(m: re.Match) -> bool:
        return all(m.end() <= a or m.start() >= b for a, b in masked)

    starts = [m.end() for m in _SENTENCE_END.finditer(text, 0, mention.start)]
    sentence_start = starts[-1] if starts else 0
    stop = _SENTENCE_END.search(text, mention.end)
    sentence_end = stop.start() if stop else len(text)
    comma = text.find(",", mention.end, sentence_end)
    clause_end = comma if comma >= 0 else sentence_end
    if any(free(m) for m in _HYPOTHETICAL.finditer(text, sentence_start, mention.start)) or \
            any(free(m) for m in _HYPOTHETICAL.finditer(text, mention.end, clause_end)):
        return "hypothetical"
    for cue in _PRE_NEGATION.finditer(text, sentence_start, mention.start):
        if free(cue) and mention.start < _scope_end(text, cue.end(), sentence_end):
            return "negated"
    for cue in _POST_NEGATION.finditer(text, mention.end, clause_end):
        if free(cue) and len(re.findall(r"\w+", text[mention.end:cue.start()])) <= _POST_WINDOW:
            return "negated"
    return "asserted"


def _classify(text: str, mentions: list[_Mention], masked: list[tuple[int, int]]) -> list[_Mention]:
    masked = masked + [(m.start(), m.end()) for m in _PSEUDO_NEGATION.finditer(text)] + \
        [(m.start, m.end) for m in mentions]
    return [_Mention(m.start, m.end, m.label, _status(text, m, masked)) for m in mentions]


def parse_grade(text: str) -> int | None:
    """The ICDR diabetic retinopathy grade (0-4) a report asserts, or None if it states none.

    Negated and hypothetical mentions are ignored and the most severe asserted grade wins (module
    docstring), e.g. "no signs of proliferative disease, refer routinely" -> None, "no diabetic
    retinopathy" -> 0, "moderate NPDR" -> 2, "mild NPDR in the right eye, PDR in the left" -> 4.
    """
    norm = _normalise(text)
    referrals = [(m.start, m.end) for m in _find(norm, _REFERRAL_RES)]
    mentions = _classify(norm, _find(norm, _GRADE_RES), referrals)
    graded = [m.label for m in mentions if m.status == "asserted" and m.label in (1, 2, 3, 4)]
    if graded:
        return max(graded)
    healthy = any((m.label == 0 and m.status == "asserted") or (m.label == "generic" and m.status == "negated")
                  for m in mentions)
    return 0 if healthy else None


def parse_referral(text: str) -> str | None:
    """The referral level (one of :data:`REFERRAL_LEVELS`) a report asserts, or None.

    Negated and hypothetical statements are ignored ("refer urgently if vision drops" is no urgent referral)
    and the most urgent asserted level wins, e.g. "no signs of proliferative disease, refer routinely" ->
    ``routine``, "no referral needed" -> ``none``, "routine rescreening in 12 months" -> ``none``.
    """
    norm = _normalise(text)
    mentions = _classify(norm, _find(norm, _REFERRAL_RES), [])
    levels = [REFERRAL_LEVELS.index(m.label) for m in mentions if m.status == "asserted"]
    return REFERRAL_LEVELS[max(levels)] if levels else None


# Diabetic retinopathy lesions as reports name them (ETDRS / ICDR vocabulary; British and American spelling).
# Longer mentions win over the shorter ones inside them ("preretinal haemorrhage" is not a "haemorrhage").
LESIONS: tuple[str, ...] = ("microaneurysm", "haemorrhage", "preretinal_haemorrhage", "hard_exudates",
                            "cotton_wool_spots", "neovascularisation", "venous_beading", "irma")
_HAEM = r"ha?emorrhag(?:e|es|ic)"
_LESION_PATTERNS = (
    (r"\bmicro-?aneurysms?\b|\bmas\b", "microaneurysm"),
    (rf"\b(?:preretinal|pre-retinal|subhyaloid|vitreous)\s+{_HAEM}\b", "preretinal_haemorrhage"),
    (rf"\b(?:(?:dot|blot|dot-blot|dot\s+and\s+blot|flame|flame-shaped|intraretinal|retinal)\s+)?{_HAEM}\b|\bdbhs?\b",
     "haemorrhage"),
    (r"\b(?:hard\s+)?exudates?\b|\bexudation\b", "hard_exudates"),
    (r"\bcotton[\s-]wool\s+spots?\b|\bsoft\s+exudates?\b|\bcws\b", "cotton_wool_spots"),
    (r"\bneovasculari[sz]ation(?:\s+(?:at|of|elsewhere|on)\s+the\s+(?:disc|disk|retina))?\b|\bnew\s+vessels\b|"
     r"\bnv[de]\b", "neovascularisation"),
    (r"\bvenous\s+beading\b", "venous_beading"),
    (r"\birmas?\b|\bintraretinal\s+microvascular\s+abnormalit(?:y|ies)\b", "irma"),
)
_LESION_RES = tuple((re.compile(p), label) for p, label in _LESION_PATTERNS)


def parse_lesions(text: str) -> set[str]:
    """The lesions (:data:`LESIONS`) a fundus report asserts: negated ("no haemorrhages or exudates") and
    hypothetical mentions do not count, e.g. "Dot-blot haemorrhages. No neovascularisation." -> {haemorrhage}."""
    norm = _normalise(text)
    masked = [(m.start, m.end) for m in _find(norm, _REFERRAL_RES)]
    return {m.label for m in _classify(norm, _find(norm, _LESION_RES), masked) if m.status == "asserted"}


# -- metrics -----------------------------------------------------------------------------------------------
class ReportEvaluator:
    """BLEU, ROUGE-L and clinical accuracy of generated fundus reports.

    Keys (flat, for ``LightningModule.log_dict``), under ``{prefix}/``: ``n``; ``bleu`` (corpus BLEU-4,
    sacrebleu defaults: 13a tokenisation, exponential smoothing, 0-100) with bootstrap ``bleu_ci_low`` /
    ``bleu_ci_high`` (resampling reports); ``rouge_l`` (mean ROUGE-L F, 0-1); ``grade_acc``,
    ``grade_macro_f1`` (with CI), ``grade_f1/{g}`` per true grade and ``grade_unparsed`` (reports with no
    readable grade, counted wrong); ``referral_acc``, ``referral_macro_f1`` (with CI),
    ``referral_f1/{level}`` and ``referral_unparsed``.

    The generated text is ``generated``, the reference ``answer``; the true grade is ``meta["grade"]`` (else
    parsed from the reference) and the true referral ``meta["referral"]`` (else parsed from the reference).
    """

    def __init__(self, n_boot: int = 1000, level: float = 0.95, seed: int = 0, rouge_stemmer: bool = False):
        """
        Args:
            n_boot: bootstrap resamples per confidence interval.
            level: coverage of the intervals.
            seed: seed of the resampling.
            rouge_stemmer: Porter-stem words before ROUGE-L (rouge-score's ``use_stemmer``).
        """
        self.n_boot, self.level, self.seed = n_boot, level, seed
        self.bleu = BLEU()
        self._segment_bleu = BLEU(effective_order=True)  # per-report statistics only; no warning per segment
        self.rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=rouge_stemmer)

    def __call__(self, rows: Sequence[dict], prefix: str) -> dict[str, float]:
        """Metrics of `rows` (MultimodalLM prediction dicts) under ``{prefix}/``; empty for no rows."""
        if not prefix or "/" in prefix:
            raise ValueError(f"prefix must be a non-empty name without '/', got {prefix!r}")
        if not rows:
            return {}
        hypotheses, references, true_grade, true_referral = [], [], [], []
        for i, row in enumerate(rows):
            hypothesis, reference, grade, referral = self._truth(i, row)
            hypotheses.append(hypothesis)
            references.append(reference)
            true_grade.append(grade)
            true_referral.append(REFERRAL_LEVELS.index(referral))
        pred_grade = [parse_grade(h) for h in hypotheses]
        pred_referral = [None if (r := parse_referral(h)) is None else REFERRAL_LEVELS.index(r) for h in hypotheses]

        out = {f"{prefix}/n": float(len(rows))}
        out[f"{prefix}/bleu"] = self.bleu.corpus_score(hypotheses, [references]).score
        stats = np.array([self._bleu_statistics(h, r) for h, r in zip(hypotheses, references)])
        out[f"{prefix}/bleu_ci_low"], out[f"{prefix}/bleu_ci_high"] = self._ci(self._bleu_from_statistics, stats)
        out[f"{prefix}/rouge_l"] = float(np.mean([self.rouge.score(r, h)["rougeL"].fmeasure
                                                  for h, r in zip(hypotheses, references)]))
        for name, truth, predicted, labels in (("grade", true_grade, pred_grade, range(len(GRADE_NAMES))),
                                               ("referral", true_referral, pred_referral, REFERRAL_LEVELS)):
            n_classes = len(labels)
            out[f"{prefix}/{name}_acc"] = float(np.mean([t == p for t, p in zip(truth, predicted)]))
            macro, per_class = f1_scores(truth, predicted, n_classes)
            out[f"{prefix}/{name}_macro_f1"] = macro
            coded = np.array([n_classes if x is None else x for x in predicted], dtype=np.int64)
            out[f"{prefix}/{name}_macro_f1_ci_low"], out[f"{prefix}/{name}_macro_f1_ci_high"] = self._ci(
                lambda t, p, k=n_classes: coded_f1_scores(t, p, k)[0], np.asarray(truth, dtype=np.int64), coded)
            for c, score in per_class.items():
                out[f"{prefix}/{name}_f1/{labels[c]}"] = score
            out[f"{prefix}/{name}_unparsed"] = float(sum(x is None for x in predicted))
        return out

    @staticmethod
    def _truth(index: int, row: dict) -> tuple[str, str, int, str]:
        missing = [k for k in ("generated", "answer") if k not in row]
        if missing:
            raise DataError(f"prediction row {index}: missing keys {missing}; expected 'generated', 'answer', 'meta'")
        meta = row.get("meta") or {}
        reference = str(row["answer"])
        grade = meta.get("grade")
        if grade is None:
            grade = parse_grade(reference)
            if grade is None:
                raise DataError(f"prediction row {index}: no meta['grade'] and no ICDR grade readable in the "
                                f"reference {reference!r}")
        if isinstance(grade, bool) or not isinstance(grade, (int, np.integer)) or not 0 <= grade <= 4:
            raise DataError(f"prediction row {index}: meta['grade'] must be an ICDR grade 0-4, got {grade!r}")
        referral = meta.get("referral")
        if referral is None:
            referral = parse_referral(reference)
            if referral is None:
                raise DataError(f"prediction row {index}: no meta['referral'] and no referral readable in the "
                                f"reference {reference!r}")
        if referral not in REFERRAL_LEVELS:  # a phrase ("refer routinely") rather than a level
            referral = parse_referral(str(referral)) or referral
        if referral not in REFERRAL_LEVELS:
            raise DataError(f"prediction row {index}: meta['referral'] must be one of {list(REFERRAL_LEVELS)}, "
                            f"got {referral!r}")
        return str(row["generated"] or ""), reference, int(grade), referral

    def _ci(self, metric, *columns) -> tuple[float, float]:
        return bootstrap_ci(metric, *columns, n_boot=self.n_boot, level=self.level, seed=self.seed)

    def _bleu_statistics(self, hypothesis: str, reference: str) -> list[int]:
        """sys_len, ref_len, matching and total n-grams (n = 1..4) of one report: BLEU's sufficient statistics."""
        score = self._segment_bleu.sentence_score(hypothesis, [reference])
        return [score.sys_len, score.ref_len, *score.counts, *score.totals]

    def _bleu_from_statistics(self, stats: np.ndarray) -> float:
        """Corpus BLEU of the reports whose statistics are the rows of `stats` (as sacrebleu's corpus_score)."""
        total = stats.sum(axis=0)
        order = self.bleu.max_ngram_order
        return BLEU.compute_bleu(correct=[int(x) for x in total[2:2 + order]],
                                 total=[int(x) for x in total[2 + order:]], sys_len=int(total[0]),
                                 ref_len=int(total[1]), smooth_method=self.bleu.smooth_method,
                                 smooth_value=self.bleu.smooth_value, effective_order=self.bleu.effective_order,
                                 max_ngram_order=order).score
