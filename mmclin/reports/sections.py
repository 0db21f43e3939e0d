"""Radiology report structure: the `Report` record, section headers, sentences and finding mentions.

Headers are those of MIMIC-CXR free-text reports (Johnson et al., Sci Data 2019: ``FINDINGS:``, ``IMPRESSION:``,
``INDICATION:``, ``COMPARISON:``, ...) and the columns of the IU-Xray / Open-i collection (Demner-Fushman et al.,
JAMIA 2016). De-identification markers (IU ``XXXX``, MIMIC ``___``) are text like any other and are kept verbatim.

`find_mentions` reads what a report asserts: each finding term with its polarity (asserted, negated, uncertain,
weak), and with the qualifiers in its phrase (side, zone, severity, interval change). Negation and hedge scope are
negspacy's NegEx (Chapman et al., J Biomed Inform 2001): the clinical termset with the radiology cues it lacks
("clear of", "not seen", "has resolved"), and a second NegEx pass whose cues are hedges ("cannot exclude", "may
represent", "suggestive of"), as ConText's uncertainty (Harkema et al., J Biomed Inform 2009). Error injection and
the rule checker share it, so both read a sentence the same way.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, replace

SECTION_NAMES = ("indication", "comparison", "findings", "impression")

# Header spellings -> canonical section; None marks headers that end a section but are not kept.
_HEADERS: dict[str | None, tuple[str, ...]] = {
    "findings": ("findings and impression", "findings", "finding"),
    "impression": ("impressions", "impression", "conclusions", "conclusion"),
    "indication": ("clinical indication", "indications", "indication", "reason for examination", "reason for exam",
                   "clinical history", "history"),
    "comparison": ("comparisons", "comparison"),
    None: ("examination", "type of examination", "technique", "procedure", "wet read", "notification",
           "recommendations", "recommendation", "addendum", "final report"),
}
_HEADER_OF = {spelling: name for name, spellings in _HEADERS.items() for spelling in spellings}
_HEADER = re.compile(
    r"(?<![\w-])(?P<name>" + "|".join(sorted((re.escape(s).replace(r"\ ", r"\s+") for s in _HEADER_OF),
                                             key=len, reverse=True)) + r")\s*:",
    re.IGNORECASE)
# A sentence ends at . ! ? followed by white space (not after a list number "1.") or at a blank line.
_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\b\d\.)\s+|\n[ \t]*\n\s*")


@dataclass
class Report:
    """One radiology report as read from disk."""

    id: str  # IU uid, R2Gen id, MIMIC study ("s50414267")
    text: str  # the report verbatim (IU: its sections joined under their headers, see `compose_report`)
    sections: dict[str, str | None]  # SECTION_NAMES -> text with white space collapsed; None when absent or empty
    images: list[str] = field(default_factory=list)  # image paths (joined to the image root when one was given)
    split: str | None = None  # train / val / test where the source defines one
    source: str = ""  # file and row/key it came from, for messages
    mesh: list[str] = field(default_factory=list)  # IU-Xray MeSH terms ("Pleural Effusion/right/small"), if given


@dataclass(frozen=True)
class Section:
    """A headed stretch of a report: ``name`` None for a header that is not one of SECTION_NAMES."""

    name: str | None
    header: tuple[int, int]  # character span of "FINDINGS:" in the text
    body: tuple[int, int]  # character span of what follows, up to the next header


def find_sections(text: str) -> list[Section]:
    """Headed sections in text order; empty when the text has no known header.

    A header counts only at the start of the text or of a line, or after a sentence end, so "comparison:" in the
    middle of a sentence is not one.
    """
    heads = []
    for m in _HEADER.finditer(text):
        before = text[:m.start()].rstrip(" \t")
        if before == "" or before.endswith(("\n", ".", ";")):
            spelling = re.sub(r"\s+", " ", m.group("name").lower())
            heads.append((_HEADER_OF[spelling], m.start(), m.end()))
    ends = [start for _, start, _ in heads[1:]] + [len(text)]
    return [Section(name, (start, head_end), (head_end, end)) for (name, start, head_end), end in zip(heads, ends)]


def collapse_space(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def parse_sections(text: str, headerless: str | None = "findings") -> dict[str, str | None]:
    """Findings, impression, indication and comparison of a report (case-insensitive headers).

    Args:
        text: the report.
        headerless: the section a text without any known header is taken as (R2Gen keeps only the findings
            text); None leaves every section empty then.

    Returns:
        SECTION_NAMES -> text with white space collapsed, None when absent or empty; a header given twice has
        its bodies joined.
    """
    found: dict[str, list[str]] = {name: [] for name in SECTION_NAMES}
    sections = find_sections(text)
    if not sections and headerless is not None:
        found[headerless].append(text)
    for section in sections:
        if section.name is not None:
            found[section.name].append(text[slice(*section.body)])
    return {name: collapse_space(" ".join(parts)) or None for name, parts in found.items()}


def compose_report(sections: dict[str, str | None]) -> str:
    """One text with the present sections under their headers, in SECTION_NAMES order ("FINDINGS: ...")."""
    return "\n".join(f"{name.upper()}: {sections[name]}" for name in SECTION_NAMES if sections.get(name))


def body_regions(text: str) -> list[tuple[str, int, int]]:
    """(section, start, end) of the findings and impression bodies, trimmed of surrounding white space.

    A text without any known header is one region named "report". These are the parts of a report that error
    injection edits and that the rule checker reads.
    """
    sections = find_sections(text)
    spans = [(s.name, *s.body) for s in sections if s.name in ("findings", "impression")]
    if not sections:
        spans = [("report", 0, len(text))]
    regions = []
    for name, start, end in spans:
        chunk = text[start:end]
        lead = len(chunk) - len(chunk.lstrip())
        trimmed = chunk.strip()
        if trimmed:
            regions.append((name, start + lead, start + lead + len(trimmed)))
    return regions


def sentence_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Character spans of the sentences in ``text[start:end]``, without surrounding white space."""
    end = len(text) if end is None else end
    spans, cursor = [], start
    for m in list(_SENTENCE_END.finditer(text, start, end)) + [None]:
        stop = m.start() if m is not None else end
        piece = text[cursor:stop]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((cursor + lead, cursor + lead + len(piece.strip())))
        if m is not None:
            cursor = m.end()
    return spans


