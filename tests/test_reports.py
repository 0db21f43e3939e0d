"""Report readers, section parsing, error injection, the rule checker, scoring and tools/report_error_check.py."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from datamodules.reports import (
    content_key,
    duplicate_groups,
    read_iu_xray,
    read_mimic_reports,
    read_r2gen,
    read_reports,
    split_studies,
)
from mmclin.errors import CheckpointError, ConfigError, DataError
from mmclin.reports.injection import _DEVICE as DEVICE_PATTERN
from mmclin.reports.injection import (
    COMPARISON_WORDS,
    FINE_TYPES,
    HOMOPHONES,
    KNOWN_WORDS,
    MEDICAL_VOCABULARY,
    corpus_summary,
    inject,
    inject_corpus,
)
from mmclin.reports.rules import RuleChecker
from mmclin.reports.scoring import image_dependent_difference, score_checker, write_confusion_matrices
from mmclin.reports.sections import (
    SEVERITY_RANK,
    Report,
    body_regions,
    find_mentions,
    parse_sections,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import report_error_check  # noqa: E402

# A MIMIC-CXR-style report with a site for every error type but comparison_insertion (it has a prior).
RICH = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PORTABLE AP)

 INDICATION:  ___-year-old man with fever, intubated.

 COMPARISON:  Chest radiograph ___.

 FINDINGS:

 Endotracheal tube tip terminates 4 cm above the carina. Nasogastric tube courses
 below the diaphragm with the tip in the stomach. Right PICC line tip is in the
 lower SVC. There is a small left pleural effusion with adjacent atelectasis in
 the left lower lobe. Moderate cardiomegaly is unchanged. A 1.2 cm nodule is seen
 in the right upper lobe, unchanged. There is no pneumothorax.

 IMPRESSION:

 Small left pleural effusion, increased from prior. No pneumothorax.
"""
# IU-Xray uid 1 (Open-i), a normal study.
IU_NORMAL = ("INDICATION: Positive TB test\nCOMPARISON: None.\nFINDINGS: The cardiac silhouette and mediastinum size "
             "are within normal limits. There is no pulmonary edema. There is no focal consolidation. There are no "
             "XXXX of a pleural effusion. There is no evidence of pneumothorax.\nIMPRESSION: Normal chest x-XXXX.")
IU_ROWS = [
    ["1", "normal", "normal", "Xray Chest PA and Lateral", "Positive TB test", "None.",
     "The cardiac silhouette and mediastinum size are within normal limits. There is no pulmonary edema. There is no "
     "focal consolidation. There are no XXXX of a pleural effusion. There is no evidence of pneumothorax.",
     "Normal chest x-XXXX."],
    ["2", "Cardiomegaly/borderline", "Cardiomegaly", "Chest, 2 views, frontal and lateral", "Preop bariatric surgery.",
     "None.", "Borderline cardiomegaly. Midline sternotomy XXXX. Enlarged pulmonary arteries. Clear lungs. Inferior "
     "XXXX XXXX XXXX.", "No acute pulmonary findings."],
    ["3", "normal", "normal", "Xray Chest PA and Lateral", "rib pain after a XXXX", "",
     "Both lungs are clear and expanded. Heart and mediastinum normal.", "No active disease."],
    ["4", "Pleural Effusion/left/small", "Pleural Effusion", "PA and lateral chest", "Shortness of breath", "XXXX",
     "There is a small left pleural effusion. Mild left basilar atelectasis. The heart size is normal. No "
     "pneumothorax.", "Small left pleural effusion with left basilar atelectasis."],
    ["5", "Nodule/lung/upper lobe/right", "Nodule", "Chest 2 views", "Cough", "Chest radiograph XXXX",
     "A 1.5 cm nodule is seen in the right upper lobe, unchanged. The heart is normal in size. The lungs are "
     "otherwise clear. No pleural effusion or pneumothorax.", "Stable 1.5 cm right upper lobe nodule."],
    ["6", "Calcified Granuloma", "Calcified Granuloma", "PA and lateral", "XXXX-year-old female with chest pain",
     "None", "Heart size within normal limits. Calcified granuloma in the right upper lobe. No focal airspace "
     "disease. No pneumothorax or effusion.", "No acute cardiopulmonary abnormality."],
    ["7", "normal", "normal", "Chest PA and lateral", "Dyspnea", "None.",
     "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear.", ""],
    ["8", "Opacity/lung/lower lobe/right", "Opacity", "PA and lateral", "Fever and cough", "XXXX, XXXX",
     "There is patchy opacity in the right lower lobe. The heart size is normal. No pleural effusion.",
     "Right lower lobe pneumonia."],
]
IU_HEADER = "uid,MeSH,Problems,image,indication,comparison,findings,impression"
# Clean MIMIC-CXR-style reports with hedges, lists, bilateral and stable findings that must not read as errors.
MIMIC_CLEAN = [
    "FINDINGS: Moderate to severe cardiomegaly is unchanged. There is mild pulmonary vascular congestion. Small "
    "bilateral pleural effusions are present with adjacent bibasilar atelectasis. No pneumothorax.\nIMPRESSION: "
    "Moderate to severe cardiomegaly with mild pulmonary vascular congestion and small bilateral pleural effusions.",
    "FINDINGS: Endotracheal tube terminates approximately 5 cm above the carina. An enteric tube courses below the "
    "diaphragm, tip not visualized. Right internal jugular central venous catheter tip is in the mid SVC. Patchy "
    "opacities at the lung bases likely reflect atelectasis, though infection cannot be excluded. No large pleural "
    "effusion. No pneumothorax.\nIMPRESSION: Lines and tubes in standard position. Bibasilar opacities, likely "
    "atelectasis.",
    "FINDINGS: There is a new left lower lobe consolidation concerning for pneumonia. Small left pleural effusion. "
    "The right lung is clear. Heart size is normal.\nIMPRESSION: Left lower lobe pneumonia with small left pleural "
    "effusion.",
    "FINDINGS: Interval increase in size of moderate right pleural effusion. Left lung is clear. Right PICC line "
    "terminates in the low SVC.\nIMPRESSION: Increased moderate right pleural effusion.",
]


