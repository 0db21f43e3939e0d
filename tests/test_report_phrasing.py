"""Real report phrasing against the rule checker and the injector.

For each class of false alarm found on real IU-Xray reports (comparison words that are not comparisons, one finding
named differently in the two sections, disclaimers and recommendations, qualifier scope, near-synonymous severities,
other studies and body parts quoted) a clean report in that phrasing must pass, and its twin with an error the
injector offers must be flagged with the error's type. Then the injector's realism rules and the per-type shortcut
audit.
"""

from __future__ import annotations

import pytest

from mmclin.reports.audit import audit
from mmclin.reports.injection import FINE_TYPES, device_plausible, error_sites, inject_corpus
from mmclin.reports.rules import RuleChecker
from mmclin.reports.sections import Report, parse_sections


def twin(text: str, fine_type: str, target: str, choice: str | None = None) -> str:
    """`text` with the error of `fine_type` that the injector offers at `target` (its first replacement, or
    `choice`)."""
    lo = text.index(target)
    hi = lo + len(target)
    for start, end, choices in error_sites(text, fine_type):
        if lo <= start <= hi or start <= lo < end:
            new = choice if choice is not None else choices[0]
            assert new in choices, (new, choices)
            return text[:start] + new + text[end:]
    raise AssertionError(f"the injector offers no {fine_type} at {target!r}")


def flags(text: str) -> list[str]:
    return [f.fine_type for f in RuleChecker().flags(text)]


# One clean report per phrasing class, the error injected into it, where, and the type the checker must name.
CLASSES = {
    "a: comparison words that are not comparisons": (  # the twin: a change appended to the last granuloma
        "COMPARISON: None.\nFINDINGS: Scattered calcified granulomas compatible with prior granulomatous disease. "
        "Surgical clips from previous cholecystectomy. The left hemidiaphragm is higher compared to the right. "
        "Small calcified granuloma in the right upper lobe. No pleural effusion or pneumothorax.\n"
        "IMPRESSION: No acute cardiopulmonary process. Correlation with prior films would be helpful if available.",
        "comparison_insertion", "Small calcified granuloma in the right upper lobe.", ", increased from prior"),
    "b: one finding named differently": (
        "COMPARISON: None.\nFINDINGS: Heart size is mildly enlarged. There is blunting of the right costophrenic "
        "angle. No pneumothorax.\nIMPRESSION: Mild cardiomegaly. Small right pleural effusion.",
        "laterality_swap", "right pleural", None),
    "c: disclaimers and recommendations": (
        "FINDINGS: The lungs are clear. No pneumothorax. Rib fractures may not be demonstrated on chest "
        "radiographs; dedicated rib views could be obtained. Evaluation for pneumothorax is limited by positioning.\n"
        "IMPRESSION: No pneumothorax. Consider oblique views to exclude a nodule.",
        "negation_flip", "No pneumothorax. Rib", None),
    "d: qualifier scope": (
        "FINDINGS: Scattered calcified granulomas. No suspicious pulmonary nodules or masses. Old healed left rib "
        "fractures. No acute fracture. One fractured sternotomy wire. No lead fracture is identified.\n"
        "IMPRESSION: No acute cardiopulmonary process. Old healed left rib fractures.",
        "laterality_swap", "left rib fractures. No", None),
    "e: near-synonymous severities": (
        "FINDINGS: Minimal right pleural effusion. The heart is slightly enlarged. No pneumothorax.\n"
        "IMPRESSION: Small amount of right pleural fluid. Mild cardiomegaly.",
        "severity_change", "Minimal right", None),
    "f: other studies and body parts quoted": (
        "COMPARISON: None.\nFINDINGS: Heart size normal. Lungs are clear. No pleural effusion. Cholecystectomy clips "
        "in the right upper quadrant. The known liver lesion on the prior abdominal CT is not evaluated on this "
        "study. Degenerative changes of the right shoulder.\nIMPRESSION: No acute cardiopulmonary process.",
        "negation_flip", "No pleural effusion", None),
}


@pytest.mark.parametrize("name", list(CLASSES))
def test_each_phrasing_class_passes_clean_and_its_twin_is_flagged_with_its_type(name):
    clean, fine_type, target, choice = CLASSES[name]
    assert flags(clean) == [], name
    erroneous = twin(clean, fine_type, target, choice)
    assert erroneous != clean
    got = RuleChecker().check(erroneous)
    assert got["has_error"] and got["fine_type"] == fine_type, (name, erroneous, got["evidence"])


def test_an_inserted_sentence_that_says_the_opposite_is_typed_a_contradiction():
    text = ("FINDINGS: There is a small left pleural effusion. The heart is normal in size. No pneumothorax.\n"
            "IMPRESSION: Small left pleural effusion.")
    pools = {"negation": [("effusion", "No pleural effusion.")]}
    sites = [(a, c) for a, _, choices in error_sites(text, "contradiction", pools=pools) for c in choices]
    assert sites
    for at, sentence in sites:
        assert RuleChecker().check(text[:at] + sentence + text[at:])["fine_type"] == "contradiction"


