"""Preference pairs for MMedPO-style alignment: the reference answer against a clinically meaningful mistake.

MMedPO (Zhu et al. 2024, arXiv:2412.06141) builds dispreferred responses two ways, both here:

- *hallucination injection*: the reference report with one clinical error written into it
  (:func:`inject_fundus_errors`: a wrong grade or referral, an invented lesion, an omitted one, a negation
  flipped, the other eye), and for closed questions a wrong option (:func:`wrong_option_pairs`);
- *another study's report* (:func:`other_study_report`): a coherent report of a different grade, the kind of
  fluent, internally consistent report a model writes from priors; unlike a single edit, which the text alone
  betrays (a grade that contradicts the listed lesions), only the image tells it from the right one;
- *lesion-region noising*: the model's own answer when noise replaces the evidence inside the lesion region
  of the input (:func:`noise_region`; the whole record, :func:`noise_record`, where the data localises no
  lesion, as for ECG findings), which shows what it says from priors alone;
- *the model's own mistakes* (``own_answer``): its greedy answer to the unaltered input where that is wrong,
  an option it was not offered included (a volume of "280 mL" among 210, 290, 580 and 41 mL), the self-play
  negatives of SPIN (Chen et al. 2024, arXiv:2401.01335), which target what generation gets wrong rather than
  a mistake the model would not make.

Two *conditional* kinds keep the answer and change the input instead (the conditional preference of mDPO,
Wang et al. 2024, arXiv:2406.11839, which finds that DPO on answer pairs alone lets a model keep answering from
the text), so what the model says must come from the evidence: the reference answer given the study's input is
preferred to the same answer given the input with its lesion region noised (``noised_input``), or given another
training study's input whose reference answer to the same question is clinically different (``other_input``,
that study in ``rejected_study``). Noise is a surface feature a model can learn to detect; another study's input
is as real as the study's own, so only its content tells the two apart.

Every pair gets a clinical weight (:func:`clinical_weight`) from what the rejected answer gets wrong in the
content the project's parsers read (ICDR grade, referral urgency, lesions), so a missed or invented lesion or a
wrong grade counts more than a change of wording.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
import torch

from mmclin.tasks.report import GRADE_NAMES, REFERRAL_LEVELS, parse_grade, parse_lesions, parse_referral

KINDS = ("severity", "referral", "false_finding", "omission", "negation", "laterality", "other_study",
         "wrong_option", "lesion_noise", "own_answer", "noised_input", "other_input")
CONDITIONAL = ("noised_input", "other_input")  # kinds whose two sides are the same answer given two inputs
BY_NAME = (*CONDITIONAL, "own_answer")  # kinds built only when asked for
INJECTED = KINDS[:6]  # the kinds written into a reference report

# Wording of an invented lesion (ETDRS terms, as fundus reports state them)
LESION_PHRASES = {
    "microaneurysm": "Scattered microaneurysms",
    "haemorrhage": "Dot-blot haemorrhages in the posterior pole",
    "preretinal_haemorrhage": "A preretinal haemorrhage inferiorly",
    "hard_exudates": "Hard exudates near the macula",
    "cotton_wool_spots": "Cotton wool spots along the arcades",
    "neovascularisation": "Neovascularisation at the disc",
}
# How each grade and referral level is written (the ICDR names; the referral phrases of the demo reports)
REFERRAL_PHRASES = {"none": "no referral needed", "routine": "refer routinely", "soon": "refer soon",
                    "urgent": "refer urgently"}
_GRADE_RE = re.compile("|".join(re.escape(g) for g in sorted(GRADE_NAMES, key=len, reverse=True)), re.IGNORECASE)
_REFERRAL_RE = re.compile("|".join(re.escape(p) for p in REFERRAL_PHRASES.values()), re.IGNORECASE)
_SIDE_RE = re.compile(r"\b(right|left)(\s+eye)\b", re.IGNORECASE)
_IMPRESSION_RE = re.compile(r"\b(?:impression|assessment|conclusion|summary)\s*:", re.IGNORECASE)
_SENTENCE_RE = re.compile(r"[^.!?\n]+[.!?]?")
WORDING_WEIGHT = 0.25  # a rejected answer with the same clinical content (only its words differ)


@dataclass
class Pair:
    """One preference pair: the same `study` and `prompt`; `chosen` is preferred to `rejected`, given the input of
    `rejected_study` for an ``other_input`` pair."""

    study: str
    prompt: str
    chosen: str
    rejected: str
    kind: str
    weight: float
    rejected_study: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def clinical_weight(chosen: str, rejected: str, choices: list[str] | None = None) -> float:
    """What `rejected` costs against `chosen` clinically: 1 per ICDR grade step and per referral-urgency step
    away, 1.5 per lesion invented or missed (hallucinations and omissions weigh most, as in MMedPO's clinical
    relevance scores), and :data:`WORDING_WEIGHT` when the parsed content is the same. A wrong option of a
    closed question (`choices` given) costs 1, or its relative distance (capped at 3) for numeric options."""
    if choices:
        try:
            a, b = float(chosen), float(rejected)
            return float(min(3.0, max(0.5, abs(a - b) / max(abs(a), 1e-6))))
        except ValueError:
            return 1.0
    cost = 0.0
    grades = parse_grade(chosen), parse_grade(rejected)
    if grades[0] is not None:
        cost += abs(grades[0] - grades[1]) if grades[1] is not None else 2.0  # no grade at all: as bad as two
    referrals = parse_referral(chosen), parse_referral(rejected)
    if referrals[0] is not None:
        cost += abs(REFERRAL_LEVELS.index(referrals[0]) - REFERRAL_LEVELS.index(referrals[1])) \
            if referrals[1] is not None else 1.0
    cost += 1.5 * len(parse_lesions(chosen) ^ parse_lesions(rejected))
    if _sides(chosen) != _sides(rejected):
        cost += 2.0
    return float(cost) if cost > 0 else WORDING_WEIGHT


def _sides(text: str) -> list[str]:
    return [m.group(1).lower() for m in _SIDE_RE.finditer(text)]


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_RE.findall(text) if s.strip()]


def inject_fundus_errors(report: str, rng: np.random.Generator, kinds=INJECTED) -> list[tuple[str, str]]:
    """One erroneous version of `report` per applicable kind: ``(kind, rejected text)``.

    ``severity``: another ICDR grade named; ``referral``: another urgency; ``false_finding``: a lesion the report
    does not assert stated before its impression; ``omission``: an asserted lesion dropped from its list (or its
    sentence); ``negation``: an asserted finding negated, or a negated one asserted; ``laterality``: the other
    eye. A kind that does not apply (no grade named, no lesion to omit, no eye) gives nothing, and a result the
    parsers cannot tell from the report is dropped, so every rejected text differs clinically.
    """
    out = []
    for kind in kinds:
        rejected = _INJECTORS[kind](report, rng)
        if rejected and rejected != report and clinical_weight(report, rejected) > WORDING_WEIGHT:
            out.append((kind, rejected))
    return out


def _severity(report: str, rng) -> str | None:
    found = _GRADE_RE.search(report)
    if not found:
        return None
    grade = [g.lower() for g in GRADE_NAMES].index(found.group(0).lower())
    other = [g for g in range(len(GRADE_NAMES)) if g != grade]
    # a near grade more often than a far one: the mistakes graders make (weights fall with the distance)
    p = np.array([1.0 / abs(g - grade) for g in other])
    new = GRADE_NAMES[int(rng.choice(other, p=p / p.sum()))]
    return report[:found.start()] + _match_case(found.group(0), new) + report[found.end():]


def _referral(report: str, rng) -> str | None:
    found = _REFERRAL_RE.search(report)
    if not found:
        return None
    level = next(k for k, v in REFERRAL_PHRASES.items() if v == found.group(0).lower())
    new = REFERRAL_PHRASES[str(rng.choice([k for k in REFERRAL_PHRASES if k != level]))]
    return report[:found.start()] + _match_case(found.group(0), new) + report[found.end():]


def _false_finding(report: str, rng) -> str | None:
    absent = [k for k in LESION_PHRASES if k not in parse_lesions(report)]
    if not absent:
        return None
    sentence = LESION_PHRASES[str(rng.choice(absent))] + "."
    impression = _IMPRESSION_RE.search(report)
    at = impression.start() if impression else len(report)
    return (report[:at].rstrip() + " " + sentence + " " + report[at:].lstrip()).strip()


def _omission(report: str, rng) -> str | None:
    sentences = _sentences(report)
    options = []  # (sentence index, list of items without one, or None to drop the sentence)
    for i, sentence in enumerate(sentences):
        if _IMPRESSION_RE.search(sentence) or not parse_lesions(sentence):
            continue
        items = re.split(r",\s*|\s+and\s+", sentence.rstrip("."))
        if len(items) == 1:
            options.append((i, None))
        for j, item in enumerate(items):
            if len(items) > 1 and parse_lesions(item):
                options.append((i, items[:j] + items[j + 1:]))
    if not options:
        return None
    i, rest = options[int(rng.integers(len(options)))]
    if rest is not None:
        text = rest[0] if len(rest) == 1 else ", ".join(rest[:-1]) + " and " + rest[-1]
        sentences[i] = text[0].upper() + text[1:] + "."
    else:
        del sentences[i]
    return " ".join(sentences)


def _negation(report: str, rng) -> str | None:
    sentences = _sentences(report)
    options = []
    for i, sentence in enumerate(sentences):
        if _IMPRESSION_RE.search(sentence):
            continue
        negated = re.match(r"(?:no|there\s+(?:is|are)\s+no)\s+(.+)", sentence, re.IGNORECASE)
        if negated:  # "No neovascularisation." -> "Neovascularisation."; "no A or B" -> "A and B"
            rest = re.sub(r"\s+or\s+", " and ", negated.group(1))
            options.append((i, rest[0].upper() + rest[1:]))
        elif parse_lesions(re.split(r",|:|\s+and\s+|\s+with\s+", sentence)[0]):  # it opens with a lesion:
            # "Hard exudates near the macula." -> "No hard exudates near the macula."
            options.append((i, "No " + sentence[0].lower() + sentence[1:]))
    if not options:
        return None
    i, sentence = options[int(rng.integers(len(options)))]
    sentences[i] = sentence
    return " ".join(sentences)


def _laterality(report: str, rng) -> str | None:
    if not _SIDE_RE.search(report):
        return None
    swap = {"right": "left", "left": "right"}
    return _SIDE_RE.sub(lambda m: _match_case(m.group(1), swap[m.group(1).lower()]) + m.group(2), report)


def _match_case(old: str, new: str) -> str:
    return new[0].upper() + new[1:] if old[:1].isupper() else new


_INJECTORS = {"severity": _severity, "referral": _referral, "false_finding": _false_finding,
              "omission": _omission, "negation": _negation, "laterality": _laterality}


def other_study_report(report: str, reports: list[str], rng: np.random.Generator, tries: int = 20) -> str | None:
    """A report of `reports` that states another ICDR grade than `report` (None when none is found)."""
    grade = parse_grade(report)
    if grade is None or not reports:
        return None
    for _ in range(tries):
        other = reports[int(rng.integers(len(reports)))]
        found = parse_grade(other)
        if found is not None and found != grade:
            return other
    return None


def other_input_study(answer: str, candidates: list[tuple[str, str]], rng: np.random.Generator,
                      choices: list[str] | None = None) -> tuple[str, float] | None:
    """A study of `candidates` ``(study, its reference answer to the same question)`` whose answer differs
    clinically from `answer`, with that difference's clinical weight; None when there is none."""
    different = [(study, other) for study, other in candidates
                 if other.strip().lower() != answer.strip().lower()
                 and (choices or clinical_weight(answer, other) > WORDING_WEIGHT)]
    if not different:
        return None
    study, other = different[int(rng.integers(len(different)))]
    return study, clinical_weight(answer, other, choices)