def _csv_cell(value: str) -> str:
    return f'"{value}"' if any(c in value for c in ',"\n') else value


def write_iu(folder: Path, rows=IU_ROWS, images: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [IU_HEADER] + [",".join(_csv_cell(v) for v in row) for row in rows]
    (folder / "indiana_reports.csv").write_text("\n".join(lines) + "\n")
    projections = ["uid,filename,projection"]
    for row in rows:
        projections += [f"{row[0]},{row[0]}_IM-0001-4001.dcm.png,Frontal", f"{row[0]},{row[0]}_IM-0001-3001.dcm.png,"
                        "Lateral"]
    (folder / "indiana_projections.csv").write_text("\n".join(projections) + "\n")
    if images:
        (folder / "images").mkdir(exist_ok=True)
        for row in rows:
            for kind in ("4001", "3001"):
                (folder / "images" / f"{row[0]}_IM-0001-{kind}.dcm.png").write_bytes(b"png")
    return folder / "indiana_reports.csv"


# ---------------------------------------------------------------------------------------------- sections


def test_sections_case_insensitive_headers_keep_deid_markers_and_empty_is_none():
    text = ("Indication: ___F with cough.\ncomparison:\nFindings: No XXXX of effusion. Heart size is normal. Compared "
            "with comparison: ___ none.\nIMPRESSION:   \n\n")
    sections = parse_sections(text)
    assert sections["indication"] == "___F with cough."
    assert sections["comparison"] is None and sections["impression"] is None
    # XXXX and ___ kept verbatim; "comparison:" mid-sentence is not a header
    assert sections["findings"] == "No XXXX of effusion. Heart size is normal. Compared with comparison: ___ none."
    assert parse_sections("The lungs are clear.") == {"indication": None, "comparison": None,
                                                      "findings": "The lungs are clear.", "impression": None}
    assert parse_sections("The lungs are clear.", headerless=None)["findings"] is None
    regions = body_regions(RICH)
    assert [name for name, _, _ in regions] == ["findings", "impression"]
    assert RICH[regions[1][1]:regions[1][2]] == "Small left pleural effusion, increased from prior. No pneumothorax."


def test_mentions_read_negation_uncertainty_and_qualifiers():
    text = ("FINDINGS: There is no pleural effusion or pneumothorax. Small left pleural effusion. No new consolidation."
            " Possible right lower lobe pneumonia. Pneumothorax is not seen. The heart size is normal.\nIMPRESSION: "
            "Small left effusion.")
    got = [(m.term, m.polarity, m.section, tuple(sorted(m.sides))) for m in find_mentions(text)]
    assert got == [("effusion", "negated", "findings", ()), ("pneumothorax", "negated", "findings", ()),
                   ("effusion", "asserted", "findings", ("left",)), ("consolidation", "weak", "findings", ()),
                   ("pneumonia", "uncertain", "findings", ("right",)), ("pneumothorax", "negated", "findings", ()),
                   ("cardiomegaly", "negated", "findings", ()), ("effusion", "asserted", "impression", ("left",))]


# ----------------------------------------------------------------------------------------------- readers


def test_iu_csv_pair_reads_sections_images_and_keeps_xxxx(tmp_path):
    csv = write_iu(tmp_path)
    result = read_iu_xray(csv, image_root=tmp_path / "images")
    assert [r.id for r in result] == [str(i) for i in range(1, 9)] and result.skipped == []
    first = result[0]
    assert first.sections["findings"].endswith("There are no XXXX of a pleural effusion. There is no evidence of "
                                               "pneumothorax.")
    assert first.sections["impression"] == "Normal chest x-XXXX." and first.sections["comparison"] == "None."
    assert first.text == IU_NORMAL and first.split is None
    assert [Path(p).name for p in first.images] == ["1_IM-0001-4001.dcm.png", "1_IM-0001-3001.dcm.png"]
    assert all(Path(p).is_file() for p in first.images)
    assert result[2].sections["comparison"] is None  # empty cell -> None, not ""
    assert result[6].sections["impression"] is None and result[6].text.endswith("The lungs are clear.")
    # the sections of the composed text read back as the columns
    assert parse_sections(first.text) == first.sections


def test_a_corpus_without_splits_is_split_by_study_as_the_datamodule_does(tmp_path):
    csv = write_iu(tmp_path)
    reports = read_iu_xray(csv).reports
    ids = [r.id for r in reports]
    split_of = split_studies(ids, groups=[content_key(r.sections) for r in reports])
    for split in ("train", "val", "test"):
        assert [r.id for r in read_reports(csv, "iu-csv", split=split).reports] == [i for i in ids
                                                                                   if split_of[i] == split]
    assert sum(v == "test" for v in split_of.values()) == round(0.15 * len(ids))


def test_split_keeps_templated_reports_on_one_side():
    # 40 studies, 30 of them one normal template written with other case and spacing: the template must not leak
    texts = ["Lungs are clear. | No acute disease.", "lungs are  clear | no acute disease"] * 15 + [
        f"Nodule {i} mm. | Nodule." for i in range(10)]
    keys = [content_key({"findings": t.split("|")[0], "impression": t.split("|")[1]}) for t in texts]
    assert len(set(keys)) == 11
    ids = [str(i) for i in range(40)]
    split_of = split_studies(ids, 0.15, 0.15, seed=3, groups=keys)
    for key in set(keys):
        assert len({split_of[i] for i, k in zip(ids, keys) if k == key}) == 1
    assert duplicate_groups(keys) == {"n_groups": 1, "n_reports": 30}


def test_iu_bad_rows_raise_with_uid_or_are_skipped_and_counted(tmp_path):
    rows = [list(r) for r in IU_ROWS[:4]]
    rows[1][6] = rows[1][7] = "  "  # uid 2: no findings, no impression
    csv = write_iu(tmp_path, rows + [rows[0]])  # uid 1 again in row 5
    raw = csv.read_bytes().replace(b"Shortness of breath", b"Shortness \xff of breath")  # uid 4: not UTF-8
    csv.write_bytes(raw)
    (tmp_path / "images" / "3_IM-0001-3001.dcm.png").unlink()  # uid 3: image missing
    with pytest.raises(DataError, match=r"row 2 \(uid 2\): no findings and no impression \(--on-error skip"):
        read_iu_xray(csv)
    result = read_iu_xray(csv, image_root=tmp_path / "images", on_error="skip")
    assert [r.id for r in result] == ["1"]
    reasons = dict(result.skipped)
    assert len(reasons) == 4
    assert "uid 1 appears twice" in reasons[f"{csv} row 5 (uid 1)"]
    assert "no findings and no impression" in reasons[f"{csv} row 2 (uid 2)"]
    missing_image = reasons[f"{csv} row 3 (uid 3)"]
    assert "3_IM-0001-3001.dcm.png" in missing_image and "not found" in missing_image
    assert "byte 0xff" in reasons[f"{csv} row 4 (uid 4)"] and "not UTF-8" in reasons[f"{csv} row 4 (uid 4)"]
    # a missing column fails the file whatever on_error says
    (tmp_path / "bad.csv").write_text("uid,MeSH,findings\n1,normal,Clear lungs.\n")
    with pytest.raises(DataError, match=r"bad\.csv: missing column\(s\) \['Problems', 'image', 'indication'"):
        read_iu_xray(tmp_path / "bad.csv", on_error="skip")


def test_r2gen_annotation_json(tmp_path):
    (tmp_path / "images" / "CXR2384_IM-0942").mkdir(parents=True)
    for i in (0, 1):
        (tmp_path / "images" / "CXR2384_IM-0942" / f"{i}.png").write_bytes(b"png")
    data = {"train": [{"id": "CXR2384_IM-0942", "report": "The heart size and pulmonary vascularity appear within "
                       "normal limits. XXXX are clear. No pneumothorax.",
                       "image_path": ["CXR2384_IM-0942/0.png", "CXR2384_IM-0942/1.png"], "split": "train"}],
            "val": [{"id": "CXR1001_IM-0004", "report": "FINDINGS: Small right effusion. IMPRESSION: Effusion.",
                     "image_path": ["CXR1001_IM-0004/0.png"], "split": "val"}],
            "test": [{"id": "CXR9_IM-0001", "report": "   ", "image_path": [], "split": "test"}]}
    path = tmp_path / "annotation.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"\[test\]\[0\] \(id CXR9_IM-0001\): empty report"):
        read_r2gen(path)
    result = read_r2gen(path, on_error="skip")
    assert [(r.id, r.split) for r in result] == [("CXR2384_IM-0942", "train"), ("CXR1001_IM-0004", "val")]
    assert result[0].sections["findings"].startswith("The heart size") and result[0].sections["impression"] is None
    assert "XXXX are clear" in result[0].text
    assert result[1].sections == {"indication": None, "comparison": None, "findings": "Small right effusion.",
                                  "impression": "Effusion."}
    assert len(result.skipped) == 1
    # with an image root, the val image is missing
    with_images = read_r2gen(path, image_root=tmp_path / "images", on_error="skip")
    assert [r.id for r in with_images] == ["CXR2384_IM-0942"]
    assert with_images[0].images == [str(tmp_path / "images" / "CXR2384_IM-0942" / f"{i}.png") for i in (0, 1)]
    assert read_reports(tmp_path, "r2gen", on_error="skip", split="val")[0].id == "CXR1001_IM-0004"
    (tmp_path / "other.json").write_text(json.dumps([{"id": 1}]))
    with pytest.raises(DataError, match="expected R2Gen's"):
        read_r2gen(tmp_path / "other.json")


def _mimic_tree(root: Path) -> None:
    study = root / "files" / "p10" / "p10000032"
    study.mkdir(parents=True)
    (study / "s50414267.txt").write_text(RICH)
    (study / "s53189527.txt").write_text(" FINAL REPORT\n EXAMINATION: CHEST\n Findings: Lungs are clear.\n")
    (study / "s56699142.txt").write_text("    \n\n")
    (study / "s57375967.txt").write_bytes(b" FINDINGS: Clear \xe9 lungs.\n IMPRESSION: Normal.\n")
    (study / "s59999999.txt").write_text(" FINAL REPORT\n EXAMINATION: CHEST\n The lungs are clear.\n")
    (study / "s51111111.txt").write_text(" IMPRESSION: No acute cardiopulmonary process.\n")
    rows = ["dicom_id,study_id,subject_id,split",
            "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,50414267,10000032,train",
            "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962,50414267,10000032,train",
            "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,53189527,10000032,validate"] + [
            f"d{s},{s},10000032,test" for s in ("56699142", "57375967", "59999999")]
    (root / "mimic-cxr-2.0.0-split.csv").write_text("\n".join(rows) + "\n")


def test_mimic_tree_and_split_csv(tmp_path):
    _mimic_tree(tmp_path)
    with pytest.raises(DataError, match=r"s51111111\.txt: study 51111111 is not in"):
        read_mimic_reports(tmp_path)
    result = read_mimic_reports(tmp_path, on_error="skip")
    assert [(r.id, r.split) for r in result] == [("s50414267", "train"), ("s53189527", "val")]
    first = result[0]
    assert first.sections["indication"] == "___-year-old man with fever, intubated."
    assert first.sections["comparison"] == "Chest radiograph ___."
    assert first.sections["findings"].startswith("Endotracheal tube tip terminates 4 cm above the carina.")
    assert first.sections["impression"] == "Small left pleural effusion, increased from prior. No pneumothorax."
    assert first.images == ["files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg",
                            "files/p10/p10000032/s50414267/174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962.jpg"]
    assert result[1].sections["findings"] == "Lungs are clear." and result[1].sections["impression"] is None
    why = {Path(w).name: y for w, y in result.skipped}
    assert why["s56699142.txt"] == "empty report"
    assert "not UTF-8" in why["s57375967.txt"]
    assert "no findings and no impression" in why["s59999999.txt"]
    assert "not in" in why["s51111111.txt"]
    # images must exist once an image root is given
    with pytest.raises(DataError, match=r"s50414267\.txt: image\(s\)"):
        read_mimic_reports(tmp_path, image_root=tmp_path / "jpg", on_error="raise")


# --------------------------------------------------------------------------------------------- injection

_CUE = re.compile(r"\b(?:no|not|without|negative)\b", re.IGNORECASE)
_ZONE_PAIRS = {("upper", "lower"), ("lower", "upper"), ("middle", "upper"), ("middle", "lower"),
               ("apical", "basilar"), ("basilar", "apical"), ("basal", "apical"), ("apex", "base"),
               ("apices", "bases"), ("base", "apex"), ("bases", "apices"), ("anterior", "posterior"),
               ("posterior", "anterior")}
_INTERVAL = {"new", "unchanged", "stable", "increased", "decreased", "increasing", "decreasing", "increase",
             "decrease", "improved", "worsened", "improving", "worsening", "improvement"}
_DEVICE = {"endotracheal tube", "nasogastric tube", "orogastric tube", "picc line", "picc", "swan-ganz catheter",
           "central venous catheter",
           "svc", "right atrium", "superior vena cava", "stomach", "esophagus", "above the carina", "below the carina"}


def _one_edit_apart(a: str, b: str) -> bool:
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
                                  and a[diff[1]] == b[diff[0]])
    short, long = sorted((a, b), key=len)
    return any(long[:i] + long[i + 1:] == short for i in range(len(long)))