# ------------------------------------------------------------------------------------------- finding mentions

# Finding terms of chest radiograph reports (CheXpert / MIMIC-CXR label vocabulary, Irvin et al. AAAI 2019),
# most specific spelling first: "nodular opacity" is a nodule, not an opacity.
FINDING_PATTERNS: dict[str, str] = {
    "nodule": r"nodules?|nodular\s+(?:opacit(?:y|ies)|densit(?:y|ies))",
    "effusion": r"(?:pleural\s+)?effusions?|pleural\s+fluid|blunting\s+of\s+(?:the\s+)?(?:\w+\s+){0,2}?costophrenic|"
                r"costophrenic\s+(?:angles?|sulc(?:us|i)|recess(?:es)?|XXXX)\s+(?:is\s+|are\s+)?(?:\w+\s+)?blunted|"
                r"fluid\s+(?:in|at|along|within)\s+the\s+(?:\w+\s+){0,2}?(?:costophrenic|pleural|fissure|base)|"
                r"(?:costophrenic|sulc(?:us|i))\s+(?:XXXX\s+)?blunting",
    "pneumothorax": r"(?:hydro)?pneumothora(?:x|ces)|pleural\s+air(?:\s+collection)?",
    "consolidation": r"consolidations?|consolidative\s+opacit(?:y|ies)|airspace\s+(?:disease|consolidation)",
    "pneumonia": r"pneumonias?",
    "edema": r"(?:(?:pulmonary|interstitial|alveolar)\s+)?edema",
    "cardiomegaly": r"cardiomegaly|(?:enlarged|enlargement\s+of\s+the)\s+(?:heart|cardiac\s+silhouette|"
                    r"cardiomediastinal\s+silhouette)|cardiac\s+enlargement",
    "atelectasis": r"atelectas[ie]s|atelectatic",
    "mass": r"mass(?:es)?(?!\s+effect)",
    "opacity": r"opacit(?:y|ies)|opacification|infiltrates?|haziness",
    "fracture": r"fractures?|compression\s+deformit(?:y|ies)",
    "emphysema": r"emphysema(?:tous)?",
    "granuloma": r"granulomas?|granulomata",
}
# Terms that can stand for one another when asking "is this finding mentioned at all?".
FINDING_FAMILY = {"consolidation": "airspace", "pneumonia": "airspace", "opacity": "airspace",
                  "atelectasis": "airspace", "nodule": "nodule", "mass": "nodule", "granuloma": "nodule"}
