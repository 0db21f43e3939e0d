"""Synthetic errors in radiology reports: the taxonomy and rule-based injection into real report language.

The coarse types are the three kinds of mistake of Wu, Kim et al. 2023, "Exploring Multimodal Large Language
Models for Radiology Report Error-checking" (arXiv:2312.13103): insert, remove, substitute. Here an insertion adds
an unsupported finding sentence, a removal drops a positive finding sentence, a substitution replaces a word or
phrase.
The fine types under them follow error classes used for radiology report proofreading (negation, left/right,
interval change and transcription errors in arXiv:2504.04336; ReXErr, Rao et al. 2024, arXiv:2409.10829):

    substitute: negation_flip, laterality_swap, anatomical_location, severity_change, measurement_change,
                interval_change, device_change, typo_homophone
    insert:     finding_insertion, device_insertion, comparison_insertion, contradiction
    remove:     finding_omission, comparison_omission

The last four are ReXErr's "add medical device", "add comparison" and "add contradiction" and GREEN's "omitting
a comparison detailing a change from a prior study" (Ostmeier et al., arXiv:2405.03595). `inject_corpus` gives a
report one error, or with ``max_errors_per_report=K`` up to K of different types, as ReXErr samples up to 3.

Every rule edits only the findings and impression of a report (the whole text when it has no headers) and
records the exact spans, so ``modified == original[:a] + new + original[b:]`` with ``original_span == (a, b)``.
A report that offers no site for a type gives None: it is never changed in a way that is not the named error.

What no string match may find (checked by :mod:`mmclin.reports.audit`): `inject_corpus` inserts finding
sentences that other studies of the same corpus wrote (`finding_sentences`) and lets substitutions use only words
the corpus has (`CORPUS_WORD_TYPES`); severity and interval words change only where a finding is asserted (never
inside a negation), interval words only in reports with a prior study, and an omitted numbered item renumbers the
items after it.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from mmclin.errors import ConfigError
from mmclin.reports.sections import (
    MASK,
    SEVERITY_CLASS,
    SEVERITY_RANK,
    Report,
    body_regions,
    find_mentions,
    parse_sections,
    phrase_span,
    sentence_spans,
)

COARSE_TYPES = ("insert", "remove", "substitute")
FINE_TYPES: dict[str, str] = {
    "negation_flip": "substitute",
    "laterality_swap": "substitute",
    "anatomical_location": "substitute",
    "severity_change": "substitute",
    "measurement_change": "substitute",
    "interval_change": "substitute",
    "finding_insertion": "insert",
    "finding_omission": "remove",
    "device_change": "substitute",
    "typo_homophone": "substitute",
    "device_insertion": "insert",
    "comparison_insertion": "insert",
    "comparison_omission": "remove",
    "contradiction": "insert",
}
# Errors about what the image shows (presence, side, place, size, severity, device): a report can carry them and
# still agree with itself, and then only the image shows them. Interval changes need the prior study, typos none.
IMAGE_DEPENDENT_TYPES = ("negation_flip", "laterality_swap", "anatomical_location", "severity_change",
                         "measurement_change", "finding_insertion", "finding_omission", "device_change",
                         "device_insertion")

# Words of chest radiograph reports that a transcription typo may hit (checked by rules.RuleChecker too).
MEDICAL_VOCABULARY = frozenset("""
abdomen abdominal abnormal abnormality airspace alveolar anterior aortic apical arthritic atelectasis atelectatic
atherosclerotic bibasilar bilateral bronchial bronchiectasis bronchovascular calcification calcified calcific
callus cardiac cardiomediastinal cardiomegaly cardiopulmonary catheter cavitary cervical chronic clavicle
congestion consolidation consolidative contour costophrenic degenerative density diaphragm diaphragmatic
discrete effusion emphysema emphysematous endotracheal esophagus fissure fracture granuloma granulomatous
hemidiaphragm hemithorax hiatal hyperexpanded hyperinflated hyperinflation infiltrate interstitial jugular kyphosis
lateral lingula lingular lumbar mediastinal mediastinum nasogastric nodular nodule opacification opacity osseous
osteopenia osteophytes pacemaker parenchymal perihilar perineal peroneal pleura pleural pneumonia
pneumoperitoneum pneumothorax posterior pulmonary radiograph retrocardiac scoliosis silhouette sternotomy stomach
subclavian subcutaneous subsegmental thickening thoracic tortuous tortuosity trachea tracheostomy unremarkable
vascular vascularity vasculature vertebral ileum ilium parenchyma hemothorax osteophyte vertebrae arthritis
hilar hilum spondylosis thoracolumbar atherosclerosis cardiothoracic granulomata bronchiectatic
""".split())
# Other words of report prose: never taken for a typo of a MEDICAL_VOCABULARY word.
COMMON_REPORT_WORDS = frozenset("""
interval internal compared comparison previous normal limits within without identified visualized appear appears
appearance demonstrated present noted unchanged stable increased decreased improved worsened worsening improving
increasing decreasing change changes minimal mildly moderately severely markedly slightly slight patient portable
upright supine frontal projection single examination technique findings impression indication history clinical
status placement position positioned terminates courses overlying overlies projects projecting measuring measures
approximately likely possibly possible probably represent represents consistent concerning suggest suggesting
suspicious question questionable residual persistent persistently resolved resolution extensive marked moderate
severe patchy diffuse diffusely scattered streaky linear bandlike region regions middle superior inferior medial
exclude excluded definite definitely significant significantly otherwise additional further evaluation evaluate
assess follow recommend recommended correlation radiographic clearly expanded inflated inspiration expiration
volumes volume elevated elevation blunting blunted obscured obscuring silhouetting structures grossly overall
essentially relatively similar surgical clips median valve replacement device devices generator tubes catheters
drains junction atrium superior cavoatrial brachiocephalic appropriate standard location unclear unable limited
evidence acute active process disease minimally unremarkable calcifications granulomas nodules opacities lungs
mildly hyperlucent lucency lucent underlying adjacent partially partial component cardiomediastinum heart sized
density densities vertebral bodies height heights spurring spondylosis thoracolumbar degenerative arthritic
healing healed remote deformity deformities osteopenic""".split())
HOMOPHONES: dict[str, tuple[str, ...]] = {  # real-word confusions of transcription (speech recognition)
    # ("pleural" -> "plural" is left to the keystroke typos: one word repeated over a corpus is a marker)
    "ileum": ("ilium",), "ilium": ("ileum",), "perineal": ("peroneal",),
    "peroneal": ("perineal",), "discrete": ("discreet",), "callus": ("callous",),
}


def word_forms(words: frozenset[str] | set[str]) -> frozenset[str]:
    """The words with their regular inflections (effusion -> effusions, opacity -> opacities, ...)."""
    forms = set(words)
    for w in words:
        forms |= {w + "s", w + "es", w + "d", w + "ed"}
        if w.endswith("y"):
            forms.add(w[:-1] + "ies")
        if w.endswith("is"):
            forms.add(w[:-2] + "es")
    return frozenset(forms)


# Words that are not typos. Homophones are real words: the checker judges them by their context instead.
KNOWN_WORDS = word_forms(MEDICAL_VOCABULARY | COMMON_REPORT_WORDS | {w for v in HOMOPHONES.values() for w in v})
# A measurement: numbers (or a product "1.2 x 1.5") with a length unit.
MEASUREMENT = re.compile(r"(?<![\w.])(?P<nums>\d+(?:\.\d+)?(?:\s*(?:x|×|by)\s*\d+(?:\.\d+)?)*)\s*"
                         r"(?P<unit>mm|cm|millimeters?|centimeters?)\b", re.IGNORECASE)
UNIT_CM = {"mm": 0.1, "millimeter": 0.1, "millimeters": 0.1, "cm": 1.0, "centimeter": 1.0, "centimeters": 1.0}


@functools.cache
def english_words() -> frozenset[str]:
    """pyspellchecker's English word list (word frequencies of OpenSubtitles and Wiktionary)."""
    from spellchecker import SpellChecker

    return frozenset(SpellChecker(language="en").word_frequency.keys())


