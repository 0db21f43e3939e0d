"""Answer parsing and scoring of CT VQA and fundus report generation, on hand-made prediction rows."""

from __future__ import annotations

import pytest

from mmclin.errors import DataError
from mmclin.metrics.f1 import macro_f1
from mmclin.tasks.report import (
    GRADE_NAMES,
    REFERRAL_LEVELS,
    REFERRAL_PHRASES,
    ReportEvaluator,
    f1_scores,
    parse_grade,
    parse_referral,
)
from mmclin.tasks.vqa import (
    VQAEvaluator,
    choice_from_generation,
    mean_relative_accuracy,
    parse_letter,
    parse_number,
    strip_think,
    summary_table,
    within_tolerance,
    yes_no_scores,
)

# -- VQA parsing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B) pancreas", "B"), ("Answer: C", "C"), ("The answer is (b)", "B"),
    ("Final answer: **A**", "A"), ("I think it is D", "D"),
    ("<think>A or B? Probably not A.</think>\nC", "C"),  # reasoning block ignored
    ("the options A and B are wrong</think> D", "D"),  # <think> was in the prompt
    ("<think>Looking at the liver, A seems", None),  # cut off while reasoning: no answer
    ("A lesion is seen in the pancreas", None),  # article, not option A
    ("the answer is a cyst", None), ("Bone window", None), ("E", None), ("no idea", None),
])
def test_parse_letter(text, letter):
    assert parse_letter(text) == letter


def test_parse_letter_respects_the_number_of_options():
    assert parse_letter("C", n_options=2) is None
    assert parse_letter("E", n_options=5) == "E"
    with pytest.raises(ValueError, match="n_options"):
        parse_letter("A", n_options=0)


def test_strip_think():
    assert strip_think("<think>12 mL?</think> 14 mL") == "14 mL"
    assert strip_think("<THINK>x</THINK>yes<think>never closed") == "yes"


@pytest.mark.parametrize("text, number", [
    ("12 mL", 12.0), ("12mL", 12.0), ("1,234.5 mm3", 1234.5), ("-3.5 HU", -3.5), ("\u22122 HU", -2.0),
    ("about .5 cm", 0.5), ("12,5", 12.0), ("T2-4", 4.0), ("In 3D the volume is 7 mL", 7.0),
    ("<think>maybe 5</think>The volume is 8 mL", 8.0), ("two lesions", 2.0), ("none seen", None),
])
def test_parse_number(text, number):
    assert parse_number(text) == number


def test_choice_from_generation_reads_option_text_then_letter():
    choices = ["10 mL", "12 mL", "14 mL", "16 mL"]
    assert choice_from_generation("B", choices) == "12 mL"
    assert choice_from_generation("The volume is 14 mL.", choices) == "14 mL"
    assert choice_from_generation("<think>10 mL? no</think>(D)", choices) == "16 mL"
    assert choice_from_generation("about 13 mL", choices) is None


# -- numeric and yes/no scores -----------------------------------------------------------------------------


@pytest.mark.parametrize("pred, true, mra", [
    (100, 100, 1.0),
    (110, 100, 0.8),  # error 0.10 passes 1 - theta for theta = 0.50 ... 0.85 (8 of 10)
    (105, 100, 0.9),  # error 0.05 fails only theta = 0.95 (strict "<")
    (70, 100, 0.4),  # error 0.30 passes theta = 0.50, 0.55, 0.60, 0.65
    (-13, -10, 0.4),  # |true| in the denominator
    (150, 100, 0.0), (0, 0, 1.0), (1, 0, 0.0), (float("nan"), 3, 0.0),
])
def test_mean_relative_accuracy(pred, true, mra):
    assert mean_relative_accuracy(pred, true) == pytest.approx(mra)


def test_within_tolerance_bands():
    assert within_tolerance(105, 100, 0.05) and not within_tolerance(105.1, 100, 0.05)
    assert within_tolerance(80, 100, 0.20) and not within_tolerance(49, 100, 0.50)
    with pytest.raises(ValueError):
        within_tolerance(1, 1, -0.1)


def test_yes_no_scores():
    scores = yes_no_scores(["yes", "yes", "yes", "no", "no"], ["yes", "no", None, "no", "yes"])
    assert scores["sensitivity"] == pytest.approx(1 / 3) and scores["specificity"] == pytest.approx(1 / 2)


# -- VQA evaluator -----------------------------------------------------------------------------------------
VOLUMES = ["10 mL", "12 mL", "14 mL", "16 mL"]
ORGANS = ["liver", "pancreas", "kidney", "spleen"]


