"""A rule-based report error checker: what a report contradicts in itself, without looking at the image.

It reads the findings and impression with `find_mentions` and looks for internal contradictions: a finding
both negated and asserted, the finding on the other side or in another zone, with another size or interval
change in the impression than in the findings, a normal impression over positive findings, an impression
finding that the findings never mention, implausible measurements, a device with a tip where that device
cannot be, and non-words one keystroke away from a medical word. Errors that only the image can reveal (a
laterality swap made consistently, an inserted finding nothing contradicts) pass it unseen: it is the
text-only baseline that multimodal checkers (Wu, Kim et al. 2023, arXiv:2312.13103) must beat.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from mmclin.reports.injection import (
    COMPARISON_WORDS,
    FINE_TYPES,
    KNOWN_WORDS,
    MEASUREMENT,
    MEDICAL_VOCABULARY,
    NO_PRIOR,
    UNIT_CM,
    english_words,
    only_comparison,
)
from mmclin.reports.sections import (
    _HEART,
    _RECOMMENDATION,
    ACUTE_FINDINGS,
    FINDING_FAMILY,
    MASK,
    SEVERITY_CLASS,
    Mention,
    body_regions,
    find_mentions,
    parse_sections,
    sentence_spans,
)

_NORMAL_IMPRESSION = re.compile(
    r"\bno\s+(?:acute|active|evidence\s+of\s+(?:acute|active))\s+(?:\w+\s+){0,2}?(?:process|disease|abnormality|"
    r"abnormalities|findings?|pathology)\b|\bnormal\s+(?:chest|radiograph|study|examination|exam)\b|"
    r"^\s*(?:negative|normal)\b", re.IGNORECASE)
# The stock phrase "no acute cardiopulmonary process" with its generic words only: "acute airspace disease" names one.
_GENERIC_DISEASE = re.compile(r"\b(?:acute|active)\s+(?:(?:cardiopulmonary|cardiac|pulmonary|intrathoracic|thoracic|"
                              r"osseous|bony|skeletal|chest|radiographic|lung|bone|or|and|chronic)\s+){0,3}?(?:process|"
                              r"disease|abnormality|abnormalities|findings?|pathology)\b", re.IGNORECASE)
_HEDGE = re.compile(r"\b(?:may|might|could|possibl[ey]|probabl[ey]|likely|questionable|suspicious|concern\w*|"
                    r"versus|vs|differential|secondary\s+to|suggest\w*|worrisome|favou?r\w*)\b", re.IGNORECASE)
# A finding called old, stable or explained away ("blunting ..., unchanged, may be secondary to scarring").
_CHRONIC = re.compile(r"\b(?:unchanged|stable|chronic|scar|scarring|old|healed|remote|calcified|thickening)\b",
                      re.IGNORECASE)
# Qualifier scope: "no suspicious nodules" / "no acute fracture" / "no focal consolidation" say nothing against
# "calcified nodules" / "healed rib fractures" / "streaky basilar opacities".
_RESTRICTED_NEGATION = re.compile(r"\b(?:suspicious|infectious|acute|new|displaced|dominant|discrete|confluent|"
                                  r"definite|lobar|focal|large|significant|worrisome|pulmonary|non-?calcified|"
                                  r"resolution|resolved|near)\b", re.IGNORECASE)
_CHRONIC_OR_DIFFUSE = re.compile(r"\b(?:calcified|calcific|granulomatous|granulomas?|chronic|old|healed|healing|remote|"
                                 r"scarring|scar|streaky|linear|interstitial|diffuse|reticular|subsegmental|discoid|"
                                 r"plate-?like|nondisplaced|non-displaced|stable|known|bibasilar|bilateral|prominent|"
                                 r"markings|sternotomy|wires?|leads?|hardware|residual|trace|minimal|persists?)\b",
                                 re.IGNORECASE)
_NEGATION = re.compile(r"\b(?:no|not|without|negative)\b", re.IGNORECASE)
# Words that can only compare with a prior study. Not on their own: "stable" and "unchanged" ("stable mediastinal
# contours" is stock phrasing of reports without a comparison), "prior"/"previous" of history or surgery ("prior
# granulomatous disease", "previous CABG"), "compared to the left" (within the study), "increased"/"decreased"
# ("increased interstitial markings", "decreased lung volumes").
# (radiographs: a prior CT or another body part's study may be quoted in a report without a comparison radiograph)
_STUDY = r"(?:stud(?:y|ies)|exams?|examinations?|films?|radiographs?|x-?rays?|images?|chest|comparisons?|one)"
_CHANGE_OVER_TIME = re.compile(
    r"\b(?:(?:compared|comparison)\s+(?:to|with)|relative\s+to|since|from|than|on|as\s+of|versus)\s+(?:the\s+|a\s+)?"
    r"(?:most\s+recent\s+|recent\s+|last\s+)?(?:prior|previous|earlier|preceding)(?:\s+(?:[\w-]+\s+)?" + _STUDY +
    r"\b|\s*[.,;]|\s*$)|"
    r"\b(?:prior|previous|earlier)\s+" + _STUDY + r"\b|\bsince\s+(?:the\s+)?(?:last|XXXX|\d)|"
    r"\bin\s+the\s+interval\b|\binterval(?:ly)?\s+(?:\w+\s+)?(?:change|increase|decrease|development|improvement|"
    r"worsening|resolution|enlargement|placement|removal|progression|growth|appearance|clearing|\w+ed)\b|"
    r"\bagain\s+(?:\w+\s+)?(?:seen|noted|demonstrated|identified|visualized|visible|evident)\b|\bredemonstrat\w*|"
    r"\bpreviously\s+(?:seen|noted|described|demonstrated|identified|visualized|reported)\b|"
    r"\bno\s+(?:significant\s+|appreciable\s+|definite\s+)?(?:interval\s+)?change\b|"
    r"\b(?:has|have)\s+(?:\w+\s+)?(?:resolved|cleared|improved|worsened|progressed|decreased|increased)\b|"
    r",\s*(?:unchanged|stable)\s*\.?\s*$", re.IGNORECASE)
# Sentences that may speak of a prior study without comparing with one.
_NO_COMPARISON = re.compile(r"\b(?:absence|without|lack)\s+of\s+(?:a\s+)?(?:prior|previous|comparison)|"
                            r"\bno\s+(?:prior|previous|comparison)\s+" + _STUDY + r"?|\bnot\s+available\b",
                            re.IGNORECASE)
_NO_CHANGE = re.compile(r"\bno\s+(?:\w+\s+){0,2}?change\b|\bunchanged\b|\bstable\b", re.IGNORECASE)
_INTERVAL_CONFLICTS = {frozenset(p) for p in (("same", "up"), ("same", "down"), ("same", "new"), ("up", "down"),
                                              ("new", "down"))}
# No left middle lobe; the lingula belongs to the left upper lobe.
_IMPOSSIBLE_SIDE = re.compile(r"\bleft\s+middle\s+lobe\b|\bright\s+(?:lingula|lingular)\b", re.IGNORECASE)
_DEVICES = {
    "airway": re.compile(r"\b(?:endotracheal|ET\s+tube|ETT|tracheostomy)\b", re.IGNORECASE),
    "gastric": re.compile(r"\b(?:nasogastric|orogastric|NG\s+tube|OG\s+tube|enteric\s+tube|feeding\s+tube|"
                          r"dobhoff)\b", re.IGNORECASE),
    "venous": re.compile(r"\b(?:PICC|central\s+venous|internal\s+jugular|subclavian)\b", re.IGNORECASE),
    "pulmonary artery": re.compile(r"\b(?:swan-ganz|pulmonary\s+artery\s+catheter)\b", re.IGNORECASE),
}
_POSITIONS = {
    "airway": re.compile(r"\b(?:carina|trachea|thoracic\s+inlet|clavicular\s+heads?)\b", re.IGNORECASE),
    "gastric": re.compile(r"\b(?:stomach|duodenum|esophag\w*|gastroesophageal|diaphragm|gastric\s+fundus)\b",
                          re.IGNORECASE),
    "venous": re.compile(r"\b(?:vena\s+cava|SVC|cavoatrial|atrium|brachiocephalic)\b", re.IGNORECASE),
    "pulmonary artery": re.compile(r"\bpulmonary\s+(?:artery|outflow)|\b(?:right|left|main)\s+pulmonary\b",
                                   re.IGNORECASE),
}
_HOMOPHONE_MISUSE = (  # real words in the wrong place (speech recognition): pattern, the word meant
    (re.compile(r"\bplural\b", re.IGNORECASE), "pleural"),
    (re.compile(r"\b(?:terminal|distal)\s+ilium\b", re.IGNORECASE), "ileum"),
    (re.compile(r"\bileum\b(?=\W+(?:\w+\W+){0,2}(?:bone|crest|wing|iliac))", re.IGNORECASE), "ilium"),
    (re.compile(r"\bperoneal\b(?=\W+(?:\w+\W+){0,2}(?:region|scrotum|perineum|pelvic))", re.IGNORECASE), "perineal"),
    (re.compile(r"\bperineal\b(?=\W+(?:\w+\W+){0,2}(?:nerve|artery|tendon|fibula|ankle))", re.IGNORECASE),
     "peroneal"),
    (re.compile(r"\bdiscreet\b", re.IGNORECASE), "discrete"),
    (re.compile(r"\bcallous\b", re.IGNORECASE), "callus"),
)
_QUALIFIED = ("sides", "severity", "zones")
_DESCRIBED_OTHERWISE = {"emphysema", "edema", "mass"}
_SIDED_DEVICES = {
    "PICC": re.compile(r"\bPICC\b|peripherally\s+inserted", re.IGNORECASE),
    "jugular line": re.compile(r"\b(?:internal\s+jugular|IJ)\b", re.IGNORECASE),
    "subclavian line": re.compile(r"\bsubclavian\b", re.IGNORECASE),
    "chest tube": re.compile(r"\bchest\s+tubes?\b|\bthoracostomy\b", re.IGNORECASE),
}
# Zones that cannot describe the same finding. Synonyms agree: a lower lobe finding lies at the lung base, an apical
# one in the upper lobe; the middle lobe and lingula project over the lower zone on a frontal film, and the
# lingula belongs to the upper lobe.
_ZONE_CONFLICTS = {frozenset(p) for p in (
    ("upper", "lower"), ("upper", "basilar"), ("upper", "retrocardiac"), ("apical", "lower"), ("apical", "basilar"),
    ("apical", "retrocardiac"), ("apical", "middle"), ("apical", "lingula"), ("middle", "upper"))}


@dataclass(frozen=True)
class Flag:
    """One suspected error: its fine type and the text that gave it away."""

    fine_type: str
    evidence: str


def _quote(text: str, span: tuple[int, int]) -> str:
    return f"'{' '.join(text[slice(*span)].split())}'"


def _qualified(m: Mention) -> bool:
    return any(getattr(m, q) for q in _QUALIFIED)


def _one_edit(word: str) -> set[str]:
    """All strings one edit from `word` (delete, adjacent swap, replace, insert). Python's difflib scores
    similarity but cannot say "exactly one keystroke apart", which is what a typo is."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    splits = [(word[:i], word[i:]) for i in range(len(word) + 1)]
    deleted = {a + b[1:] for a, b in splits if b}
    swapped = {a + b[1] + b[0] + b[2:] for a, b in splits if len(b) > 1}
    replaced = {a + c + b[1:] for a, b in splits if b for c in letters}
    inserted = {a + c + b for a, b in splits for c in letters}
    return deleted | swapped | replaced | inserted