# Findings a normal impression ("no acute cardiopulmonary process") rules out.
ACUTE_FINDINGS = ("effusion", "pneumothorax", "consolidation", "pneumonia", "edema", "mass")

SIDE_WORDS = {"left": "left", "right": "right", "bilateral": "bilateral", "bilaterally": "bilateral",
              "bibasilar": "bilateral", "bibasal": "bilateral", "both": "bilateral", "lingula": "left",
              "lingular": "left"}
ZONE_WORDS = {"upper": "upper", "lower": "lower", "middle": "middle", "apical": "apical", "apex": "apical",
              "apices": "apical", "basilar": "basilar", "basal": "basilar", "base": "basilar", "bases": "basilar",
              "bibasilar": "basilar", "bibasal": "basilar", "lingula": "lingula", "lingular": "lingula",
              "retrocardiac": "retrocardiac", "perihilar": "perihilar"}
# Severity / size words -> rank (0 trace ... 3 large).
SEVERITY_RANK = {"trace": 0, "tiny": 0, "minimal": 0, "minimally": 0, "small": 1, "mild": 1, "mildly": 1,
                 "slight": 1, "slightly": 1, "borderline": 0, "moderate": 2, "moderately": 2, "large": 3,
                 "severe": 3, "severely": 3, "marked": 3, "markedly": 3, "extensive": 3, "massive": 3}
# Ranks radiologists use for one another ("minimal" / "small amount" / "mild" effusion; "large" / "extensive"):
# two severities disagree only when their classes do.
SEVERITY_CLASS = {0: "low", 1: "low", 2: "moderate", 3: "high"}
INTERVAL_WORDS = {"new": "new", "unchanged": "same", "stable": "same", "persistent": "same", "increased": "up",
                  "increasing": "up", "worsened": "up", "worsening": "up", "enlarging": "up", "larger": "up",
                  "decreased": "down", "decreasing": "down", "improved": "down", "improving": "down",
                  "smaller": "down", "resolving": "down"}

_FINDING = re.compile(r"\b(?:" + "|".join(f"(?P<{k}>{v})" for k, v in FINDING_PATTERNS.items()) + r")\b",
                      re.IGNORECASE)
# Clause ends: a negation does not reach past them ("no effusion, but a small pneumothorax").
_CLAUSE_END = re.compile(r";|\b(?:but|however|although|though|whereas|except|which|otherwise)\b|"
                         r"\bthere\s+(?:is|are)\b(?!\s+no\b)", re.IGNORECASE)
_CHUNK_END = re.compile(r",|\band\b|\bwith\b", re.IGNORECASE)
# "no new effusion", "no large effusion" do not say there is no effusion.
_WEAK_NEGATION = re.compile(r"\b(?:new|large|significant|substantial|sizable|sizeable|moderate|overt|frank|acute|"
                            r"displaced|additional|further|other|residual|change|increase|increased|interval|"
                            r"worsening|enlarging)\b", re.IGNORECASE)