@dataclass(frozen=True)
class InjectedError:
    """One injected error: ``modified == original[:original_span[0]] + new + original[original_span[1]:]``."""

    fine_type: str
    coarse_type: str
    span: tuple[int, int]  # of `new` in the modified text (empty for a removal)
    original_span: tuple[int, int]  # of `original` in the original text (empty for an insertion)
    original: str
    new: str
    modified: str


@dataclass(frozen=True)
class _Edit:
    start: int
    end: int
    choices: tuple[str, ...]


def _cased(like: str, word: str) -> str:
    """`word` in the case of `like` (LEFT -> RIGHT, Left -> Right)."""
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _inside(regions: list[tuple[str, int, int]], start: int, end: int) -> bool:
    return any(lo <= start and end <= hi for _, lo, hi in regions)


def _word_edits(text: str, regions, pattern: re.Pattern, table: dict[str, tuple[str, ...]],
                keep: Callable[[re.Match], bool] = lambda m: True, literal: bool = False) -> list[_Edit]:
    """Replace group "w" of each match by the entries of `table` (keyed by its lower case)."""
    edits = []
    for m in pattern.finditer(text):
        start, end = m.span("w")
        if not _inside(regions, start, end) or not keep(m):
            continue
        key = re.sub(r"\s+", " ", m.group("w"))
        options = table.get(key) or table.get(key.lower())
        if options:
            edits.append(_Edit(start, end, tuple(o if literal else _cased(m.group("w"), o) for o in options)))
    return edits


# ------------------------------------------------------------------------------------------------ negation

_NEGATION_CUE = re.compile(r"\b(?:no|not|without|negative)\b", re.IGNORECASE)
_AFTER_THERE_IS = (r"(?:trace|tiny|small|minimal|mild|moderate|large|severe|marked|extensive|patchy|focal|new|"
                   r"persistent|bilateral|left|right|increased|decreased|" + "|".join(
                       ["(?:pleural\\s+)?effusions?", "pneumothorax", "consolidation", "opacit(?:y|ies)",
                        "atelectasis", "edema", "cardiomegaly", "nodules?", "mass", "fracture"]) + r")\b")


def _negation_sites(text: str, regions) -> list[_Edit]:
    edits = []
    # remove a negation: "There is no X" -> "There is X", "No X." -> "X.", "with no X" -> "with X"
    for m in re.finditer(r"\b(?P<no>no)\s+(?!longer\b|more\b)(?P<next>\w)", text, re.IGNORECASE):
        if m.group("no")[0].isupper():  # sentence start: the next word takes the capital
            edits.append(_Edit(m.start(), m.start("next") + 1, (m.group("next").upper(),)))
        else:
            edits.append(_Edit(m.start(), m.start("next"), ("",)))
    for pattern, swap in ((r"\b(?P<w>without)\b", "with"), (r"\b(?P<w>negative)\s+for\b", "positive"),
                          (r"\b(?P<w>positive)\s+for\b", "negative")):
        for m in re.finditer(pattern, text, re.IGNORECASE):
            edits.append(_Edit(*m.span("w"), (_cased(m.group("w"), swap),)))
    for m in re.finditer(r"\b(?:is|are|was|were)\s+(?P<w>not\s+)(?=(?:seen|identified|present|visualized|"
                         r"appreciated|demonstrated|evident|enlarged)\b)", text, re.IGNORECASE):
        edits.append(_Edit(*m.span("w"), ("",)))
    # add a negation: "There is a small effusion" -> "There is no small effusion", "is seen" -> "is not seen"
    for m in re.finditer(r"\bthere\s+(?:is|are)\s+(?:(?P<art>an?)\s+)?(?=" + _AFTER_THERE_IS + ")", text,
                         re.IGNORECASE):
        if m.group("art"):
            edits.append(_Edit(m.start("art"), m.end("art"), ("no",)))
        else:
            edits.append(_Edit(m.end(), m.end(), ("no ",)))
    for m in re.finditer(r"\b(?:is|are)\s+(?=(?:seen|present|identified|noted|demonstrated)\b)", text,
                         re.IGNORECASE):
        sentence = next((s for _, lo, hi in regions for s in sentence_spans(text, lo, hi)
                         if s[0] <= m.start() < s[1]), None)
        if sentence and not _NEGATION_CUE.search(text[sentence[0]:m.start()]):
            edits.append(_Edit(m.end(), m.end(), ("not ",)))
    return [e for e in edits if _inside(regions, e.start, e.end)]


# ----------------------------------------------------------------------------------- words swapped in place

_LATERALITY = re.compile(r"\b(?P<w>left|right)\b", re.IGNORECASE)
_ZONE_SWAP = {"upper": ("lower",), "lower": ("upper",), "middle": ("upper", "lower"), "apical": ("basilar", "basal"),
              "basilar": ("apical",), "basal": ("apical",), "apex": ("base",), "apices": ("bases",),
              "base": ("apex",), "bases": ("apices",), "anterior": ("posterior",), "posterior": ("anterior",)}