def _named_kind(fine: str, e) -> None:
    old, new = e.original.lower(), e.new.lower()
    if fine == "negation_flip":
        assert len(_CUE.findall(old)) != len(_CUE.findall(new)), (old, new)
    elif fine == "laterality_swap":
        assert {old, new} == {"left", "right"}
    elif fine == "anatomical_location":
        assert (old, new) in _ZONE_PAIRS
    elif fine == "severity_change":
        assert SEVERITY_RANK[old] != SEVERITY_RANK[new]
    elif fine == "measurement_change":
        if old in ("mm", "cm"):
            assert {old, new} == {"mm", "cm"}
        else:
            assert any(float(new) == pytest.approx(float(old) * f, abs=0.01) for f in (2, 3, 0.5, 10)), (old, new)
    elif fine == "interval_change":
        assert old in _INTERVAL and new in _INTERVAL and old != new
    elif fine == "finding_insertion":
        assert old == "" and e.original_span[0] == e.original_span[1]
        inserted = find_mentions(e.new.strip())
        assert any(m.polarity == "asserted" for m in inserted), e.new
        before = {m.term for m in find_mentions(RICH) if m.polarity == "asserted"}
        assert not {m.term for m in inserted if m.polarity == "asserted"} & before
    elif fine == "finding_omission":
        assert new == "" and e.span[0] == e.span[1]
        dropped = find_mentions(e.original.strip())
        assert any(m.polarity == "asserted" for m in dropped) and old.strip().endswith(".")
    elif fine == "device_change":
        assert " ".join(old.split()) in _DEVICE and new in _DEVICE and old != new
    elif fine == "typo_homophone":
        assert old in MEDICAL_VOCABULARY
        assert HOMOPHONES.get(old) == (new,) or (_one_edit_apart(old, new) and new not in KNOWN_WORDS)
    elif fine == "device_insertion":
        assert old == "" and DEVICE_PATTERN.search(new), new
    elif fine == "contradiction":
        inserted = find_mentions(e.new.strip())
        said = {(m.term, m.polarity) for m in find_mentions(RICH)}
        flipped = {"asserted": "negated", "negated": "asserted"}
        assert any((m.term, flipped.get(m.polarity)) in said for m in inserted), new
    elif fine == "comparison_omission":
        assert new == "" and COMPARISON_WORDS.search(old), old
    else:
        raise AssertionError(fine)