# Hedges of NegEx's clinical termset, moved to the hedge pass: "rule out pneumonia" does not say there is none.
_HEDGES_IN_CLINICAL_TERMSET = {"versus", "evaluate for", "rule out", "r/o", "ro", "cannot", "can't", "cant", "doubt"}
_RADIOLOGY_NEGATIONS = {
    "preceding_negations": ["clear of", "without evidence of", "no evidence for", "no radiographic evidence of",
                            "negative for", "resolution of", "resolved", "nor", "no definite", "no definitive"],
    "following_negations": ["not seen", "not identified", "not present", "not visualized", "not visible",
                            "not appreciated", "not demonstrated", "not evident", "not detected", "not noted",
                            "no longer", "has resolved", "have resolved", "has cleared", "have cleared", "resolved",
                            "absent"],
    "termination": [";", "there is", "there are", "otherwise", "whereas", "despite", "although", "though", "which"],
    # a negation about the prior study says the finding is new: "nodule, not seen on prior exams"
    "pseudo_negations": [f"not {seen} on {the}{prior}" for seen in ("seen", "present", "visualized", "identified",
                                                                     "evident", "visible", "appreciated")
                         for the in ("", "the ") for prior in ("prior", "previous", "comparison", "earlier")]
                        + [f"not {seen} previously" for seen in ("seen", "present", "visualized", "identified")]
                        + [f"not previously {seen}" for seen in ("seen", "present", "visualized", "identified")],
}
_HEDGE_TERMSET = {
    "pseudo_negations": ["no doubt", "without doubt"],
    "preceding_negations": ["possible", "possibly", "probable", "probably", "questionable", "suspected",
                            "suspicious for", "suspicious of", "may", "might", "could", "cannot exclude",
                            "can not exclude", "cannot rule out", "cannot be excluded", "versus", "vs", "vs.",
                            "evaluate for", "assess for", "rule out", "r/o", "concern for", "concerning for",
                            "differential", "differential includes", "likely", "suggest", "suggests", "suggesting",
                            "suggestive of", "question of", "equivocal", "presumed", "presumably",
                            "worrisome for", "doubt", "not excluded", "may represent", "could represent", "and/or",
                            "history of", "favoring", "favor"],
    # after the finding only phrases that end on it: in "effusion with basilar opacity, likely atelectasis" the
    # "likely" is about the atelectasis
    "following_negations": ["not excluded", "cannot be excluded", "can not be excluded", "not be excluded",
                            "cannot be ruled out", "not ruled out", "is suspected", "are suspected", "is possible",
                            "is questioned", "not entirely excluded", "is not excluded", "are not excluded"],
    "termination": [";", "there is", "there are", "but", "however", "although", "though", "whereas", "except",
                    "otherwise", "which"],
}
# De-identification markers: IU-Xray "XXXX", MIMIC-CXR "___".
MASK = re.compile(r"\bX{2,}\b|_{2,}")
_HEART = re.compile(r"\b(?:heart|cardiac|cardiomediastinal|cardiothoracic)\b", re.IGNORECASE)
_HEART_NORMAL = re.compile(r"\bnormal\b|within\s+normal\s+limits|not\s+enlarged|unremarkable", re.IGNORECASE)
_HEART_ABNORMAL = re.compile(r"cardiomegaly|(?<!not )enlarged|enlargement|(?:upper|first|high|top)(?:\s+"
                             r"limits?\s+of|[- ])\s*normal|borderline|prominent", re.IGNORECASE)
# The heart called large in other words than the finding term: "heart size is mildly enlarged", "the heart is
# slightly large", "heart size at the upper limits of normal" (borderline: rank 0).
_HEART_ENLARGED = re.compile(
    r"\b(?:heart|cardiac\s+(?:silhouette|size|contour)|cardiomediastinal\s+silhouette)\b(?P<gap>(?:[\s,]+"
    r"(?!and\b|but\b|with\b|normal\b|within\b)[\w-]+){0,5}?)[\s,]+(?P<cue>enlarged|large|borderline|"
    r"(?:upper|first|high|top)(?:\s+limits?\s+of|[- ])\s*normal)\b", re.IGNORECASE)