_ZONES = tuple(re.compile(p, re.IGNORECASE) for p in (
    r"\b(?P<w>upper|lower|middle)(?=\s+(?:(?:left|right)\s+)?(?:lobes?|zones?|lungs?|lung\s+(?:zones?|fields?)|"
    r"thoracic|lumbar|hemithorax|mediastinum)\b)",
    r"\b(?P<w>apical|basilar|basal)\b(?!\s+ganglia)", r"\b(?P<w>apex|apices)\b",
    r"\b(?:lung|left|right|both|the)\s+(?P<w>bases?)\b", r"\b(?P<w>anterior|posterior)\b"))
_SEVERITY_SWAP = {"trace": ("large",), "tiny": ("large",), "small": ("large", "moderate"),
                  "minimal": ("extensive", "moderate"), "mild": ("moderate", "severe"),
                  "mildly": ("moderately", "severely"), "moderate": ("mild", "severe"),
                  "moderately": ("mildly", "severely"), "large": ("small",), "severe": ("mild",),
                  "severely": ("mildly",), "marked": ("mild",), "markedly": ("mildly",), "extensive": ("minimal",)}
_SEVERITY = re.compile(r"\b(?P<w>" + "|".join(_SEVERITY_SWAP) + r")\b(?!\s+(?:bowel|intestine))", re.IGNORECASE)
# Replacements are words radiologists use often ("increased", "decreased"), so the edit leaves no rare word behind.
_INTERVAL_SWAP = {"new": ("unchanged", "stable"), "unchanged": ("increased", "decreased"),
                  "stable": ("increased", "decreased"), "increased": ("decreased", "stable"),
                  "decreased": ("increased", "stable"), "increasing": ("decreasing",),
                  "decreasing": ("increasing",), "increase": ("decrease",), "decrease": ("increase",),
                  "improved": ("increased",), "worsened": ("improved",), "improving": ("increasing",),
                  "worsening": ("improving",), "improvement": ("worsening",)}
_INTERVAL = re.compile(r"\b(?P<w>" + "|".join(_INTERVAL_SWAP) + r")\b", re.IGNORECASE)
# Devices and the device each may be mistaken for: always another kind of device (a tube of another tract, a
# catheter of another course, another access vein), never a synonym, a superclass or a subclass (a PICC is a
# central venous catheter; an AICD paces too).
_DEVICE_SWAP = {"endotracheal tube": ("nasogastric tube", "orogastric tube"),
                "nasogastric tube": ("endotracheal tube",), "orogastric tube": ("endotracheal tube",),
                "enteric tube": ("endotracheal tube",), "feeding tube": ("endotracheal tube",),
                "tracheostomy tube": ("nasogastric tube",), "chest tube": (), "ET tube": ("NG tube",),
                "NG tube": ("ET tube",), "OG tube": ("ET tube",), "PICC line": ("Swan-Ganz catheter",),
                "PICC": ("Swan-Ganz catheter",), "Swan-Ganz catheter": ("PICC",),
                "central venous catheter": ("Swan-Ganz catheter",),
                "internal jugular": ("subclavian",), "subclavian": ("internal jugular",),
                "pacemaker": ("defibrillator",), "defibrillator": (), "AICD": ()}
_DEVICE = re.compile(r"\b(?P<w>" + "|".join(re.escape(k).replace(r"\ ", r"\s+") for k in sorted(
    _DEVICE_SWAP, key=len, reverse=True)) + r")\b", re.IGNORECASE)
_DEVICE_KEYS = {k.lower(): k for k in _DEVICE_SWAP}
# Devices as reports name them (lines, tubes, cardiac devices, post-surgical material), for telling which devices a
# report has; the key is the lower-case name with its course ("ij catheter", "surgical clips").
_DEVICE_NAME = re.compile(
    r"\b(?:(?:left|right)[- ]sided\s+)?(?P<w>(?:(?:IJ|jugular|subclavian|femoral|tunneled|dialysis|central\s+venous|"
    r"indwelling|mediport|port-?a-?cath|Swan-Ganz|pulmonary\s+artery)\s+)?(?:catheter|line)|PICC(?:\s+line)?|"
    r"(?:endotracheal|tracheostomy|nasogastric|orogastric|enteric|feeding|chest|ET|NG|OG)\s+tube|Dobhoff|pacemaker|"
    r"pacer|AICD|defibrillator|cardiac\s+device|(?:monitor\s+)?leads|port|mediport|sternotomy(?:\s+wires)?|"
    r"(?:surgical|cholecystectomy|mediastinal)\s+clips|clips|stents?|drains?)\b", re.IGNORECASE)


def device_names(text: str) -> set[str]:
    """Keys of the devices `text` names (see _DEVICE_NAME)."""
    return {re.sub(r"\s+", " ", m.group("w")).lower() for m in _DEVICE_NAME.finditer(text)}


# Where a new device is plausible: a study that already has one, or an inpatient, intensive-care or post-operative
# one. An outpatient's normal film gets no endotracheal tube.
_DEVICE_CONTEXT = re.compile(
    r"\b(?:portable|supine|ICU|intensive\s+care|intubat\w*|ventilat\w*|post-?op\w*|s/p|status\s+post|"
    r"(?:line|tube|catheter)\s+placement|sternotomy|CABG|pacemaker|AICD|defibrillator|leads?|catheters?|lines|"
    r"tubes?|drains?|wires)\b", re.IGNORECASE)
_NO_DEVICES = re.compile(r"\bno\s+(?:\w+\s+)?(?:lines|tubes|devices|catheters)\b", re.IGNORECASE)
# A report of the chest: it speaks of lungs, heart, pleura or mediastinum (chest findings go into no other).
_CHEST = re.compile(r"\b(?:lungs?|heart|cardiac|cardiomediastinal|pleura|pleural|pneumothorax|effusions?|"
                    r"mediastin\w*|hil(?:ar|um|a))\b", re.IGNORECASE)


def chest_report(text: str) -> bool:
    """Findings or impression speak of the chest's organs (not only ribs, shoulder, spine or abdomen)."""
    return any(_CHEST.search(text, lo, hi) for _, lo, hi in body_regions(text))


def device_plausible(text: str) -> bool:
    """A device may be added to this study: it has a device or an inpatient / post-operative context, and does
    not say it has no lines or tubes."""
    return bool(_DEVICE_CONTEXT.search(text) or device_names(text)) and not _NO_DEVICES.search(text) and \
        chest_report(text)
_TIP_SWAP = {"superior vena cava": ("right atrium",), "svc": ("right atrium",),
             "cavoatrial junction": ("right atrium",), "right atrium": ("superior vena cava",),
             "stomach": ("esophagus",), "esophagus": ("stomach",),
             "above the carina": ("below the carina",), "below the carina": ("above the carina",)}
_TIP = re.compile(r"\b(?P<w>superior\s+vena\s+cava|SVC|cavoatrial\s+junction|right\s+atrium|stomach|esophagus|"
                  r"(?:above|below)\s+the\s+carina)\b", re.IGNORECASE)