@pytest.mark.parametrize("fine", [t for t in FINE_TYPES if t != "comparison_insertion"])  # RICH has a prior
def test_each_error_type_changes_only_its_span_and_is_the_named_kind(fine):
    regions = [(lo, hi) for _, lo, hi in body_regions(RICH)]
    seen = set()
    for seed in range(6):
        e = inject(RICH, fine, np.random.default_rng(seed))
        assert e is not None and e.fine_type == fine and e.coarse_type == FINE_TYPES[fine]
        a, b = e.original_span
        assert RICH[a:b] == e.original and e.modified[slice(*e.span)] == e.new
        assert e.modified[:a] == RICH[:a] and e.modified[e.span[1]:] == RICH[b:]
        assert e.modified != RICH
        assert any(lo <= a and b <= hi for lo, hi in regions)  # only findings / impression are edited
        _named_kind(fine, e)
        seen.add((a, e.new))
    assert len(seen) > 1  # the seed moves the error


def test_negation_flip_removes_and_adds_cues():
    report = "FINDINGS: There is no pleural effusion. There is a small left pneumothorax."
    flips = {inject(report, "negation_flip", s).modified for s in range(20)}
    assert flips == {"FINDINGS: There is pleural effusion. There is a small left pneumothorax.",
                     "FINDINGS: There is no pleural effusion. There is no small left pneumothorax."}
    flipped = inject("No pleural effusion. Heart normal.", "negation_flip", 0)
    assert flipped.modified == "Pleural effusion. Heart normal."