_BORDERLINE = re.compile(r"borderline|normal", re.IGNORECASE)
# Sentences that mention a finding without reporting it (ConText's "hypothetical", Harkema et al. 2009): a
# recommendation ("consider oblique views to exclude a nodule") over what follows its cue, a disclaimer ("fractures
# may not be demonstrated", "evaluation for pneumothorax is limited") over its whole clause.
_RECOMMENDATION = re.compile(
    r"\b(?:recommend\w*|consider(?:ed)?|follow[- ]?up|followup|(?:further|additional)\s+(?:evaluation|imaging|"
    r"assessment|views?)|correlat(?:e|ion)\s+(?:clinically\s+)?with|clinical(?:ly)?\s+correlat\w*|if\s+(?:clinically|there\s+is|the\s+"
    r"patient|symptoms)|would\s+be\s+(?:helpful|useful|reasonable|recommended)|could\s+be\s+(?:performed|obtained|"
    r"considered)|can\s+be\s+(?:performed|obtained)|to\s+(?:exclude|rule\s+out|evaluate|assess|document|ensure|confirm|"
    r"identify)|dedicated\s+(?:\w+\s+)?(?:views?|films?|radiographs?|imaging)|please)\b", re.IGNORECASE)
_DISCLAIMER = re.compile(
    r"\b(?:may|might|can|could)\s+not\s+be\s+(?:\w+\s+)?(?:demonstrated|visualized|seen|detected|evident|apparent|"
    r"identified|excluded)\b|\b(?:may|might|can|could)\s+be\s+(?:\w+\s+)?(?:obscured|missed|hidden|masked)\b|\blimited\s+(?:exam|examination|study|evaluation|assessment|views?|films?)\b|"
    r"\b(?:is|are)\s+(?:\w+\s+)?limited\b|\b(?:not|poorly)\s+(?:well\s+)?(?:evaluated|assessed)\b|\binsensitive\b|"
    r"\boccult\b|\bcannot\s+be\s+(?:fully\s+|adequately\s+)?(?:evaluated|assessed|determined)\b|\babsence\s+of\s+"
    r"(?:a\s+)?(?:prior|previous|comparison)", re.IGNORECASE)


def hypothetical(text: str, sentence: tuple[int, int], span: tuple[int, int]) -> bool:
    """The finding at `span` is only spoken of: after a recommendation cue of its sentence, or in the clause of a
    disclaimer."""
    if any(m.start() < span[0] for m in _RECOMMENDATION.finditer(text, *sentence)):
        return True
    lo, hi = _bounds(text, span[0], *sentence, _CLAUSE_END)
    return bool(_DISCLAIMER.search(text, min(lo, span[0]), max(hi, span[1])))
_CLEAR_LUNGS = re.compile(r"\blungs?\b[^.;]*?\bclear\b(?!\s+(?:space|zone))|\bclear\s+lungs?\b", re.IGNORECASE)
_CLEAR_EXCEPT = re.compile(r"\b(?:otherwise|except|aside|but|however|exception)\b", re.IGNORECASE)


def _word_set(text: str, table: dict[str, object]) -> set:
    return {table[w.lower()] for w in re.findall(r"[A-Za-z]+", text) if w.lower() in table}


@dataclass(frozen=True)
class Mention:
    """One finding term in a report and what the report says about it."""

    term: str  # key of FINDING_PATTERNS
    span: tuple[int, int]  # in the report text
    polarity: str  # "asserted" | "negated" | "uncertain" | "weak" ("no new effusion": neither)
    section: str  # "findings" | "impression" | "report" (text without headers)
    sentence: tuple[int, int]
    sides: frozenset = frozenset()  # values of SIDE_WORDS in the mention's phrase
    zones: frozenset = frozenset()  # values of ZONE_WORDS
    severity: frozenset = frozenset()  # SEVERITY_RANK ranks
    interval: frozenset = frozenset()  # values of INTERVAL_WORDS
    masked: bool = False  # an anonymisation token (IU "XXXX", MIMIC "___") in its clause: a qualifier may be hidden


def _bounds(text: str, pos: int, lo: int, hi: int, pattern: re.Pattern) -> tuple[int, int]:
    """The stretch of text[lo:hi] around pos between two matches of `pattern`."""
    start, end = lo, hi
    for m in pattern.finditer(text, lo, hi):
        if m.end() <= pos:
            start = m.end()
        elif m.start() >= pos:
            end = m.start()
            break
    return start, end