_TIP_CONTEXT = re.compile(r"\b(?:tip|terminat\w*|ends?|projects?|positioned|position|courses?|extends?)\b",
                          re.IGNORECASE)


# Sides a structure does not have on the other side: the middle lobe is right, the lingula left; leads and lines end
# in the right heart chambers.
_ONE_SIDED = re.compile(r"\s+(?:middle\s+lobe|lingula|lingular|atri(?:um|al)|ventric\w*)\b", re.IGNORECASE)


def _laterality_sites(text: str, regions) -> list[_Edit]:
    return _word_edits(text, regions, _LATERALITY, {"left": ("right",), "right": ("left",)},
                       keep=lambda m: not _ONE_SIDED.match(text, m.end()))


# Pleural fluid lies where gravity puts it: the words of an effusion's phrase are not moved to the apex (nor is a
# lung zone's word moved into the abdomen, which a chest film does not show).


def _anatomy_sites(text: str, regions) -> list[_Edit]:
    fluid = [phrase_span(text, m) for m in find_mentions(text) if m.term == "effusion"]

    def possible(m: re.Match) -> bool:
        return not any(lo <= m.start() < hi for lo, hi in fluid)
    return [e for pattern in _ZONES for e in _word_edits(text, regions, pattern, _ZONE_SWAP, keep=possible)]


def _asserted_finding_at(text: str, mentions: list, pos: int) -> bool:
    """`pos` lies in a sentence that asserts a finding, and no negation cue precedes it in that sentence: a size
    or change word there qualifies something the report says is present ("No large effusion" is not such a site:
    "No small effusion" would be no error at all)."""
    for m in mentions:
        lo, hi = m.sentence
        if lo <= pos < hi and m.polarity == "asserted":
            return not _NEGATION_CUE.search(text, lo, pos)
    return False


def _severity_sites(text: str, regions) -> list[_Edit]:
    mentions = find_mentions(text)
    return _word_edits(text, regions, _SEVERITY, _SEVERITY_SWAP,
                       keep=lambda m: _asserted_finding_at(text, mentions, m.start()))


# A COMPARISON section that names no prior study (also read by rules.RuleChecker).
NO_PRIOR = re.compile(r"^\s*(?:none|no\s+prior|not\s+available|n/a)\b", re.IGNORECASE)


def has_comparison(text: str) -> bool:
    """The report names a prior study (a COMPARISON section that is not "None"), so an interval change can be
    stated at all."""
    comparison = parse_sections(text, headerless=None)["comparison"]
    return bool(comparison) and not NO_PRIOR.search(comparison)


def _interval_sites(text: str, regions) -> list[_Edit]:
    """Change words of sentences that assert an abnormal finding, in reports with a prior study: "worsened chest"
    or a change over a report without comparison is not an error a radiologist makes."""
    if not has_comparison(text):
        return []
    mentions = find_mentions(text)
    return _word_edits(text, regions, _INTERVAL, _INTERVAL_SWAP,
                       keep=lambda m: _asserted_finding_at(text, mentions, m.start()))


def _device_sites(text: str, regions) -> list[_Edit]:
    edits = []
    for m in _DEVICE.finditer(text):
        if not _inside(regions, *m.span("w")):
            continue
        key = _DEVICE_KEYS[re.sub(r"\s+", " ", m.group("w")).lower()]
        acronym = key.split()[0].isupper()  # "PICC", "ET tube": write the replacement as spelled
        if _DEVICE_SWAP[key]:
            edits.append(_Edit(*m.span("w"), tuple(o if acronym else _cased(m.group("w"), o)
                                                   for o in _DEVICE_SWAP[key])))
    for _, lo, hi in regions:
        for s, e in sentence_spans(text, lo, hi):
            if _TIP_CONTEXT.search(text, s, e):
                for m in _TIP.finditer(text, s, e):
                    word = m.group("w")
                    options = _TIP_SWAP[re.sub(r"\s+", " ", word).lower()]
                    edits.append(_Edit(*m.span("w"), options if word == "SVC" else tuple(_cased(word, o)
                                                                                           for o in options)))
    return edits


def _format_number(value: float) -> str:
    return f"{round(value, 2):g}"


def _measurement_sites(text: str, regions) -> list[_Edit]:
    edits = []
    for m in MEASUREMENT.finditer(text):
        if not _inside(regions, *m.span()):
            continue
        for num in re.finditer(r"\d+(?:\.\d+)?", m.group("nums")):
            value = float(num.group())
            choices = []
            for factor in (2, 3, 0.5, 10):
                new = _format_number(value * factor)
                if new != num.group() and float(new) > 0 and new not in choices:
                    choices.append(new)
            start = m.start("nums") + num.start()
            edits.append(_Edit(start, start + len(num.group()), tuple(choices)))
        unit = m.group("unit")
        swapped = re.sub("milli", "centi", unit.lower()) if unit.lower().startswith("milli") else (
            re.sub("centi", "milli", unit.lower()) if unit.lower().startswith("centi") else
            {"mm": "cm", "cm": "mm"}[unit.lower()])
        edits.append(_Edit(*m.span("unit"), (_cased(unit, swapped),)))
    return [e for e in edits if e.choices]


# --------------------------------------------------------------------------------------------------- typos

_KEYBOARD = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
_NEIGHBOURS = {c: "".join(row[j] for j in (i - 1, i + 1) if 0 <= j < len(row))
               for row in _KEYBOARD for i, c in enumerate(row)}


def typo_candidates(word: str) -> tuple[str, ...]:
    """Single-keystroke typos of `word` (adjacent swap, dropped, doubled or neighbouring key), first letter kept,
    that are not themselves words (of KNOWN_WORDS or the English dictionary: "pleural" never becomes "plural").
    Sorted, so a seeded choice among them is reproducible."""
    out = set()
    for i in range(1, len(word)):
        out.add(word[:i] + word[i + 1:])  # dropped
        out.add(word[:i] + word[i] + word[i:])  # doubled
        if i + 1 < len(word) and word[i] != word[i + 1]:
            out.add(word[:i] + word[i + 1] + word[i] + word[i + 2:])  # swapped
        for key in _NEIGHBOURS.get(word[i].lower(), ""):
            out.add(word[:i] + (key.upper() if word[i].isupper() else key) + word[i + 1:])
    english = english_words()
    return tuple(sorted(w for w in out if w.lower() not in KNOWN_WORDS and w.lower() not in english and w != word))