def test_no_site_gives_none_and_corpus_falls_back_and_counts():
    for fine in ("laterality_swap", "device_change", "measurement_change", "interval_change", "finding_omission"):
        assert inject(IU_NORMAL, fine, 0) is None
    reports = [Report(id=f"r{i}", text=IU_NORMAL, sections=parse_sections(IU_NORMAL)) for i in range(4)]
    records = inject_corpus(reports, error_rate=1.0, seed=0, types=["device_change", "negation_flip"])
    assert all(r["has_error"] and r["fine_type"] == "negation_flip" for r in records)
    # device_change, never used, is tried first whenever the seeded order does not already put negation_flip first
    n_tried = sum(r["no_site"] == ["device_change"] for r in records)
    assert n_tried >= 3 and all(r["no_site"] in ([], ["device_change"]) for r in records)
    summary = corpus_summary(records)
    assert summary["per_type"]["device_change"] == {"coarse_type": "substitute", "injected": 0, "no_site": n_tried}
    assert summary["per_type"]["negation_flip"]["injected"] == 4
    only_devices = inject_corpus(reports, error_rate=1.0, seed=0, types=["device_change"])
    assert not any(r["has_error"] for r in only_devices) and all(r["modified"] == r["original"] for r in only_devices)
    assert corpus_summary(only_devices)["n_without_any_site"] == 4