@functools.cache
def _negex():
    """A blank spaCy tokenizer (no model to download) and negspacy's NegEx twice: negations, then hedges."""
    import spacy
    from negspacy.negation import Negex  # noqa: F401  (registers the "negex" factory)
    from negspacy.termsets import termset

    negations = termset("en_clinical")
    clinical = negations.get_patterns()["preceding_negations"]
    negations.remove_patterns({"preceding_negations": [c for c in clinical if c in _HEDGES_IN_CLINICAL_TERMSET]})
    negations.add_patterns(_RADIOLOGY_NEGATIONS)
    nlp = spacy.blank("en")
    negation = nlp.add_pipe("negex", name="negation", config={
        "neg_termset": negations.get_patterns(), "span_keys": ["findings"], "extension_name": "negated"})
    hedge = nlp.add_pipe("negex", name="hedge", config={
        "neg_termset": _HEDGE_TERMSET, "span_keys": ["findings"], "extension_name": "hedged"})
    return nlp, negation, hedge


# A device's own fracture ("lead fracture", "fracture of a sternotomy wire") is no bone's.
_DEVICE_PART = r"(?:leads?|wires?|hardware|rods?|screws?|plate|catheter)"
_DEVICE_BEFORE = re.compile(r"\b(?:" + _DEVICE_PART + r"|line|device)\s*$", re.IGNORECASE)
_DEVICE_AFTER = re.compile(r"\s+of\s+(?:the\s+|a\s+|an\s+|one\s+of\s+the\s+)?(?:[\w-]+\s+){0,3}?"
                           + _DEVICE_PART + r"\b", re.IGNORECASE)


def _device_fracture(text: str, start: int, end: int) -> bool:
    return bool(_DEVICE_BEFORE.search(text[max(0, start - 30):start]) or _DEVICE_AFTER.match(text, end))


def _polarities(sentence: str, spans: list[tuple[int, int]]) -> list[str]:
    """NegEx polarity of each character span of one sentence: asserted, negated, uncertain (a hedge's scope
    wins over a negation's) or weak (negated through a qualifier: "no large effusion")."""
    nlp, negation, hedge = _negex()
    doc = nlp.make_doc(sentence)
    for i, token in enumerate(doc):
        token.is_sent_start = i == 0
    doc.spans["findings"] = [doc.char_span(a, b, alignment_mode="expand") for a, b in spans]
    hedge(negation(doc))
    preceding, _, terminating = negation.process_negations(doc)
    boundaries = negation.termination_boundaries(doc, terminating)
    out = []
    for span in doc.spans["findings"]:
        if span._.hedged:
            out.append("uncertain")
        elif span._.negated:
            lo = max(b for b, _ in boundaries if b <= span.start)
            cues = [start for _, start, _ in preceding if lo <= start < span.start]
            weak = cues and _WEAK_NEGATION.search(doc[max(cues):span.start].text)
            out.append("weak" if weak else "negated")
        else:
            out.append("asserted")
    return out


def phrase_span(text: str, mention: Mention) -> tuple[int, int]:
    """The span of a mention's own phrase: its clause cut at commas, "and" and "with" ("small left effusion" in
    "small left effusion with atelectasis in the left lower lobe")."""
    start, end = mention.span
    c_lo, c_hi = _bounds(text, start, *mention.sentence, _CLAUSE_END)
    k_lo, k_hi = _bounds(text, start, min(c_lo, start), max(c_hi, end), _CHUNK_END)
    return min(k_lo, start), max(k_hi, end)