def _row(answer, generated, ranked, choices, qtype, subtype, **meta):
    return {"question": "?", "answer": answer, "generated": generated, "parsed": None, "ranked": ranked,
            "choices": choices, "meta": {"question_type": qtype, "question_subtype": subtype, **meta}}


ROWS = [
    # generation right (letter), likelihood right
    _row("12 mL", "B", "12 mL", VOLUMES, "measurement", "lesion_volume", value=12.0),
    # generation names no option (13 mL read as the number), likelihood wrong (16 mL)
    _row("14 mL", "It measures about 13 mL", "16 mL", VOLUMES, "measurement", "lesion_volume", value=14.0),
    # generation right after a reasoning block that names another organ, likelihood wrong
    _row("pancreas", "<think>Could be the liver.</think>Pancreas", "liver", ORGANS, "recognition", "organ"),
    _row("yes", "No.", "yes", ["yes", "no"], "recognition", "lesion_presence"),
    _row("no", "no", "yes", ["yes", "no"], "recognition", "lesion_presence"),
]


def test_vqa_evaluator_accuracies_per_category():
    m = VQAEvaluator(n_boot=200)(ROWS, "test")
    expected = {
        "acc_generation": 3 / 5, "acc_likelihood": 2 / 5,
        "acc_generation/measurement": 1 / 2, "acc_likelihood/measurement": 1 / 2,
        "acc_generation/recognition": 2 / 3, "acc_likelihood/recognition": 1 / 3,
        "acc_generation/recognition/organ": 1.0, "acc_likelihood/recognition/organ": 0.0,
        "acc_generation/recognition/lesion_presence": 1 / 2, "acc_likelihood/recognition/lesion_presence": 1 / 2,
        "n": 5, "n/measurement/lesion_volume": 2, "unparsed_generation": 1, "unparsed_generation/recognition": 0,
    }
    for key, value in expected.items():
        assert m[f"test/{key}"] == pytest.approx(value), key
    for key in [k for k in m if "/acc_" in k and "_ci_" not in k]:
        metric, *category = key.split("/")[1:]
        suffix = "".join("/" + c for c in category)
        low, high = m[f"test/{metric}_ci_low{suffix}"], m[f"test/{metric}_ci_high{suffix}"]
        assert 0.0 <= low <= m[key] <= high <= 1.0, key
    assert m["test/acc_generation_ci_low/recognition/organ"] == m["test/acc_generation_ci_high/recognition/organ"] == 1
    assert m["test/acc_generation_ci_low"] < m["test/acc_generation_ci_high"]


def test_vqa_evaluator_numeric_and_yes_no_scores():
    m = VQAEvaluator(n_boot=200)(ROWS, "val")
    # generation: 12 (option B) and 13 (generated) for 12 and 14; likelihood: 12 and 16
    assert m["val/mra_generation/measurement"] == pytest.approx((1.0 + 0.9) / 2)  # |13 - 14| / 14 = 0.071
    assert m["val/mra_likelihood/measurement"] == pytest.approx((1.0 + 0.8) / 2)  # |16 - 14| / 14 = 0.143
    assert m["val/within5_generation"] == 0.5 and m["val/within10_generation"] == 1.0
    assert m["val/within10_likelihood"] == 0.5 and m["val/within20_likelihood"] == 1.0
    assert m["val/unparsed_number_generation"] == 0 and m["val/n_numeric"] == 2
    assert "mra_generation/recognition" not in {k.split("/", 1)[1] for k in m}
    # yes/no: generation says no, no; likelihood says yes, yes (truth yes, no)
    assert (m["val/sensitivity_generation"], m["val/specificity_generation"]) == (0.0, 1.0)
    assert (m["val/sensitivity_likelihood"], m["val/specificity_likelihood"]) == (1.0, 0.0)


def test_vqa_evaluator_open_questions():
    rows = [_row("2", "two lesions", None, [], "measurement", "lesion_count", value=2.0),
            _row("3", "<think>4?</think>3", None, [], "measurement", "lesion_count", value=3.0),
            _row("4", "I cannot tell", None, [], "measurement", "lesion_count", value=4.0)]
    m = VQAEvaluator(n_boot=50)(rows, "test")
    assert m["test/acc_generation_open"] == pytest.approx(1 / 3)  # exact match: only "3"
    assert m["test/mra_generation"] == pytest.approx(2 / 3) and m["test/unparsed_number_generation"] == 1
    assert "test/acc_likelihood" not in m and "test/mra_likelihood" not in m