def _typo_sites(text: str, regions) -> list[_Edit]:
    edits = []
    for m in re.finditer(r"\b(?P<w>[A-Za-z]+)\b", text):
        word = m.group("w")
        if not _inside(regions, *m.span()) or (word.isupper() and len(word) > 1):
            continue
        lower = word.lower()
        if lower in HOMOPHONES:
            edits.append(_Edit(*m.span(), tuple(_cased(word, h) for h in HOMOPHONES[lower])))
        elif lower in MEDICAL_VOCABULARY and len(lower) >= 6:
            edits.append(_Edit(*m.span(), typo_candidates(word)))
    return edits


# ------------------------------------------------------------------------------------ sentences in and out

# Unsupported findings to insert: (term of FINDING_PATTERNS, sentence). A template is used only where the
# report does not already assert that finding, so the inserted sentence is new information.
INSERTION_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("effusion", "There is a small right pleural effusion."),
    ("effusion", "Small left pleural effusion is present."),
    ("pneumothorax", "There is a small left apical pneumothorax."),
    ("pneumothorax", "A tiny right apical pneumothorax is noted."),
    ("consolidation", "Patchy consolidation is present in the right lower lobe."),
    ("opacity", "There is a patchy opacity in the left lower lobe."),
    ("edema", "There is mild pulmonary edema."),
    ("cardiomegaly", "Moderate cardiomegaly is present."),
    ("nodule", "A 1.2 cm nodule is seen in the right upper lobe."),
    ("atelectasis", "Mild bibasilar atelectasis is seen."),
    ("fracture", "There is an acute fracture of the left seventh rib."),
    ("mass", "There is a 3.5 cm mass in the right hilum."),
)


def finding_sentences(reports: Sequence[Report]) -> list[tuple[str, str, str]]:
    """(report id, finding term, sentence) of every sentence that asserts exactly one finding and says nothing
    else: no negation, hedge or change word, no anonymisation token ("XXXX"), no list number, at most 16 words.
    These are what `inject_corpus` inserts into other studies, so an insertion reads like the corpus itself."""
    pool = []
    for report in reports:
        mentions = find_mentions(report.text)
        for _, lo, hi in body_regions(report.text):
            for span in sentence_spans(report.text, lo, hi):
                inside = [m for m in mentions if m.sentence == span]
                sentence = report.text[slice(*span)]
                if (len(inside) == 1 and inside[0].polarity == "asserted" and not inside[0].interval
                        and sentence.endswith(".") and len(sentence.split()) <= 16 and "XXXX" not in sentence
                        and not _ITEM_NUMBER.match(sentence) and not _NEGATION_CUE.search(sentence)
                        and not _INTERVAL.search(sentence) and not COMPARISON_WORDS.search(sentence)):
                    pool.append((report.id, inside[0].term, sentence))
    return pool


def _insertion_sites(text: str, regions, pool: Sequence[tuple[str, str]] | None = None) -> list[_Edit]:
    """Before any sentence of the findings, or after the last, in a report of the chest: a finding sentence of
    `pool` ((term, sentence) pairs; default INSERTION_TEMPLATES) whose finding the report does not speak of (one
    it negates would make a contradiction, the type of its own). Repeats are kept, so a sentence is drawn as often
    as the corpus writes it and the inserted words follow the corpus's own frequencies."""
    if not chest_report(text):
        return []
    spoken = {m.term for m in find_mentions(text) if m.polarity in ("asserted", "negated")}
    sentences = tuple(s for term, s in (INSERTION_TEMPLATES if pool is None else pool) if term not in spoken)
    return _between_sentences(text, regions, sentences)


_ITEM_NUMBER = re.compile(r"(?P<n>\d{1,2})(?P<dot>[.)])\s")


# Sentences that other corpora of the same layout write, for a corpus too small to lend its own (fewer than
# MIN_POOL distinct sentences of a kind): used as the pools of `corpus_sentences`.
MIN_POOL = 10
SENTENCE_TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "device": (("endotracheal tube", "Endotracheal tube tip is 4 cm above the carina."),
               ("PICC", "Right PICC with tip in the SVC."),
               ("nasogastric tube", "Nasogastric tube tip projects over the stomach."),
               ("pacemaker", "Left-sided pacemaker with leads in the right atrium and right ventricle.")),
    "comparison": (),  # none: a stock comparison sentence is a marker; the appended changes stay
    "change": tuple(("", change) for change in (", unchanged", ", stable compared to prior",
                                                ", new since the prior study", ", increased from prior",
                                                ", decreased from prior")),
    "negation": tuple((term, f"No {name}.") for term, name in (
        ("effusion", "pleural effusion"), ("pneumothorax", "pneumothorax"), ("consolidation", "focal consolidation"),
        ("edema", "pulmonary edema"), ("cardiomegaly", "cardiomegaly"), ("nodule", "pulmonary nodule"),
        ("atelectasis", "atelectasis"), ("opacity", "focal opacity"), ("fracture", "acute fracture"))),
}
# Words that compare with a prior study.
COMPARISON_WORDS = re.compile(r"\b(?:no\s+change|unchanged|stable|improved|improving|worsened|worsening|interval|again|"
                              r"redemonstrat\w*|previously|prior|compared|since|new|similar)\b", re.IGNORECASE)


def _plain(sentence: str) -> bool:
    """A sentence fit to be lent to another report: ends with a period, at most 16 words, no anonymisation
    token, no list number."""
    return (sentence.endswith(".") and len(sentence.split()) <= 16 and "XXXX" not in sentence
            and not _ITEM_NUMBER.match(sentence))


def corpus_sentences(reports: Sequence[Report]) -> dict[str, list[tuple[str, str, str]]]:
    """(report id, key, sentence) of the sentences of a corpus that `inject_corpus` lends to other studies:

    - ``finding``: asserts exactly one finding (key: its term) and nothing else (`finding_sentences`);
    - ``negation``: negates exactly one finding (key: its term) and asserts none ("No pleural effusion.");
    - ``device``: names a device (key: a name of `device_names`) and no finding, with no change word ("Right PICC
      with tip in the SVC.");
    - ``comparison``: compares with a prior study and says nothing else (`only_comparison`: "No interval change.");
    - ``change``: a change appended to a finding in a report with a prior study (", unchanged from prior exam").

    A kind with fewer than MIN_POOL distinct sentences falls back to SENTENCE_TEMPLATES (report id ""); for
    comparisons there is none, and a comparison is then only appended to a finding sentence.
    """
    pools: dict[str, list[tuple[str, str, str]]] = {"finding": finding_sentences(reports), "negation": [],
                                                     "device": [], "comparison": [], "change": []}
    for report in reports:
        if has_comparison(report.text):
            pools["change"] += [(report.id, "", m.group()) for _, lo, hi in body_regions(report.text)
                                for m in _TRAILING_CHANGE.finditer(report.text, lo, hi)
                                if "\n" not in m.group() and only_comparison(m.group())]
        mentions = find_mentions(report.text)
        for _, lo, hi in body_regions(report.text):
            for span in sentence_spans(report.text, lo, hi):
                sentence = report.text[slice(*span)]
                if not _plain(sentence):
                    continue
                inside = [m for m in mentions if m.sentence == span]
                device = device_names(sentence)
                if device and not COMPARISON_WORDS.search(sentence) and not inside:
                    pools["device"].append((report.id, min(device), sentence))
                elif len({m.term for m in inside}) == 1 and all(m.polarity == "negated" for m in inside) and \
                        not COMPARISON_WORDS.search(sentence) and _NEGATION_CUE.match(sentence):
                    pools["negation"].append((report.id, inside[0].term, sentence))
                elif has_comparison(report.text) and only_comparison(sentence) and not device:
                    pools["comparison"].append((report.id, "", sentence))
    for kind, templates in SENTENCE_TEMPLATES.items():
        if len({sentence for _, _, sentence in pools[kind]}) < MIN_POOL:
            pools[kind] = [("", key, sentence) for key, sentence in templates]
    return pools