def _mention(text: str, term: str, start: int, end: int, section: str, sentence: tuple[int, int],
             polarity: str, stop: int | None = None) -> Mention:
    """`stop`: where the next finding term of the sentence starts; a change word after it is that finding's."""
    c_lo, c_hi = _bounds(text, start, *sentence, _CLAUSE_END)
    c_lo, c_hi = min(c_lo, start), max(c_hi, end)
    k_lo, k_hi = _bounds(text, start, c_lo, c_hi, _CHUNK_END)
    k_lo, k_hi = min(k_lo, start), max(k_hi, end)
    phrase, clause = text[k_lo:k_hi], text[c_lo:c_hi]
    after = text[end:c_hi if stop is None else max(end, min(c_hi, stop))]
    after = re.split(r"\b(?:and|with)\b", after, maxsplit=1, flags=re.IGNORECASE)[0]  # the next finding's words
    if hypothetical(text, sentence, (start, end)):
        polarity = "uncertain"
    # the interval is often appended to the clause: "1.5 cm nodule in the right upper lobe, unchanged"
    interval = _word_set(phrase, INTERVAL_WORDS) or _word_set(after, INTERVAL_WORDS)
    # the side is often stated once for the clause: "consolidation in the right lower lobe ..., consistent with
    # pneumonia"
    sides = _word_set(phrase, SIDE_WORDS) or _word_set(clause, SIDE_WORDS)
    return Mention(term=term, span=(start, end), polarity=polarity, section=section, sentence=sentence,
                   sides=frozenset(sides), zones=frozenset(_word_set(phrase, ZONE_WORDS)),
                   severity=frozenset(_word_set(phrase, SEVERITY_RANK)), interval=frozenset(interval),
                   masked=bool(MASK.search(clause)))


def find_mentions(text: str) -> list[Mention]:
    """Finding mentions in the findings and impression of a report (the whole text when it has no headers).

    Besides the terms of FINDING_PATTERNS, two stock phrases are read as negations: a normal heart ("heart size
    is normal") negates cardiomegaly, and clear lungs ("the lungs are clear", not "otherwise clear") negate
    consolidation, pneumonia and edema.
    """
    return list(_mentions(text))


@functools.lru_cache(maxsize=8192)
def _mentions(text: str) -> tuple[Mention, ...]:
    mentions = []
    for section, lo, hi in body_regions(text):
        for sentence in sentence_spans(text, lo, hi):
            s_text = text[slice(*sentence)]
            found = [(m.lastgroup, m.start(), m.end()) for m in _FINDING.finditer(text, *sentence)
                     if not (m.lastgroup == "fracture" and _device_fracture(text, m.start(), m.end()))]
            enlarged = _HEART_ENLARGED.search(s_text)
            if enlarged and re.search(r"\bnot?\b", enlarged.group("gap"), re.IGNORECASE):
                enlarged = None  # "heart size is not enlarged": the stock normal phrase below
            if enlarged and not any(term == "cardiomegaly" for term, _, _ in found):
                found.append(("cardiomegaly", sentence[0] + enlarged.start("cue"), sentence[0] + enlarged.end("cue")))
                found.sort(key=lambda f: f[1])
            polarities = _polarities(s_text, [(a - sentence[0], b - sentence[0]) for _, a, b in found])
            for i, ((term, start, end), polarity) in enumerate(zip(found, polarities)):
                stop = found[i + 1][1] if i + 1 < len(found) else None
                mention = _mention(text, term, start, end, section, sentence, polarity, stop)
                if enlarged and start == sentence[0] + enlarged.start("cue"):  # the cue word is no size
                    cue = enlarged.group("cue")
                    mention = replace(mention, severity=frozenset(_word_set(enlarged.group("gap"), SEVERITY_RANK)
                                                                  | ({0} if _BORDERLINE.search(cue) else set())))
                mentions.append(mention)
            heart = _HEART.search(s_text)
            if heart and not enlarged and _HEART_NORMAL.search(s_text) and not _HEART_ABNORMAL.search(s_text):
                at = sentence[0] + heart.start()
                mentions.append(_mention(text, "cardiomegaly", at, at + len(heart.group()), section, sentence,
                                         polarity="negated"))
            lungs = _CLEAR_LUNGS.search(s_text)
            if lungs and not _CLEAR_EXCEPT.search(s_text):
                at = sentence[0] + lungs.start()
                for term in ("consolidation", "pneumonia", "edema"):
                    mentions.append(_mention(text, term, at, sentence[0] + lungs.end(), section, sentence,
                                             polarity="negated"))
    return tuple(mentions)