def test_vqa_evaluator_rejects_bad_rows():
    with pytest.raises(DataError, match="row 1: missing keys \\['ranked'\\]"):
        VQAEvaluator()([ROWS[0], {k: v for k, v in ROWS[0].items() if k != "ranked"}], "test")
    with pytest.raises(DataError, match="row 0: answer '11 mL' is not one of its choices"):
        VQAEvaluator()([{**ROWS[0], "answer": "11 mL"}], "test")
    with pytest.raises(DataError, match="row 0: meta\\['value'\\] must be a number"):
        VQAEvaluator()([{**ROWS[0], "meta": {"value": "twelve"}}], "test")
    with pytest.raises(ValueError, match="prefix"):
        VQAEvaluator()(ROWS, "test/vqa")
    assert VQAEvaluator()([], "test") == {}


def test_summary_table():
    table = summary_table(VQAEvaluator(n_boot=50)(ROWS, "test"))
    lines = table.splitlines()
    assert lines[0].startswith("| category | n | acc_generation | acc_likelihood | mra_generation")
    assert lines[2].startswith("| all | 5 | 0.600 [")
    organ = next(line for line in lines if line.startswith("| recognition/organ |"))
    assert "| 1.000 [1.000, 1.000] | 0.000 [0.000, 0.000] |" in organ


# -- fundus reports: parsing -------------------------------------------------------------------------------


def test_report_vocabulary_round_trips():
    assert [parse_grade(name) for name in GRADE_NAMES] == [0, 1, 2, 3, 4]
    assert {phrase: parse_referral(phrase) for phrase in REFERRAL_PHRASES} == REFERRAL_PHRASES
    assert set(REFERRAL_PHRASES.values()) == set(REFERRAL_LEVELS)
    demo = f"Fundus photograph: {GRADE_NAMES[3]}. Recommendation: refer soon."
    assert (parse_grade(demo), parse_referral(demo)) == (3, "soon")


@pytest.mark.parametrize("text, grade, referral", [
    ("No signs of proliferative disease, refer routinely", None, "routine"),
    ("no diabetic retinopathy", 0, None),
    ("Proliferative diabetic retinopathy with neovascularisation; refer urgently", 4, "urgent"),
    ("moderate NPDR", 2, None),
    ("No apparent retinopathy. Rescreen in 12 months.", 0, "none"),
    ("no DR", 0, None), ("DR: none", 0, None), ("Negative for diabetic retinopathy", 0, None),
    ("Without retinopathy; no referral needed", 0, "none"),
    ("No evidence of severe NPDR or PDR; moderate NPDR present.", 2, None),
    ("No haemorrhages, exudates, or PDR.", None, None),  # a negated list
    ("No referral needed for the mild NPDR.", 1, "none"),  # a referral phrase negates no grade
    ("Not proliferative but severe non-proliferative disease", 3, None),
    ("Proliferative disease is not seen. Refer soon.", None, "soon"),
    ("Mild to moderate NPDR", 2, None),  # two levels: the higher
    ("ICDR grade 2, routine referral", 2, "routine"), ("R3a", 4, None), ("Background retinopathy", 1, None),
    ("Refer routinely; refer urgently if vision deteriorates.", None, "routine"),  # hypothetical
    ("There is no need to refer urgently.", None, None),
    ("Does not need urgent referral; refer routinely", None, "routine"),
    ("Non-urgent referral for moderate NPDR", 2, "routine"),
    ("Proliferative vitreoretinopathy", None, None), ("NPDR", None, None), ("Blurred image", None, None),
])
def test_report_parsing_with_negation(text, grade, referral):
    assert parse_grade(text) == grade
    assert parse_referral(text) == referral


@pytest.mark.parametrize("first, second", [
    ("No signs of proliferative disease.", "Refer routinely."),
    ("No diabetic retinopathy in the right eye.", "Moderate NPDR in the left eye."),
    ("Refer soon.", "Refer urgently."),
    ("Severe NPDR.", "No PDR."),
])
def test_report_parsing_has_no_order_bias(first, second):
    forward, backward = f"{first} {second}", f"{second} {first}"
    assert parse_grade(forward) == parse_grade(backward)
    assert parse_referral(forward) == parse_referral(backward)


# -- fundus reports: evaluator -----------------------------------------------------------------------------
REFERRAL_OF_GRADE = ["none", "routine", "routine", "soon", "urgent"]


def _report(grade: int) -> str:
    phrase = next(p for p, level in REFERRAL_PHRASES.items() if level == REFERRAL_OF_GRADE[grade])
    return f"The fundus photograph shows {GRADE_NAMES[grade]}, {phrase}."