def test_corpus_is_seeded_balanced_and_keeps_clean_reports_clean():
    reports = [Report(id=str(i), text=RICH, sections=parse_sections(RICH), images=[f"{i}.jpg"]) for i in range(40)]
    records = inject_corpus(reports, error_rate=0.65, seed=3)
    assert records == inject_corpus(reports, error_rate=0.65, seed=3)
    assert records != inject_corpus(reports, error_rate=0.65, seed=4)
    assert sum(r["has_error"] for r in records) == 26
    counts = corpus_summary(records)["per_type"]
    # RICH has a prior study (no comparison to add), and forty copies of one report lend no finding sentence in
    # the corpus's own words: those two types have no site; the others take turns
    without_site = {"comparison_insertion", "finding_insertion"}
    assert {t for t, c in counts.items() if not c["injected"]} == without_site
    injected = [c["injected"] for t, c in counts.items() if t not in without_site]
    assert sum(injected) == 26 and max(injected) - min(injected) <= 1
    for r in records:
        if r["has_error"]:
            a, b = r["original_span"]
            assert r["modified"] == r["original"][:a] + r["new_text"] + r["original"][b:]
            assert r["modified"][slice(*r["span"])] == r["new_text"]
        else:
            assert r["modified"] == r["original"] and r["fine_type"] is None and r["span"] is None
    assert records[7]["images"] == ["7.jpg"]
    with pytest.raises(ConfigError, match="unknown error type"):
        inject_corpus(reports, types=["spelling"])


# ------------------------------------------------------------------------------------------ rule checker


def test_rule_checker_passes_clean_reports_and_catches_contradictions():
    checker = RuleChecker()
    for clean in [RICH, IU_NORMAL, *MIMIC_CLEAN] + [f"FINDINGS: {r[6]}\nIMPRESSION: {r[7]}" for r in IU_ROWS]:
        assert checker.check(clean) == {"has_error": False, "coarse_type": None, "fine_type": None, "evidence": ""}
    both = "FINDINGS: There is no pleural effusion. Small left pleural effusion is present.\nIMPRESSION: Normal."
    got = checker.check(both)
    assert got["has_error"] and got["coarse_type"] == "insert" and got["fine_type"] == "contradiction"
    assert "effusion negated in 'There is no pleural effusion.'" in got["evidence"]
    flipped = IU_NORMAL.replace("There is no focal consolidation.", "There is focal consolidation.")
    assert checker.check(flipped)["fine_type"] == "negation_flip"
    sides = "FINDINGS: Small left pleural effusion. No pneumothorax.\nIMPRESSION: Small right pleural effusion."
    assert checker.check(sides)["fine_type"] == "laterality_swap"
    assert checker.check("FINDINGS: Consolidation in the left middle lobe.")["fine_type"] == "laterality_swap"
    big = "FINDINGS: A 40 cm nodule is seen in the right upper lobe."
    assert checker.check(big)["fine_type"] == "measurement_change" and "40 cm" in checker.check(big)["evidence"]
    assert checker.check("FINDINGS: A 4.5 cm nodule in the left upper lobe.")["fine_type"] == "measurement_change"
    typo = checker.check(IU_NORMAL.replace("effusion", "effusoin"))
    assert typo["fine_type"] == "typo_homophone" and "'effusoin'" in typo["evidence"]
    assert checker.check("FINDINGS: Small right plural effusion.")["fine_type"] == "typo_homophone"
    tube = "FINDINGS: Nasogastric tube tip terminates 4 cm above the carina. Lungs are clear."
    assert checker.check(tube)["fine_type"] == "device_change"
    assert checker.check(RICH.replace("Chest radiograph ___.", "None.").replace("unchanged", "stable"))[
        "fine_type"] == "comparison_insertion"
    omitted = "FINDINGS: The heart size is normal. The lungs are clear.\nIMPRESSION: Right pneumothorax."
    assert checker.check(omitted)["coarse_type"] == "remove"


# ------------------------------------------------------------------------------------------------ scoring