def _topics(sentence: str) -> set[str]:
    """What a sentence speaks of: its finding terms, "comparison" and the devices it names."""
    topics = {m.term for m in find_mentions(sentence)}
    topics |= {"comparison"} if COMPARISON_WORDS.search(sentence) else set()
    return topics | device_names(sentence)


def _between_sentences(text: str, regions, sentences: Sequence[str], sections=("findings",)) -> list[_Edit]:
    """Before any sentence of the named sections (all regions when the report has none of them) that is no list
    item, or after the last: each of `sentences` that does not speak of what a neighbouring sentence speaks of (an
    insertion that restates or answers its neighbour reads as written twice)."""
    if not sentences:
        return []
    topics = {x: _topics(x) for x in sentences}
    edits = []
    for _, lo, hi in [r for r in regions if r[0] in sections] or regions:
        spans = sentence_spans(text, lo, hi)
        near = [_topics(text[a:b]) for a, b in spans]
        for i, (s, _) in enumerate(spans + [(spans[-1][1], None)] if spans else []):
            last = i == len(spans)
            if _ITEM_NUMBER.match(text, spans[min(i, len(spans) - 1)][0]) or \
                    last and text[s - 1] not in ".!?":
                continue
            around = (near[i - 1] if i else set()) | (near[i] if not last else set())
            fits = tuple(f" {x}" if last else f"{x} " for x in sentences if not topics[x] & around)
            if fits:
                edits.append(_Edit(s, s, fits))
    return edits


def _device_insertion_sites(text: str, regions, pool: Sequence[tuple[str, str]]) -> list[_Edit]:
    """A device sentence of another study, of a device the report does not name, where a device is plausible
    (`device_plausible`)."""
    if not device_plausible(text):
        return []
    named = device_names(text)
    return _between_sentences(text, regions, tuple(s for _, s in pool if not device_names(s) & named))


def _comparison_insertion_sites(text: str, regions, pool: Sequence[tuple[str, str]],
                                changes: Sequence[tuple[str, str]]) -> list[_Edit]:
    """A comparison with a prior study in a report whose COMPARISON says there is none ("None."; a report without
    the section may have had one): another study's comparison sentence (`pool`), or a change as other studies
    append one (`changes`) after a sentence that asserts a finding ("Small left effusion, unchanged.")."""
    comparison = parse_sections(text, headerless=None)["comparison"]
    if not comparison or not NO_PRIOR.search(comparison):
        return []
    edits = _between_sentences(text, regions, tuple(s for _, s in pool), sections=("findings", "impression"))
    changes = tuple(dict.fromkeys(change for _, change in changes))
    mentions = find_mentions(text)
    for m in mentions:
        s, e = m.sentence
        if m.polarity == "asserted" and not m.interval and text[e - 1] == "." and _inside(regions, s, e) and \
                not COMPARISON_WORDS.search(text, s, e) and not _NEGATION_CUE.search(text, s, e):
            edits.append(_Edit(e - 1, e - 1, changes))
    return edits

# A change stated at the end of a sentence: "..., unchanged." "..., increased in size since the prior study."
_TRAILING_CHANGE = re.compile(r",\s*(?:(?:which\s+is|now)\s+)?(?:unchanged|stable|increased|decreased|improved|"
                              r"worsened|new|slightly\s+\w+|mildly\s+\w+)\b[^.;,]*(?=\.)", re.IGNORECASE)


# Words of a sentence that only compares ("No significant interval change in the appearance of the chest.").
_COMPARISON_ONLY_WORDS = frozenset("""
no not any significant appreciable definite interval change changes changed unchanged stable similar since prior
previous study studies exam examination film films radiograph radiographs comparison compared to with from the a an
of in is are has have been there overall appearance chest findings again essentially grossly otherwise
""".split())


def only_comparison(sentence: str) -> bool:
    """The sentence compares with a prior study and says nothing else (no finding, structure or device), so
    leaving it out omits a comparison, not a finding."""
    words = re.findall(r"[a-z]+", MASK.sub(" ", sentence.lower()))
    return bool(COMPARISON_WORDS.search(sentence)) and all(w in _COMPARISON_ONLY_WORDS for w in words)


def _comparison_omission_sites(text: str, regions) -> list[_Edit]:
    """In a report with a prior study: the change a sentence states about a finding ("..., increased in size")
    or a sentence that only compares ("No interval change."), left out."""
    if not has_comparison(text):
        return []
    mentions = find_mentions(text)
    edits = []
    for _, lo, hi in regions:
        spans = sentence_spans(text, lo, hi)
        for i, (s, e) in enumerate(spans):
            inside = [m for m in mentions if m.sentence == (s, e)]
            if any(m.polarity == "asserted" for m in inside):
                edits += [_Edit(*m.span(), ("",)) for m in _TRAILING_CHANGE.finditer(text, s, e)]
            elif COMPARISON_WORDS.search(text, s, e) and len(spans) >= 2 and not _ITEM_NUMBER.match(text, s) \
                    and only_comparison(text[s:e]):
                edits.append(_Edit(spans[i - 1][1], e, ("",)) if i + 1 == len(spans)
                             else _Edit(s, spans[i + 1][0], ("",)))
    return edits