def wrong_option_pairs(answer: str, choices: list[str], rng: np.random.Generator, n: int = 1) -> list[str]:
    """Up to `n` wrong options of a closed question (none for an open one)."""
    wrong = [c for c in choices if c.strip().lower() != answer.strip().lower()]
    if not wrong:
        return []
    picked = rng.choice(len(wrong), size=min(n, len(wrong)), replace=False)
    return [wrong[int(i)] for i in picked]


def noise_record(series: torch.Tensor, generator: torch.Generator, sigma: float = 1.0) -> torch.Tensor:
    """`series` (C, L) with Gaussian noise of `sigma` times each channel's own SD added everywhere: the region
    noised when the data localises no lesion (an ECG finding lives in the whole record), scaled per lead because
    records are in physical units (mV), not normalised."""
    scale = series.float().std(dim=-1, keepdim=True).clamp(min=1e-6).to(series.dtype)
    return series + sigma * scale * torch.randn(series.shape, generator=generator, dtype=series.dtype)


def noise_region(image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator, sigma: float = 1.0
                 ) -> torch.Tensor:
    """`image` (C, *spatial) with Gaussian noise of `sigma` added where `mask` (*spatial, bool) is set, and
    unchanged elsewhere (MMedPO's lesion-region noising; the images are normalised, so 1 is one SD)."""
    if mask.shape != image.shape[1:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not cover the image {tuple(image.shape)}")
    noise = sigma * torch.randn(image.shape, generator=generator, dtype=image.dtype)
    return torch.where(mask[None], image + noise, image)