def corpus_words(texts: Iterable[str], min_reports: int = 3) -> frozenset[str]:
    """Lower-cased words (letters only, 2 or more) that occur in at least `min_reports` of the texts."""
    counts = Counter(w for text in texts for w in {w.lower() for w in re.findall(r"[A-Za-z]{2,}", text)})
    return frozenset(w for w, n in counts.items() if n >= min_reports)


class RuleChecker:
    """Flags internal contradictions of a report; see the module docstring for the rules."""

    def __init__(self, vocabulary: Iterable[str] = MEDICAL_VOCABULARY, known_words: Iterable[str] = KNOWN_WORDS,
                 corpus: Iterable[str] | None = None, min_reports: int = 3, english: bool = True,
                 max_size_cm: float = 30.0, nodule_max_cm: float = 3.0, max_tip_to_carina_cm: float = 15.0):
        """
        Args:
            vocabulary: medical words a typo is measured against (words of 6 letters or more are used).
            known_words: words never taken for a typo (the vocabulary is added to them).
            corpus: report texts whose words (those in at least `min_reports` reports) join both the vocabulary and
                the known words, so a corpus's own terms ("parenchyma", "hemothorax") are never typos and its
                typos are measured against its words. Pass the reports being checked or a clean corpus like them;
                a typo repeated in `min_reports` reports is taken for a word.
            min_reports: reports a corpus word must occur in.
            english: also take pyspellchecker's English dictionary for known words.
            max_size_cm: larger measurements are implausible on a chest radiograph (the thorax is ~30 cm wide).
            nodule_max_cm: a nodule is at most 3 cm; larger is a mass (Fleischner Society glossary,
                Hansell et al., Radiology 2008).
            max_tip_to_carina_cm: a tube tip farther above the carina than this is implausible.
        """
        words = corpus_words(corpus, min_reports) if corpus is not None else frozenset()
        self.vocabulary = frozenset(w.lower() for w in vocabulary if len(w) >= 6) | {w for w in words if len(w) >= 6}
        self.known_words = frozenset(w.lower() for w in known_words) | self.vocabulary | words
        self.english = english_words() if english else frozenset()
        self.max_size_cm, self.nodule_max_cm = max_size_cm, nodule_max_cm
        self.max_tip_to_carina_cm = max_tip_to_carina_cm

    def check(self, text: str) -> dict:
        """``{"has_error", "coarse_type", "fine_type", "evidence"}``: the first flag in rule order gives the
        type; the evidence lists every flag ("" for a clean report)."""
        flags = self.flags(text)
        if not flags:
            return {"has_error": False, "coarse_type": None, "fine_type": None, "evidence": ""}
        first = flags[0].fine_type
        return {"has_error": True, "coarse_type": FINE_TYPES[first], "fine_type": first,
                "evidence": "; ".join(f"{f.fine_type}: {f.evidence}" for f in flags)}

    def flags(self, text: str) -> list[Flag]:
        """Every rule's flags, in order: contradictions, findings vs impression, measurements, devices, typos,
        normal impression over positive findings, omitted findings."""
        mentions = find_mentions(text)
        return (self._contradictions(text, mentions) + self._cross_section(text, mentions)
                + self._no_change(text, mentions) + self._comparison(text) + self._measurements(text, mentions)
                + self._devices(text) + self._devices_sides(text) + self._typos(text)
                + self._normal_impression(text, mentions) + self._omissions(text, mentions))

    # ------------------------------------------------------------------------------------------------ rules

    def _contradictions(self, text: str, mentions: list[Mention]) -> list[Flag]:
        """A finding negated and asserted. Typed by how it reads: both in one section, or a bare "No X." against a
        qualified X of the other section, is a sentence that says the opposite of another (contradiction); a
        negation with size or side ("no small left effusion") was added to a finding, and an unqualified assertion
        is a "No X" that lost its "No" (negation flips)."""
        flags = []
        for a in (m for m in mentions if m.polarity == "asserted" and not m.masked):
            for n in (m for m in mentions if m.polarity == "negated" and m.term == a.term and not m.masked):
                if a.sides and n.sides and not (a.sides & n.sides) and "bilateral" not in a.sides | n.sides:
                    continue  # "no right effusion" and "small left effusion" agree
                if _RESTRICTED_NEGATION.search(text, n.sentence[0], n.span[0]) and \
                        _CHRONIC_OR_DIFFUSE.search(text, *a.sentence):
                    continue  # "no suspicious nodules" and "calcified nodules" agree
                if a.sentence == n.sentence:
                    continue  # one sentence: a dictation slip the other rules read ("clear airspace disease")
                if a.section == n.section or not _qualified(n) and _qualified(a):
                    kind = "contradiction"
                else:
                    kind = "negation_flip"
                flags.append(Flag(kind, f"{a.term} negated in {_quote(text, n.sentence)} but asserted in "
                                        f"{_quote(text, a.sentence)}"))
                break
        for m in _IMPOSSIBLE_SIDE.finditer(text):
            flags.append(Flag("laterality_swap", f"{_quote(text, m.span())} does not exist"))
        return flags

    def _cross_section(self, text: str, mentions: list[Mention]) -> list[Flag]:
        """Same finding (or family: opacity ~ pneumonia), asserted in findings and impression, with disjoint sides /
        zones / sizes / changes."""
        flags = []
        asserted = [m for m in mentions if m.polarity == "asserted"]
        # a finding and its impression may name it differently: "opacity at the right base" -> "right lower lobe
        # pneumonia"
        family = {m.term: FINDING_FAMILY.get(m.term, m.term) for m in asserted}
        for term in dict.fromkeys(family.values()):
            found = [m for m in asserted if family[m.term] == term and m.section == "findings"]
            said = [m for m in asserted if family[m.term] == term and m.section == "impression"]
            if not found or not said or any(m.masked for m in found + said):
                continue  # "XXXX" may hide a side, a zone or a size: unknown, not a conflict

            def union(ms, attr):
                return set().union(*(getattr(m, attr) for m in ms))

            where = f"{term}: findings {_quote(text, found[0].sentence)} vs impression {_quote(text, said[0].sentence)}"
            sides_f, sides_i = union(found, "sides"), union(said, "sides")
            if sides_f and sides_i and not sides_f & sides_i and "bilateral" not in sides_f | sides_i:
                flags.append(Flag("laterality_swap", f"{sorted(sides_f)} vs {sorted(sides_i)} for {where}"))
            zones_f, zones_i = union(found, "zones"), union(said, "zones")
            if zones_f and zones_i and all(frozenset((a, b)) in _ZONE_CONFLICTS for a in zones_f for b in zones_i):
                flags.append(Flag("anatomical_location", f"{sorted(zones_f)} vs {sorted(zones_i)} for {where}"))
            sev_f = {SEVERITY_CLASS[r] for r in union(found, "severity")}
            sev_i = {SEVERITY_CLASS[r] for r in union(said, "severity")}
            if sev_f and sev_i and not sev_f & sev_i:
                flags.append(Flag("severity_change", f"size/severity {sorted(sev_f)} vs {sorted(sev_i)} "
                                                     f"for {where}"))
            int_f, int_i = union(found, "interval"), union(said, "interval")
            if not int_f & int_i and any(frozenset((a, b)) in _INTERVAL_CONFLICTS for a in int_f for b in int_i):
                flags.append(Flag("interval_change", f"{sorted(int_f)} vs {sorted(int_i)} for {where}"))
        return flags

    def _no_change(self, text: str, mentions: list[Mention]) -> list[Flag]:
        """A report that says nothing has changed ("No interval change.") and calls a finding new, increased or
        decreased."""
        for _, lo, hi in body_regions(text):
            for s, e in sentence_spans(text, lo, hi):
                if only_comparison(text[s:e]) and _NO_CHANGE.search(text, s, e):
                    for m in mentions:
                        if m.polarity == "asserted" and m.interval & {"up", "down", "new"}:
                            change = "/".join(sorted(m.interval))
                            return [Flag("interval_change", f"{_quote(text, (s, e))} but {m.term} {change} in "
                                                            f"{_quote(text, m.sentence)}")]
        return []

    def _comparison(self, text: str) -> list[Flag]:
        """A comparison with a prior study in a report that has none to compare with."""
        comparison = parse_sections(text, headerless=None)["comparison"]
        if not comparison or not NO_PRIOR.search(comparison):
            return []
        for _, lo, hi in body_regions(text):
            for s, e in sentence_spans(text, lo, hi):
                sentence = text[s:e]
                if _RECOMMENDATION.search(sentence) or _NO_COMPARISON.search(sentence):
                    continue
                m = _CHANGE_OVER_TIME.search(sentence) or (only_comparison(sentence)
                                                            and COMPARISON_WORDS.search(sentence))
                if m:
                    return [Flag("comparison_insertion", f"'{m.group().strip(' ,.')}' in {_quote(text, (s, e))} but "
                                                         f"comparison is '{comparison}'")]
        return []

    def _measurements(self, text: str, mentions: list[Mention]) -> list[Flag]:
        flags = []
        by_section: dict[tuple[str, str], set[float]] = {}
        for _, lo, hi in body_regions(text):
            for sentence in sentence_spans(text, lo, hi):
                terms = {m.term for m in mentions if m.sentence == sentence and m.polarity == "asserted"}
                section = next((m.section for m in mentions if m.sentence == sentence), "")
                for m in MEASUREMENT.finditer(text, *sentence):
                    cm = [float(v) * UNIT_CM[m.group("unit").lower()] for v in re.findall(r"\d+(?:\.\d+)?",
                                                                                          m.group("nums"))]
                    where = f"{_quote(text, m.span())} in {_quote(text, sentence)}"
                    if max(cm) > self.max_size_cm:
                        flags.append(Flag("measurement_change", f"{where}: over {self.max_size_cm:g} cm"))
                    elif "nodule" in terms and max(cm) > self.nodule_max_cm:
                        flags.append(Flag("measurement_change", f"{where}: a nodule is at most "
                                                                f"{self.nodule_max_cm:g} cm"))
                    elif re.search(r"above\s+the\s+carina", text[m.end():sentence[1]], re.IGNORECASE) and \
                            max(cm) > self.max_tip_to_carina_cm:
                        flags.append(Flag("measurement_change", f"{where}: tip implausibly far above the carina"))
                    for term in terms:
                        by_section.setdefault((term, section), set()).update(round(v, 2) for v in cm)
        for term in {t for t, _ in by_section}:
            found, said = by_section.get((term, "findings")), by_section.get((term, "impression"))
            if found and said and not found & said:
                flags.append(Flag("measurement_change", f"{term} measures {sorted(found)} cm in the findings but "
                                                        f"{sorted(said)} cm in the impression"))
        return flags

    def _devices(self, text: str) -> list[Flag]:
        """A sentence naming one kind of device whose positions all belong to another kind."""
        flags = []
        for _, lo, hi in body_regions(text):
            for s, e in sentence_spans(text, lo, hi):
                kinds = [k for k, p in _DEVICES.items() if p.search(text, s, e)]
                places = [k for k, p in _POSITIONS.items() if p.search(text, s, e)]
                if len(kinds) == 1 and places and kinds[0] not in places:
                    flags.append(Flag("device_change", f"{kinds[0]} device placed in the {'/'.join(places)} "
                                                       f"region in {_quote(text, (s, e))}"))
        return flags

    def _typos(self, text: str) -> list[Flag]:
        flags = []
        for _, lo, hi in body_regions(text):
            for m in re.finditer(r"\b[A-Za-z]{5,}\b", text[lo:hi]):
                word = m.group()
                lower = word.lower()
                if word.isupper() or lower in self.known_words or lower in self.english:
                    continue
                near = sorted(_one_edit(lower) & self.vocabulary)
                if near:
                    flags.append(Flag("typo_homophone", f"'{word}' is not a word; '{near[0]}' is one keystroke away"))
            for pattern, meant in _HOMOPHONE_MISUSE:
                for m in pattern.finditer(text, lo, hi):
                    flags.append(Flag("typo_homophone", f"{_quote(text, m.span())} where '{meant}' is meant"))
        return flags

    def _normal_impression(self, text: str, mentions: list[Mention]) -> list[Flag]:
        """"No acute cardiopulmonary process" over an acute finding asserted (and not called stable) in the
        findings, or that stock phrase ("no acute osseous abnormality") without its "no" in any section."""
        for section, lo, hi in body_regions(text):
            for s, e in sentence_spans(text, lo, hi):
                m = _GENERIC_DISEASE.search(text, s, e)
                if m and not _NEGATION.search(text, s, m.start()) and not _HEDGE.search(text, s, e):
                    return [Flag("negation_flip", f"{section} {_quote(text, (s, e))} states disease without "
                                                  "naming it (the stock phrase is negated)")]
        impression = parse_sections(text, headerless=None)["impression"]
        if not impression or not _NORMAL_IMPRESSION.search(impression):
            return []
        if any(m.section == "impression" and m.polarity == "asserted" for m in mentions):
            return []
        for m in mentions:
            if m.section == "findings" and m.polarity == "asserted" and m.term in ACUTE_FINDINGS and \
                    "same" not in m.interval and not _CHRONIC.search(text, *m.sentence) and \
                    not _HEDGE.search(text, *m.sentence):
                kind = "finding_insertion" if _qualified(m) else "negation_flip"
                return [Flag(kind, f"normal impression '{impression}' but {m.term} in {_quote(text, m.sentence)}")]
        return []

    def _omissions(self, text: str, mentions: list[Mention]) -> list[Flag]:
        """A finding asserted in the impression that the findings never mention, or an acute finding asserted
        (and not called stable, nor small or mild: minor findings are often left out) in the findings that an
        impression naming other findings leaves out. Emphysema,
        edema and masses are left to the reader: findings describe them in other words (hyperinflation,
        interstitial markings, a rounded opacity or a widened mediastinum); the heart is mentioned by any
        sentence about it."""
        sections = parse_sections(text, headerless=None)
        if not sections["findings"] or not sections["impression"]:
            return []
        family = {sec: {FINDING_FAMILY.get(m.term, m.term) for m in mentions if m.section == sec}
                  for sec in ("findings", "impression")}
        if _HEART.search(sections["findings"]):  # the heart described in any words ("cardiothoracic ratio 0.6")
            family["findings"].add("cardiomegaly")
        mentions = [m for m in mentions if not m.masked]  # "XXXX" may hide a hedge or the words that name it
        for m in mentions:
            if m.section == "impression" and m.polarity == "asserted" and m.term not in _DESCRIBED_OTHERWISE and \
                    FINDING_FAMILY.get(m.term, m.term) not in family["findings"]:
                return [Flag("finding_omission", f"impression {_quote(text, m.sentence)} has {m.term}, which the "
                                                 "findings never mention")]
        names_findings = any(m.section == "impression" and m.polarity == "asserted" for m in mentions)
        for m in mentions:
            if m.section == "findings" and m.polarity == "asserted" and m.term in ACUTE_FINDINGS and names_findings \
                    and "same" not in m.interval and FINDING_FAMILY.get(m.term, m.term) not in family["impression"] \
                    and not (m.severity and {SEVERITY_CLASS[r] for r in m.severity} == {"low"}):
                return [Flag("finding_omission", f"{m.term} in {_quote(text, m.sentence)} is missing from the "
                                                 f"impression '{sections['impression']}'")]
        return []

    def _devices_sides(self, text: str) -> list[Flag]:
        """A lateralised line or tube (PICC, jugular or subclavian line, chest tube) on one side in the findings and
        on the other in the impression."""
        sides: dict[tuple[str, str], set[str]] = {}
        for section, lo, hi in body_regions(text):
            for s, e in sentence_spans(text, lo, hi):
                if MASK.search(text, s, e):
                    continue
                for kind, pattern in _SIDED_DEVICES.items():
                    for m in pattern.finditer(text, s, e):
                        near = text[max(s, m.start() - 24):min(e, m.end() + 24)]
                        sides.setdefault((kind, section), set()).update(
                            w.lower() for w in re.findall(r"\b(?:left|right)\b", near, re.IGNORECASE))
        flags = []
        for kind in _SIDED_DEVICES:
            found, said = sides.get((kind, "findings")), sides.get((kind, "impression"))
            if found and said and not found & said:
                flags.append(Flag("laterality_swap", f"{kind} on the {'/'.join(sorted(found))} in the findings but "
                                                     f"on the {'/'.join(sorted(said))} in the impression"))
        return flags