def _contradiction_sites(text: str, regions, pools: dict[str, Sequence[tuple[str, str]]]) -> list[_Edit]:
    """A sentence that says the opposite of one the report makes: "No pleural effusion." where an effusion is
    asserted, or another study's sentence asserting a finding the report negates without side or size."""
    mentions = [m for m in find_mentions(text) if not m.masked]
    asserted = {m.term for m in mentions if m.polarity == "asserted"}
    negated = {m.term for m in mentions if m.polarity == "negated" and not m.sides and not m.severity} - asserted
    sentences = tuple(s for term, s in pools["negation"] if term in asserted - negated)
    sentences += tuple(s for term, s in pools["finding"] if term in negated)
    return _between_sentences(text, regions, sentences, sections=("findings", "impression"))


def _renumbered(text: str, start: int, end: int, first: int) -> str:
    """``text[start:end]`` with the list numbers that open its sentences counted down from `first`."""
    out, cursor, number = [], start, first
    for s, _ in sentence_spans(text, start, end):
        m = _ITEM_NUMBER.match(text, s)
        if m:
            out += [text[cursor:m.start("n")], str(number)]
            cursor, number = m.end("n"), number + 1
    return "".join(out) + text[cursor:end]


def _omission_sites(text: str, regions) -> list[_Edit]:
    mentions = find_mentions(text)
    edits = []
    for _, lo, hi in regions:
        spans = sentence_spans(text, lo, hi)
        if len(spans) < 2:  # the section keeps at least one sentence
            continue
        for i, (s, e) in enumerate(spans):
            inside = [m for m in mentions if m.sentence == (s, e)]
            if any(m.polarity == "asserted" for m in inside) and not any(
                    m.polarity in ("negated", "weak") for m in inside):
                item = _ITEM_NUMBER.match(text, s)
                if i + 1 == len(spans):  # the last sentence: take the white space before it
                    edits.append(_Edit(spans[i - 1][1], e, ("",)))
                elif item:  # "1. A. 2. B. 3. C." without 2. -> "1. A. 2. C.": the items after it move up
                    edits.append(_Edit(s, hi, (_renumbered(text, spans[i + 1][0], hi, int(item.group("n"))),)))
                else:  # take the white space after the sentence
                    edits.append(_Edit(s, spans[i + 1][0], ("",)))
    return edits


_SITES: dict[str, Callable[[str, list], list[_Edit]]] = {
    "negation_flip": _negation_sites,
    "laterality_swap": _laterality_sites,
    "anatomical_location": _anatomy_sites,
    "severity_change": _severity_sites,
    "measurement_change": _measurement_sites,
    "interval_change": _interval_sites,
    "finding_insertion": _insertion_sites,
    "finding_omission": _omission_sites,
    "device_change": _device_sites,
    "typo_homophone": _typo_sites,
    "comparison_omission": _comparison_omission_sites,
}


# Errors whose new words must be words of the corpus when a vocabulary is given: a word the corpus never uses
# ("Swan-Ganz" or "endotracheal" in an outpatient corpus, "below the carina") would mark the edit for a string
# match. Typos are new words by nature; measurements change numbers.
CORPUS_WORD_TYPES = ("negation_flip", "laterality_swap", "anatomical_location", "severity_change",
                     "interval_change", "device_change", "finding_insertion", "device_insertion",
                     "comparison_insertion", "contradiction")


def report_words(text: str) -> set[str]:
    """The lower-case words of a text (letters only), as the corpus vocabulary and the shortcut audit see them."""
    return set(re.findall(r"[a-z]+", text.lower()))


def error_sites(report_text: str, fine_type: str, insertions: Sequence[tuple[str, str]] | None = None,
                vocabulary: frozenset[str] | None = None,
                pools: dict[str, Sequence[tuple[str, str]]] | None = None) -> list[tuple[int, int, tuple[str, ...]]]:
    """Every (start, end, replacements) where `fine_type` could be injected, in text order.

    Args:
        report_text: the report.
        fine_type: a key of FINE_TYPES.
        insertions: (finding term, sentence) pairs a finding insertion draws from (default: ``pools["finding"]``,
            else INSERTION_TEMPLATES).
        vocabulary: words of the corpus; given, a substitution of CORPUS_WORD_TYPES keeps only the replacements
            made of them, and a site left with none is no site.
        pools: (key, sentence) pairs per kind of `corpus_sentences` (finding, negation, device, comparison) that
            the insertions draw from; a kind not given uses SENTENCE_TEMPLATES.
    """
    if fine_type not in FINE_TYPES:
        raise ConfigError(f"unknown error type {fine_type!r}; choose one of {list(FINE_TYPES)}")
    pools = {kind: [(key, sentence) for key, sentence in templates] for kind, templates in
             SENTENCE_TEMPLATES.items()} | dict(pools or {})
    if insertions is None:
        insertions = pools.get("finding")
    pools["finding"] = list(INSERTION_TEMPLATES if insertions is None else insertions)
    regions = body_regions(report_text)
    if fine_type == "finding_insertion":
        found = _insertion_sites(report_text, regions, pools["finding"])
    elif fine_type == "device_insertion":
        found = _device_insertion_sites(report_text, regions, pools["device"])
    elif fine_type == "comparison_insertion":
        found = _comparison_insertion_sites(report_text, regions, pools["comparison"], pools["change"])
    elif fine_type == "contradiction":
        found = _contradiction_sites(report_text, regions, pools)
    else:
        found = _SITES[fine_type](report_text, regions)
    sites = {(e.start, e.end, e.choices) for e in found}
    if vocabulary is not None and fine_type in CORPUS_WORD_TYPES:
        sites = {(a, b, kept) for a, b, choices in sites
                 if (kept := tuple(c for c in choices if report_words(c) <= vocabulary))}
    return sorted(sites)


def inject(report_text: str, fine_type: str, rng: np.random.Generator | int,
           insertions: Sequence[tuple[str, str]] | None = None,
           vocabulary: frozenset[str] | None = None,
           pools: dict[str, Sequence[tuple[str, str]]] | None = None,
           avoid: Sequence[tuple[int, int]] = (),
           site_odds: Callable[[str], float] | None = None) -> InjectedError | None:
    """Inject one error of `fine_type` at a site drawn with `rng`; None when the report offers no site.

    Args:
        report_text: the report (findings and impression are edited; the whole text when it has no headers).
        fine_type: a key of FINE_TYPES.
        rng: numpy Generator (or a seed) that picks the site and the replacement.
        insertions, vocabulary, pools: see :func:`error_sites`.
        avoid: spans of earlier errors in `report_text`; a site touching one is no site.
        site_odds: maps the text a site would replace to the chance (0-1) that the site is kept.
    """
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    sites = [(a, b, c) for a, b, c in error_sites(report_text, fine_type, insertions, vocabulary, pools)
             if not any(a <= hi and lo <= b for lo, hi in avoid)]
    if site_odds is not None:
        sites = [(a, b, c) for a, b, c in sites if rng.random() < site_odds(report_text[a:b])]
    if not sites:
        return None
    start, end, choices = sites[int(rng.integers(len(sites)))]
    new = choices[int(rng.integers(len(choices)))]
    modified = report_text[:start] + new + report_text[end:]
    return InjectedError(fine_type=fine_type, coarse_type=FINE_TYPES[fine_type], span=(start, start + len(new)),
                         original_span=(start, end), original=report_text[start:end], new=new, modified=modified)