def test_a_device_is_added_only_where_one_is_plausible():
    outpatient = ("INDICATION: Preop evaluation.\nFINDINGS: Heart size normal. The lungs are clear.\n"
                  "IMPRESSION: No acute cardiopulmonary process.")
    intensive_care = ("INDICATION: Intubated, portable AP.\nFINDINGS: Heart size normal. Bibasilar atelectasis.\n"
                      "IMPRESSION: Bibasilar atelectasis.")
    assert not device_plausible(outpatient) and error_sites(outpatient, "device_insertion") == []
    assert device_plausible(intensive_care) and error_sites(intensive_care, "device_insertion")
    no_lines = intensive_care.replace("Bibasilar atelectasis.\n", "Bibasilar atelectasis. No lines or tubes.\n")
    assert error_sites(no_lines, "device_insertion") == []


def test_a_chest_finding_goes_only_into_a_report_of_the_chest():
    shoulder = "FINDINGS: Degenerative changes of the right glenohumeral joint. No fracture or dislocation."
    assert error_sites(shoulder, "finding_insertion") == []
    chest = "FINDINGS: Heart size normal. The lungs are clear."
    assert error_sites(chest, "finding_insertion")


def test_a_device_is_changed_into_another_kind_never_a_synonym_or_superclass():
    text = "FINDINGS: Right PICC line with tip in the SVC. Left-sided AICD with leads in the right ventricle."
    changed = {text[a:b]: set(choices) for a, b, choices in error_sites(text, "device_change")}
    assert changed["PICC line"] == {"Swan-Ganz catheter"}  # never "central venous catheter": a PICC is one
    assert "AICD" not in changed  # an AICD paces: "pacemaker" would be no error


def test_sides_and_places_change_only_to_where_the_structure_can_be():
    text = ("FINDINGS: Opacity in the right middle lobe and the lingula. Small effusion at the left base. "
            "Pacemaker leads in the right atrium. Clips in the right upper quadrant.\nIMPRESSION: Pneumonia.")
    sides = {text[a - 1:b + 12] for a, b, _ in error_sites(text, "laterality_swap")}
    assert not any("middle" in s or "atrium" in s for s in sides), sides  # no left middle lobe, no left atrium lead
    places = {text[a:b] for a, b, _ in error_sites(text, "anatomical_location")}
    assert "base" not in places and "upper" not in places, places  # no apical effusion, no lower quadrant on a CXR


def test_an_inserted_comparison_does_not_restate_its_neighbour():
    text = ("COMPARISON: None.\nFINDINGS: Heart size normal. No interval change. Lungs are clear.\n"
            "IMPRESSION: Normal chest.")
    pools = {"comparison": [("", "Stable appearance of the chest.")]}
    spans = [(a, b) for a, b in ((text.index(s), text.index(s) + len(s)) for s in ("No interval change.",))]
    for at, _, choices in error_sites(text, "comparison_insertion", pools=pools):
        if "Stable appearance of the chest. " in choices or " Stable appearance of the chest." in choices:
            assert not any(at in (a, b + 1) for a, b in spans), at


def test_a_comparison_omission_removes_only_what_compares():
    text = ("COMPARISON: Chest radiograph XXXX.\nFINDINGS: No interval change. Stable mediastinal contours. "
            "Small left effusion, increased from prior.\nIMPRESSION: Small left effusion.")
    removed = {text[a:b].strip() for a, b, _ in error_sites(text, "comparison_omission")}
    assert ", increased from prior" in removed and "No interval change." in removed
    assert not any("mediastinal" in r for r in removed)  # that sentence also says the mediastinum is normal


def test_the_audit_flags_an_error_type_that_surface_words_give_away():
    clean = ["FINDINGS: Heart size normal. Lungs are clear. No effusion.",
             "FINDINGS: The lungs are clear. Heart normal. No pneumothorax.",
             "FINDINGS: Mild cardiomegaly. No effusion. Lungs clear."]
    records = []
    for i in range(120):
        text = clean[i % 3]
        kind = ("clean", "laterality_swap", "device_insertion")[i % 3] if i % 2 else "clean"
        modified = text + (" Endotracheal tube tip above the carina." if kind == "device_insertion" else "")
        records.append({"id": str(i), "original": text, "modified": modified, "has_error": kind != "clean",
                        "fine_type": None if kind == "clean" else kind,
                        "coarse_type": None if kind == "clean" else FINE_TYPES[kind]})
    result = audit(records, n_boot=50)
    assert result["per_type"]["above"] == ["device_insertion"]
    assert result["per_type"]["per_type"]["laterality_swap"]["rate"] < 0.8


def test_the_fixture_corpus_takes_every_error_type_it_has_sites_for():
    from pathlib import Path

    from datamodules.reports import read_reports

    reports = read_reports(Path(__file__).parent / "fixtures" / "iu_realistic", "iu-csv").reports
    records = inject_corpus(reports, error_rate=0.5, seed=0)
    injected = {r["fine_type"] for r in records if r["has_error"]}
    assert injected == set(FINE_TYPES)
    assert all(isinstance(r, dict) for r in records) and isinstance(reports[0], Report)
    assert parse_sections(reports[0].text)["findings"]