def _report_row(generated: str, grade: int) -> dict:
    return {"question": "Describe the fundus.", "answer": _report(grade), "generated": generated, "parsed": None,
            "ranked": None, "choices": [], "meta": {"grade": grade, "referral": REFERRAL_OF_GRADE[grade]}}


def test_report_evaluator_identical_reports():
    rows = [_report_row(_report(g), g) for g in range(5)]
    m = ReportEvaluator(n_boot=100)(rows, "test")
    assert m["test/bleu"] == pytest.approx(100) and m["test/rouge_l"] == pytest.approx(1.0)
    assert m["test/bleu_ci_low"] == pytest.approx(100) and m["test/bleu_ci_high"] == pytest.approx(100)
    assert m["test/grade_acc"] == m["test/grade_macro_f1"] == m["test/referral_macro_f1"] == 1.0
    assert m["test/grade_unparsed"] == m["test/referral_unparsed"] == 0


def test_report_evaluator_clinical_scores_on_a_known_confusion():
    truth = [0, 0, 1, 1, 2, 2]
    generated = [_report(0), _report(0), _report(1), _report(2), _report(2), "The image is too blurred to grade."]
    rows = [_report_row(g, t) for g, t in zip(generated, truth)]
    m = ReportEvaluator(n_boot=200)(rows, "val")
    # grade F1: class 0: 2tp -> 1; class 1: 1tp 1fn -> 2/3; class 2: 1tp 1fp 1fn (unreadable) -> 1/2
    assert m["val/grade_acc"] == pytest.approx(4 / 6)
    assert m["val/grade_f1/0"] == pytest.approx(1.0)
    assert m["val/grade_f1/1"] == pytest.approx(2 / 3)
    assert m["val/grade_f1/2"] == pytest.approx(1 / 2)
    assert m["val/grade_macro_f1"] == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    assert m["val/grade_unparsed"] == 1 and "val/grade_f1/3" not in m
    # referral (none, none, routine, routine, routine, routine): the unreadable one misses "routine"
    assert m["val/referral_acc"] == pytest.approx(5 / 6) and m["val/referral_unparsed"] == 1
    assert m["val/referral_f1/routine"] == pytest.approx(2 * 3 / (2 * 3 + 1))
    for name in ("grade_macro_f1", "referral_macro_f1", "bleu"):
        assert m[f"val/{name}_ci_low"] <= m[f"val/{name}"] <= m[f"val/{name}_ci_high"], name
    assert m["val/bleu"] < 100 and m["val/bleu_ci_low"] < m["val/bleu_ci_high"]
    assert 0 < m["val/rouge_l"] < 1


def test_macro_f1_of_labels_counts_unparsed_and_unknown_answers_as_misses():
    truth = ["slow", "fast", "fast", "slow"]
    assert macro_f1(truth, truth) == 1.0
    # slow: tp 1, fn 1 -> 2/3; fast: tp 1, fp 0, fn 1 (None) -> 2/3
    assert macro_f1(truth, ["slow", None, "fast", "irregular"]) == pytest.approx(2 / 3)


def test_f1_scores_counts_unreadable_as_wrong():
    macro, per_class = f1_scores([0, 1, 1], [0, None, 1], n_classes=2)
    assert per_class == pytest.approx({0: 1.0, 1: 2 / 3}) and macro == pytest.approx(5 / 6)


def test_report_evaluator_reads_truth_from_reference_and_rejects_bad_rows():
    row = {"answer": _report(4), "generated": _report(4), "meta": {}}
    m = ReportEvaluator(n_boot=10)([row], "test")
    assert m["test/grade_f1/4"] == 1.0 and m["test/referral_f1/urgent"] == 1.0
    with pytest.raises(DataError, match="row 0: no meta\\['grade'\\]"):
        ReportEvaluator()([{"answer": "Blurred.", "generated": "x", "meta": {}}], "test")
    with pytest.raises(DataError, match="row 0: meta\\['grade'\\] must be an ICDR grade 0-4, got 7"):
        ReportEvaluator()([{**row, "meta": {"grade": 7, "referral": "none"}}], "test")
    with pytest.raises(DataError, match="row 0: meta\\['referral'\\] must be one of"):
        ReportEvaluator()([{**row, "meta": {"grade": 1, "referral": "refer later"}}], "test")
    with pytest.raises(DataError, match="row 0: missing keys \\['generated'\\]"):
        ReportEvaluator()([{"answer": "x", "meta": {"grade": 0, "referral": "none"}}], "test")