def severity_odds(counts: Counter) -> Callable[[str], float]:
    """Chance to keep a severity site, by the class of its word (SEVERITY_CLASS of sections): the square root of
    the rarest class's count over the word's class count in the corpus (document frequencies `counts`). Most
    findings are mild, so without it nearly every change goes mild -> moderate and the added "moderate" gives the
    error away; with it changes from the rarer classes are drawn more often."""
    per_class: Counter = Counter()
    for word, rank in SEVERITY_RANK.items():
        per_class[SEVERITY_CLASS[rank]] += counts.get(word, 0)
    rarest = min(per_class.values())

    def odds(word: str) -> float:
        rank = SEVERITY_RANK.get(word.lower())
        return 1.0 if rank is None or not per_class[SEVERITY_CLASS[rank]] else \
            (max(rarest, 1) / per_class[SEVERITY_CLASS[rank]]) ** 0.5
    return odds


def _error_fields(error: InjectedError, span: tuple[int, int], original_span: tuple[int, int]) -> dict:
    return {"fine_type": error.fine_type, "coarse_type": error.coarse_type, "span": list(span),
            "original_span": list(original_span), "original_text": error.original, "new_text": error.new}


def inject_corpus(reports: Sequence[Report], error_rate: float = 0.5, seed: int = 0,
                  types: Sequence[str] | None = None, progress: bool = False,
                  max_errors_per_report: int = 1) -> list[dict]:
    """Give a seeded share of the reports synthetic errors, balancing the fine types.

    ``round(error_rate * len(reports))`` reports are drawn for an error; each gets a number of errors drawn
    uniformly from 1..`max_errors_per_report`, of different types and at sites that do not touch. Each error takes
    the type used least so far (ties in a seeded order, i.e. cycling through the types); a type with no site in
    that report is recorded in the report's ``no_site`` list and the next type is tried. A report with no site
    for any type stays clean.

    Returns:
        One dict per report, in input order: id, original, modified, has_error, coarse_type, fine_type,
        span (in modified), original_span, original_text, new_text (of the first error), errors (every error with
        those six fields, spans in the final modified and the original text), no_site, images, split.
        Error-free reports have modified == original, None for the error fields and no errors. `corpus_summary`
        counts them.
    """
    types = list(FINE_TYPES) if types is None else list(types)
    unknown = [t for t in types if t not in FINE_TYPES]
    if unknown or not types:
        raise ConfigError(f"unknown error type(s) {unknown or types}; choose among {list(FINE_TYPES)}")
    if not 0 <= error_rate <= 1:
        raise ConfigError(f"error_rate must be in [0, 1], got {error_rate}")
    if max_errors_per_report < 1:
        raise ConfigError(f"max_errors_per_report must be 1 or more, got {max_errors_per_report}")
    rng = np.random.default_rng(seed)
    # insertions come from other studies' sentences (at least MIN_POOL distinct ones per kind; else templates;
    # at least 20 for findings, else INSERTION_TEMPLATES)
    pools = corpus_sentences(reports)
    if len({sentence for _, _, sentence in pools["finding"]}) < 20:
        pools["finding"] = [("", term, sentence) for term, sentence in INSERTION_TEMPLATES]
    # substitutions use words the corpus already has (in at least 3 reports), so they add no new word
    counts = Counter(w for report in reports for w in report_words(report.text))
    vocabulary = frozenset(w for w, n in counts.items() if n >= 3)
    odds = severity_odds(counts)
    with_error = set(rng.permutation(len(reports))[:round(error_rate * len(reports))].tolist())
    order = [types[i] for i in rng.permutation(len(types))]
    used: Counter = Counter()
    records = []
    for i, report in enumerate(tqdm(reports, desc="inject", unit="report", disable=not progress)):
        record = {"id": report.id, "original": report.text, "modified": report.text, "has_error": False,
                  "coarse_type": None, "fine_type": None, "span": None, "original_span": None,
                  "original_text": None, "new_text": None, "errors": [], "no_site": [],
                  "images": list(report.images), "split": report.split, "mesh": list(report.mesh)}
        if i in with_error:
            others = {kind: [(key, sentence) for other, key, sentence in pool if other != report.id]
                      for kind, pool in pools.items()}
            n_errors = int(rng.integers(1, max_errors_per_report + 1))
            text, done = report.text, []  # done: (error, span in text, original span)
            for fine_type in sorted(order, key=lambda t: (used[t], order.index(t))):
                if len(done) == n_errors:
                    break
                error = inject(text, fine_type, rng, vocabulary=vocabulary, pools=others,
                               avoid=[span for _, span, _ in done],
                               site_odds=odds if fine_type == "severity_change" else None)
                if error is None:
                    if not done:
                        record["no_site"].append(fine_type)
                    continue
                used[fine_type] += 1
                (a, b), shift = error.original_span, len(error.new) - (error.original_span[1] -
                                                                        error.original_span[0])
                before = sum(len(e.new) - (o[1] - o[0]) for e, span, o in done if span[1] <= a)
                done = [(e, (lo + shift, hi + shift) if lo >= b else (lo, hi), o) for e, (lo, hi), o in done]
                done.append((error, error.span, (a - before, b - before)))
                text = error.modified
            if done:
                errors = [_error_fields(e, span, o) for e, span, o in done]
                record.update(modified=text, has_error=True, errors=errors, **errors[0])
        records.append(record)
    return records


def corpus_summary(records: Sequence[dict]) -> dict:
    """Counts of an injected corpus: per fine and coarse type, errors injected and reports with no site."""
    per_type = {t: {"coarse_type": c, "injected": 0, "no_site": 0} for t, c in FINE_TYPES.items()}
    for r in records:
        if r["has_error"]:
            per_type[r["fine_type"]]["injected"] += 1
        for t in r.get("no_site", []):
            per_type[t]["no_site"] += 1
    per_coarse = {c: sum(v["injected"] for v in per_type.values() if v["coarse_type"] == c) for c in COARSE_TYPES}
    n_error = sum(bool(r["has_error"]) for r in records)
    return {"n_reports": len(records), "n_with_error": n_error, "n_clean": len(records) - n_error,
            "n_without_any_site": sum(not r["has_error"] and bool(r.get("no_site")) for r in records),
            "per_type": per_type, "per_coarse_type": per_coarse}
