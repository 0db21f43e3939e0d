"""Injected errors must be ones a radiologist could make and no string match finds; the audit must see a marker."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mmclin.reports.audit import audit, marker_words
from mmclin.reports.injection import (
    COMPARISON_WORDS,
    INSERTION_TEMPLATES,
    english_words,
    error_sites,
    inject,
    inject_corpus,
    typo_candidates,
)
from mmclin.reports.sections import Report, find_mentions, parse_sections


def _report(uid: str, text: str) -> Report:
    return Report(id=uid, text=text, sections=parse_sections(text, headerless=None))


def _replacements(text: str, fine_type: str) -> list[tuple[str, str]]:
    return [(text[a:b], c) for a, b, choices in error_sites(text, fine_type) for c in choices]


def test_severity_is_changed_only_on_asserted_findings():
    text = ("COMPARISON: None.\nFINDINGS: No large pleural effusion. There is a small right pleural effusion. "
            "Mild degenerative changes.\nIMPRESSION: Small right effusion.")
    edited = {old.lower() for old, _ in _replacements(text, "severity_change")}
    assert "large" not in edited  # "No large effusion" -> "No small effusion" would be no error
    assert "small" in edited
    starts = [text[:a] for a, _, _ in error_sites(text, "severity_change")]
    assert not any(re.search(r"\bno\s+$", s, re.I) for s in starts)


def test_interval_change_needs_a_prior_and_an_abnormal_finding():
    body = "FINDINGS: Stable chest. Stable calcified granuloma in the right upper lobe.\nIMPRESSION: No acute process."
    assert error_sites("COMPARISON: None.\n" + body, "interval_change") == []
    assert error_sites(body, "interval_change") == []  # no comparison at all
    sites = error_sites("COMPARISON: XXXX, XXXX.\n" + body, "interval_change")
    text = "COMPARISON: XXXX, XXXX.\n" + body
    # only the granuloma sentence: "Worsened chest." is not an error a radiologist makes
    assert [text[a:b] for a, b, _ in sites] == ["Stable"] and sites[0][0] > text.index("granuloma") - 20
    assert all(c.lower() in {"increased", "decreased"} for _, _, choices in sites for c in choices)


def test_omitting_a_numbered_item_renumbers_the_rest():
    text = ("FINDINGS: Small right pleural effusion. Stable calcified granuloma.\n"
            "IMPRESSION: 1. Small right pleural effusion. 2. Calcified granuloma in the right upper lobe. "
            "3. No pneumothorax.")
    results = [inject(text, "finding_omission", seed) for seed in range(40)]
    impressions = {parse_sections(r.modified)["impression"] for r in results if r is not None}
    assert "1. Calcified granuloma in the right upper lobe. 2. No pneumothorax." in impressions
    for r in results:
        assert r.modified == text[:r.original_span[0]] + r.new + text[r.original_span[1]:]
        numbers = [int(n) for n in re.findall(r"(?:^|\s)(\d)\.\s", parse_sections(r.modified)["impression"])]
        assert numbers == list(range(1, len(numbers) + 1))


CORPUS = [
    "FINDINGS: The lungs are clear. No pleural effusion or pneumothorax. Heart size is normal.\n"
    "IMPRESSION: No acute cardiopulmonary abnormality.",
    "COMPARISON: XXXX.\nFINDINGS: {size} {side} pleural effusion. Heart size is normal. No pneumothorax.\n"
    "IMPRESSION: {size} {side} pleural effusion, unchanged.",
    "FINDINGS: Calcified granuloma in the {side} {zone} lobe. Lungs otherwise clear.\nIMPRESSION: No acute disease.",
    "FINDINGS: {grade} cardiomegaly. {side} basilar atelectasis. No effusion.\nIMPRESSION: {grade} cardiomegaly.",
    "FINDINGS: {side} PICC with tip in the SVC. The lungs are clear.\nIMPRESSION: No acute process.",
    "FINDINGS: Patchy opacity in the {side} {zone} lobe. No pneumothorax.\nIMPRESSION: {side} {zone} lobe pneumonia.",
]


def _corpus(n: int = 120) -> list[Report]:
    """Reports of the CORPUS templates with sizes, sides and zones varied, so finding sentences differ."""
    reports = []
    for i in range(n):
        k = i // len(CORPUS)
        fill = {"size": ("Small", "Moderate", "Large")[k % 3], "side": ("left", "right")[k // 3 % 2],
                "zone": ("upper", "lower")[k // 6 % 2], "grade": ("Mild", "Moderate")[k % 2]}
        text = CORPUS[i % len(CORPUS)].format(**fill)
        reports.append(_report(str(i), re.sub(r"(^|\. |: )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)))
    return reports


def test_insertions_come_from_other_studies_and_substitutions_from_corpus_words():
    reports = _corpus()
    records = inject_corpus(reports, error_rate=1.0, seed=0)
    words = {w for r in reports for w in re.findall(r"[a-z]+", r.text.lower())}
    templates = {s for _, s in INSERTION_TEMPLATES}
    inserted = [r for r in records if r["fine_type"] == "finding_insertion"]
    assert inserted
    for r in inserted:
        sentence = r["new_text"].strip()
        assert sentence not in templates
        assert any(sentence in other.text for other in reports if other.id != r["id"])
    for r in records:
        if r["fine_type"] in ("laterality_swap", "anatomical_location", "severity_change", "interval_change",
                              "device_change", "negation_flip"):
            assert set(re.findall(r"[a-z]+", r["new_text"].lower())) <= words, r["new_text"]


def test_audit_finds_a_planted_marker_and_stays_near_chance_without_one():
    rng = np.random.default_rng(0)
    texts = [r.text for r in _corpus(200)]
    labels = rng.permutation([True] * 100 + [False] * 100)
    planted = [{"id": str(i), "modified": t + (" Zebra noted." if e else ""), "has_error": bool(e),
                "coarse_type": "insert" if e else None, "fine_type": "finding_insertion" if e else None}
               for i, (t, e) in enumerate(zip(texts, labels))]
    assert [m["word"] for m in marker_words(planted)][:2] == ["noted", "zebra"] or "zebra" in {
        m["word"] for m in marker_words(planted)}
    assert audit(planted, n_boot=50)["bag_of_words"]["simple"]["accuracy"] > 0.95
    clean = [dict(r, modified=t) for r, t in zip(planted, texts)]  # the same labels, no trace in the text
    result = audit(clean, n_boot=50)
    assert result["markers"] == []
    assert result["bag_of_words"]["simple"]["accuracy"] < 0.65


def test_audit_without_enough_reports_says_why():
    rows = [{"id": "a", "modified": "Clear.", "has_error": True, "coarse_type": "insert",
             "fine_type": "finding_insertion"},
            {"id": "b", "modified": "Clear.", "has_error": False, "coarse_type": None, "fine_type": None}]
    result = audit(rows, n_boot=10)
    assert result["bag_of_words"] is None and "at least 2 erroneous and 2 clean" in result["skipped"]


@pytest.mark.parametrize("fine_type", ["severity_change", "interval_change", "finding_omission"])
def test_no_site_in_a_normal_report_without_findings(fine_type):
    assert error_sites(CORPUS[0], fine_type) == []


# ---------------------------------------------------------------------- ReXErr / GREEN categories, several errors

NO_PRIOR_REPORT = ("COMPARISON: None.\nFINDINGS: Small left pleural effusion. Heart size is normal. No pneumothorax.\n"
                   "IMPRESSION: Small left pleural effusion.")
WITH_PRIOR_REPORT = ("COMPARISON: XXXX.\nFINDINGS: Small left pleural effusion, decreased since the prior study. "
                     "Heart size is normal. No pneumothorax. No interval change in the mediastinum.\n"
                     "IMPRESSION: Small left pleural effusion, improved.")


def test_comparisons_are_added_only_without_a_prior_and_left_out_only_with_one():
    assert error_sites(WITH_PRIOR_REPORT, "comparison_insertion") == []
    added = {c for _, _, choices in error_sites(NO_PRIOR_REPORT, "comparison_insertion") for c in choices}
    assert added and all(COMPARISON_WORDS.search(c) for c in added)
    assert error_sites(NO_PRIOR_REPORT, "comparison_omission") == []
    removed = {WITH_PRIOR_REPORT[a:b].strip() for a, b, _ in error_sites(WITH_PRIOR_REPORT, "comparison_omission")}
    # "No interval change in the mediastinum." says the mediastinum is as it was: leaving it out omits a finding
    assert removed == {", decreased since the prior study", ", improved"}


def test_a_contradiction_says_the_opposite_of_the_report():
    for seed in range(10):
        e = inject(NO_PRIOR_REPORT, "contradiction", seed)
        inserted = find_mentions(e.new.strip())
        # the effusion is asserted, so "No pleural effusion."; pneumothorax and cardiomegaly ("heart size is
        # normal") are negated, so one of them is asserted
        assert any((m.term, m.polarity) in {("effusion", "negated"), ("pneumothorax", "asserted"),
                                            ("cardiomegaly", "asserted")}
                   for m in inserted), e.new


def test_a_device_is_added_only_where_the_report_names_none_of_its_kind():
    text = "FINDINGS: Right PICC with tip in the SVC. The lungs are clear.\nIMPRESSION: No acute process."
    added = {c.strip() for _, _, choices in error_sites(text, "device_insertion") for c in choices}
    assert added and not any("PICC" in c for c in added)


def test_several_errors_per_report_have_distinct_types_and_exact_spans():
    reports = _corpus()
    records = inject_corpus(reports, error_rate=1.0, seed=0, max_errors_per_report=3)
    counts = {len(r["errors"]) for r in records}
    assert counts <= {1, 2, 3} and 3 in counts and 1 in counts
    for r in records:
        types = [e["fine_type"] for e in r["errors"]]
        assert len(set(types)) == len(types) and r["fine_type"] == types[0]
        spans = sorted(tuple(e["span"]) for e in r["errors"])
        for e in r["errors"]:
            assert r["modified"][slice(*e["span"])] == e["new_text"]
            assert r["original"][slice(*e["original_span"])] == e["original_text"]
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # the edits do not overlap
    single = inject_corpus(reports, error_rate=1.0, seed=0)
    assert all(len(r["errors"]) == 1 and r["errors"][0]["fine_type"] == r["fine_type"] for r in single)


def test_typos_are_never_real_words():
    english = english_words()
    for word in ("pleural", "effusion", "pneumothorax", "atelectasis", "cardiomediastinal"):
        candidates = typo_candidates(word)
        assert candidates and not any(c.lower() in english for c in candidates)
    assert "plural" not in typo_candidates("pleural")