def test_scoring_on_a_known_confusion(tmp_path):
    records = [{"id": "a", "has_error": True, "coarse_type": "substitute", "fine_type": "laterality_swap"},
               {"id": "b", "has_error": True, "coarse_type": "insert", "fine_type": "finding_insertion"},
               {"id": "c", "has_error": False, "coarse_type": None, "fine_type": None},
               {"id": "d", "has_error": False, "coarse_type": None, "fine_type": None}]
    predictions = [{"id": "d", "has_error": False}, {"id": "b", "has_error": False},
                   {"id": "a", "has_error": True, "fine_type": "laterality_swap"},
                   {"id": "c", "has_error": True, "coarse_type": "substitute", "fine_type": "negation_flip"}]
    s = score_checker(records, predictions, n_boot=200)
    simple = s["simple"]
    for name in ("accuracy", "f1", "precision", "sensitivity", "specificity"):
        assert simple[name] == pytest.approx(0.5)
        low, high = simple[f"{name}_ci"]
        assert 0 <= low <= high <= 1
    assert simple["confusion_matrix"] == [[1, 1], [1, 1]]
    assert simple["sensitivity_by_fine_type"] == {"laterality_swap": {"n": 1, "detected": 1, "sensitivity": 1.0},
                                                  "finding_insertion": {"n": 1, "detected": 0, "sensitivity": 0.0}}
    image = simple["image_dependent"]  # both error types are image-dependent: the same reports as SIMPLE
    assert image["n_error"] == 2 and image["sensitivity"] == pytest.approx(0.5)
    assert image["balanced_accuracy"] == pytest.approx((0.5 + 0.5) / 2) and image["f1"] == pytest.approx(0.5)
    coarse = s["complex_coarse"]
    assert coarse["macro_f1"] == pytest.approx((2 / 3 + 0 + 0.5) / 3)  # substitute, insert, none
    assert coarse["per_type"]["substitute"] == pytest.approx({"f1": 2 / 3, "precision": 0.5, "recall": 1.0,
                                                              "support": 1, "predicted": 2})
    assert coarse["macro_f1_errors"] == pytest.approx(0.5) and coarse["type_accuracy_errors"] == pytest.approx(0.5)
    fine = s["complex_fine"]
    assert fine["macro_f1"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)  # + negation_flip, predicted only
    assert fine["per_type"]["negation_flip"]["support"] == 0 and fine["per_type"]["negation_flip"]["predicted"] == 1
    none = fine["classes"].index("none")
    assert fine["confusion_matrix"][none][none] == 1
    paths = write_confusion_matrices(s, tmp_path)
    assert [p.name for p in paths] == ["confusion_simple.png", "confusion_coarse.png", "confusion_fine.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    with pytest.raises(ValueError, match="no prediction for 1 record"):
        score_checker(records, predictions[:3])
    with pytest.raises(ValueError, match="'finding_insertion' is a 'insert' error, not 'substitute'"):
        score_checker(records, predictions[:3] + [{"id": "c", "has_error": True, "coarse_type": "substitute",
                                                   "fine_type": "finding_insertion"}])


def test_paired_difference_on_the_image_dependent_reports():
    records = ([{"id": f"e{i}", "has_error": True, "coarse_type": "substitute", "fine_type": "laterality_swap"}
                for i in range(20)] + [{"id": f"c{i}", "has_error": False, "coarse_type": None, "fine_type": None}
                                       for i in range(20)]
               + [{"id": "t", "has_error": True, "coarse_type": "substitute", "fine_type": "typo_homophone"}])
    # the reference flags half of the swaps, the other all of them; both pass every clean report
    reference = [{"id": r["id"], "has_error": r["id"] in {f"e{i}" for i in range(10)}} for r in records]
    other = [{"id": r["id"], "has_error": r["has_error"]} for r in records]
    d = image_dependent_difference(records, reference, other, n_boot=200)
    assert d["balanced_accuracy"] == pytest.approx(1.0 - 0.75) and d["f1"] == pytest.approx(1 - 2 * 10 / 30)
    assert 0 < d["balanced_accuracy_ci"][0] <= d["balanced_accuracy"] <= d["balanced_accuracy_ci"][1]
    same = image_dependent_difference(records, other, other, n_boot=50)
    assert same["f1"] == 0 and same["f1_ci"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="other checker: no prediction for 1 record"):
        image_dependent_difference(records, reference, other[1:])
    assert image_dependent_difference(records[-1:], reference, other) == {}  # no clean report to score against


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_inject_and_evaluate_round_trip_on_iu_csv(tmp_path, capsys):
    csv = write_iu(tmp_path / "iu")
    out = tmp_path / "err"
    summary = report_error_check.main(["inject", "--reports", str(csv), "--format", "iu-csv", "--image-root",
                                       str(tmp_path / "iu" / "images"), "--error-rate", "0.5", "--seed", "0",
                                       "--out", str(out)])
    rows = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and sum(r["has_error"] for r in rows) == 4 == summary["n_with_error"]
    assert {"id", "original", "modified", "has_error", "coarse_type", "fine_type", "span"} <= set(rows[0])
    written = json.loads((out / "summary.json").read_text())
    assert sum(v["injected"] for v in written["per_type"].values()) == 4 and written["n_skipped_reports"] == 0
    assert "no site" in capsys.readouterr().out
    first = (out / "errors.jsonl").read_text()
    report_error_check.main(["inject", "--reports", str(tmp_path / "iu"), "--format", "iu-csv", "--image-root",
                             str(tmp_path / "iu" / "images"), "--out", str(out)])
    assert (out / "errors.jsonl").read_text() == first  # seeded

    metrics = report_error_check.main(["evaluate", "--data", str(out), "--checker", "rule", "--n-boot", "100",
                                       "--out", str(out / "rule")])
    saved = json.loads((out / "rule" / "metrics.json").read_text())
    assert saved["n"] == 8 and saved["n_error"] == 4 and saved["checker"] == "rule"
    assert saved["simple"]["specificity"] == 1.0  # the clean IU reports pass the rule checker
    per_type = saved["simple"]["sensitivity_by_fine_type"]
    assert sum(v["n"] for v in per_type.values()) == 4 and set(per_type) <= set(FINE_TYPES)
    assert set(saved["complex_fine"]["per_type"]) >= set(per_type) | {"none"}
    assert metrics["simple"]["accuracy"] == saved["simple"]["accuracy"]
    predictions = [json.loads(line) for line in (out / "rule" / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == [r["id"] for r in rows]
    assert all(p["true_has_error"] == r["has_error"] for p, r in zip(predictions, rows))
    for name in ("simple", "coarse", "fine"):
        assert (out / "rule" / f"confusion_{name}.png").is_file()
    text = capsys.readouterr().out
    assert "SIMPLE   accuracy" in text and "fine macro-F1" in text


def test_evaluate_several_checkers_side_by_side_with_the_paired_difference(tmp_path, monkeypatch, capsys):
    records = [{"id": str(i), "modified": "x", "has_error": i % 2 == 1, "coarse_type": "substitute" if i % 2 else None,
                "fine_type": "negation_flip" if i % 2 else None} for i in range(40)]
    (tmp_path / "errors.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    flags = {"rule": lambda i: False, "ckpt:good.ckpt": lambda i: i % 2 == 1}  # the second one is always right
    monkeypatch.setattr(report_error_check, "load_checker", lambda spec: lambda rows: [
        {"id": r["id"], "has_error": flags[spec](int(r["id"])),
         **({"coarse_type": "substitute", "fine_type": "negation_flip"} if flags[spec](int(r["id"])) else {})}
        for r in rows])
    runs = report_error_check.main(["evaluate", "--data", str(tmp_path), "--checker", "rule", "ckpt:good.ckpt",
                                    "--n-boot", "100", "--out", str(tmp_path / "eval")])
    difference = runs["rule"]["last_minus_this"]
    assert difference["balanced_accuracy"] == pytest.approx(0.5) and difference["balanced_accuracy_ci"][0] > 0.3
    table = (tmp_path / "eval" / "comparison.md").read_text()
    assert "| image-dependent balanced accuracy: last column minus this (paired 95% CI) | +0.500 [" in table
    assert table == capsys.readouterr().out.split("confusion_fine.png\n")[-1]


def _save_checkpoint(module: L.LightningModule, path: Path, class_path: str | None = None) -> Path:
    hparams = dict(module.hparams)
    if class_path:
        hparams["_class_path"] = class_path
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": L.__version__}, path)
    return path


def test_checkpoint_checker_dispatches_on_class(tmp_path, monkeypatch):
    class ReportChecker(L.LightningModule):
        def __init__(self, width: int = 3):
            super().__init__()
            self.save_hyperparameters()
            self.head = torch.nn.Linear(width, 2)

        def predict_reports(self, records):  # as mmclin.models.report_checker: text under "modified", no ids
            return [{"has_error": "plural" in r["modified"], "fine_type": None} for r in records]

    class NotAChecker(ReportChecker):
        predict_reports = None

    fake = types.ModuleType("mmclin.models.report_checker")
    fake.ReportChecker, fake.NotAChecker = ReportChecker, NotAChecker
    ReportChecker.__module__ = NotAChecker.__module__ = fake.__name__
    monkeypatch.setitem(sys.modules, fake.__name__, fake)

    path = _save_checkpoint(ReportChecker(width=4), tmp_path / "checker.ckpt")  # no _class_path: the default class
    check = report_error_check.load_checker(f"ckpt:{path}")
    assert check([{"id": "x", "modified": "Small plural effusion.", "images": []}]) == [
        {"has_error": True, "fine_type": None}]
    assert check.__self__.head.in_features == 4
    # and through `evaluate`, which matches predictions to records by position
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"id": "a", "modified": "Small plural effusion.", "has_error": True, "coarse_type": "substitute",
             "fine_type": "typo_homophone"},
            {"id": "b", "modified": "Lungs are clear.", "has_error": False, "coarse_type": None, "fine_type": None}]
    (data / "errors.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = report_error_check.main(["evaluate", "--data", str(data), "--checker", f"ckpt:{path}", "--n-boot",
                                       "20", "--out", str(tmp_path / "eval")])
    assert metrics["simple"]["accuracy"] == 1.0 and metrics["complex_fine"]["per_type"]["typo_homophone"]["f1"] == 0
    other = _save_checkpoint(NotAChecker(), tmp_path / "other.ckpt", "mmclin.models.report_checker.NotAChecker")
    with pytest.raises(CheckpointError, match="NotAChecker has no predict_reports"):
        report_error_check.load_checker(f"ckpt:{other}")
    evil = _save_checkpoint(ReportChecker(), tmp_path / "evil.ckpt", "os.system")
    with pytest.raises(CheckpointError, match="only classes of"):
        report_error_check.load_checker(f"ckpt:{evil}")
    with pytest.raises(ConfigError, match="unknown"):
        report_error_check.load_checker("gpt")
