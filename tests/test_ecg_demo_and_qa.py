from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import wfdb
from conftest import shared_data
from scipy.signal import butter, find_peaks, sosfiltfilt

from datamodules.ecg import STANDARD_LEADS, ptbxl_record_path, read_ptbxl_database, read_wfdb_record
from datamodules.ecg_qa import read_ecg_qa
from datamodules.synthetic.ecg import (
    DEMO_CLASSES,
    ECGQA_ATTRIBUTE,
    PTBXL_COLUMNS,
    RHYTHMS,
    SCP_STATEMENTS_HEADER,
    SCP_STATEMENTS_ROWS,
    Patient,
    generate_ecg_demo,
    synthesize_ecg,
)
from mmclin.errors import DataError

N_RECORDS = 80  # the minimum: 8 classes x 10 folds
CLASS_OF_CODES = {frozenset(c.scp_codes): c for c in DEMO_CLASSES}
CODE_OF_ATTRIBUTE = {attribute: code for code, attribute in ECGQA_ATTRIBUTE.items()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return generate_ecg_demo(tmp_path_factory.mktemp("ecg-demo") / "ptbxl", n_records=N_RECORDS, seed=0)


@pytest.fixture(scope="module")
def database(demo):
    return read_ptbxl_database(demo / "ptbxl_database.csv", demo / "scp_statements.csv")


def _demo_class(codes: dict):
    return CLASS_OF_CODES[frozenset(codes)]


def _r_peaks(signal: np.ndarray, fs: float) -> np.ndarray:
    """R peaks in lead II: 5-30 Hz band-pass (drops baseline wander and T waves), then peaks >= 40% of the top."""
    band = sosfiltfilt(butter(2, [5, 30], btype="band", fs=fs, output="sos"), signal[STANDARD_LEADS.index("II")])
    peaks, _ = find_peaks(band, distance=int(0.25 * fs), height=0.4 * np.percentile(band, 99))
    return peaks


def _qrs_ms(signal: np.ndarray, fs: float, peaks: np.ndarray) -> float:
    """Crude QRS duration: span where the median beat's spatial velocity (all 12 leads) is >= 20% of its peak."""
    clean = sosfiltfilt(butter(2, [0.5, 40], btype="band", fs=fs, output="sos"), signal)
    pre, post = int(0.12 * fs), int(0.15 * fs)
    beat = np.median([clean[:, p - pre:p + post] for p in peaks if pre <= p <= clean.shape[1] - post], axis=0)
    velocity = np.sqrt((np.diff(beat, axis=1) ** 2).sum(axis=0))
    above = np.flatnonzero(velocity >= 0.2 * velocity.max())
    return (above[-1] - above[0]) / fs * 1000


def test_demo_tree_reads_as_ptbxl_in_mv_at_both_rates(demo, database):
    assert list(database.index) == list(range(1, N_RECORDS + 1))
    with open(demo / "ptbxl_database.csv", newline="") as f:
        assert tuple(next(csv.reader(f))) == PTBXL_COLUMNS
    superclass = {"NORM": ["NORM"], "SBRAD": ["NORM"], "STACH": ["NORM"], "AFIB": [], "CLBBB": ["CD"],
                  "CRBBB": ["CD"], "ISCAL": ["STTC"], "AMI": ["MI"]}
    for ecg_id, row in database.iterrows():
        assert row["diagnostic_superclass"] == superclass[_demo_class(row["scp_codes"]).name]
        hr = read_wfdb_record(ptbxl_record_path(demo, ecg_id, row, fs=500))
        lr = read_wfdb_record(ptbxl_record_path(demo, ecg_id, row, fs=100))
        assert hr.record.endswith(f"records500/00000/{ecg_id:05d}_hr") and lr.record.endswith(f"{ecg_id:05d}_lr")
        assert hr.signal.shape == (12, 5000) and hr.fs == 500.0 and lr.signal.shape == (12, 1000) and lr.fs == 100.0
        assert tuple(hr.lead_names) == tuple(lr.lead_names) == STANDARD_LEADS and hr.source_units == ["mV"] * 12
        lead = dict(zip(STANDARD_LEADS, hr.signal))
        assert 0.4 < np.ptp(lead["II"]) < 4.0  # mV: R waves around 1 mV, not adu or uV
        # limb leads come from one heart dipole and three electrodes: Einthoven and Goldberger hold (2 adu rounding)
        np.testing.assert_allclose(lead["III"], lead["II"] - lead["I"], atol=0.0025)
        np.testing.assert_allclose(lead["aVR"], -(lead["I"] + lead["II"]) / 2, atol=0.0025)
        # the 100 Hz record is the 500 Hz one low-passed and decimated
        assert np.median(np.abs(lr.signal - hr.signal[:, ::5])) < 0.03


def test_layout_matches_the_real_ptbxl_files(demo):
    real = shared_data("ptbxl_cinc2021_sample")
    with open(real / "ptbxl_database_rows_6000-6009.csv", newline="") as f:
        assert tuple(next(csv.reader(f))) == PTBXL_COLUMNS
    with open(real / "scp_statements.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == SCP_STATEMENTS_HEADER
    real_rows = {r[0]: tuple(r) for r in rows[1:]}
    for ours in SCP_STATEMENTS_ROWS:
        assert ours == real_rows[ours[0]], f"{ours[0]} differs from PTB-XL's scp_statements.csv"
    ours_order = [r[0] for r in SCP_STATEMENTS_ROWS]
    assert ours_order == [code for code in real_rows if code in ours_order]
    ours, theirs = wfdb.rdheader(str(demo / "records500/00000/00001_hr")), wfdb.rdheader(str(real / "HR06000"))
    assert (ours.fs, ours.sig_len, ours.fmt, ours.adc_gain, ours.baseline) == (
        theirs.fs, theirs.sig_len, theirs.fmt, theirs.adc_gain, theirs.baseline)
    assert [u.lower() for u in ours.units] == [u.lower() for u in theirs.units]


def test_rhythm_and_qrs_width_are_in_the_signal(demo, database):
    rates, cvs, qrs = {}, {}, {}
    for ecg_id, row in database.iterrows():
        name = _demo_class(row["scp_codes"]).name
        ecg = read_wfdb_record(ptbxl_record_path(demo, ecg_id, row))
        peaks = _r_peaks(ecg.signal, ecg.fs)
        rr = np.diff(peaks) / ecg.fs
        rates.setdefault(name, []).append(60 / np.median(rr))
        cvs.setdefault(name, []).append(rr.std() / rr.mean())
        qrs.setdefault(name, []).append(_qrs_ms(ecg.signal, ecg.fs, peaks))
    assert max(rates["SBRAD"]) < 60 and min(rates["STACH"]) > 100
    for name in ("NORM", "CLBBB", "CRBBB", "ISCAL", "AMI"):
        assert 60 <= min(rates[name]) and max(rates[name]) <= 100, name
    sinus_cv = max(max(v) for k, v in cvs.items() if k != "AFIB")
    assert sinus_cv < 0.06 and min(cvs["AFIB"]) > 2 * sinus_cv  # AF: irregularly irregular
    assert min(qrs["CLBBB"] + qrs["CRBBB"]) > 120
    assert max(max(v) for k, v in qrs.items() if "BBB" not in k) < 110


def test_folds_are_stratified_and_patients_stay_in_one_fold(database):
    classes = database["scp_codes"].map(lambda codes: _demo_class(codes).name)
    for fold, names in classes.groupby(database["strat_fold"]):
        assert set(names) == {c.name for c in DEMO_CLASSES}, f"fold {fold}"
    records_per_patient = database.groupby("patient_id").size()
    assert records_per_patient.max() == 2 and (records_per_patient == 2).sum() >= 5
    assert (database.groupby("patient_id")["strat_fold"].nunique() == 1).all()
    assert database["split"].value_counts().to_dict() == {"train": 64, "val": 8, "test": 8}


def test_ecg_qa_reader_on_the_demo(demo, database):
    root = demo / "ecgqa" / "ptbxl"
    table = read_ecg_qa(root, database)
    assert table.attrs["n_skipped_missing_ecg"] == 0
    for split, folder in (("train", "train"), ("val", "valid"), ("test", "test")):
        n_json = sum(len(json.loads(p.read_text())) for p in (root / "paraphrased" / folder).glob("*.json"))
        assert (table["split"] == split).sum() == n_json > 0
    assert {"single-verify", "single-choose", "single-query"} <= set(table["question_type"])
    assert all(set(answer) <= set(choices) for answer, choices in zip(table["answer"], table["choices"]))
    verify = table[table["question_type"].str.endswith("verify")]
    assert 0.4 <= (verify["answer"].str[0] == "yes").mean() <= 0.6
    choose = table[table["question_type"] == "single-choose"]
    assert all(c[:2] == a for c, a in zip(choose["choices"], choose["attribute"]))
    # answers agree with the PTB-XL labels, and each question sits in its ECGs' split
    for row in table.itertuples():
        assert {database.loc[e, "split"] for e in row.ecg_ids} == {row.split}
        codes = database.loc[row.ecg_ids[0], "scp_codes"]
        if row.question_type == "single-verify":
            assert (CODE_OF_ATTRIBUTE[row.attribute[0]] in codes) == (row.answer == ["yes"])
        if row.question_type == "single-query" and row.choices == sorted(RHYTHMS):
            assert row.answer == [_demo_class(codes).rhythm]
    # the template version holds the same samples, with the unparaphrased wording
    template = read_ecg_qa(root, database, version="template")
    assert template[["split", "sample_id", "question_id"]].equals(table[["split", "sample_id", "question_id"]])
    assert template["answer"].equals(table["answer"]) and not template["question"].equals(table["question"])


def _copy_qa(demo, tmp_path):
    root = tmp_path / "ptbxl"
    shutil.copytree(demo / "ecgqa" / "ptbxl", root)
    path = root / "paraphrased" / "train" / "00000.json"
    return root, path, json.loads(path.read_text())


def test_ecg_qa_reader_names_unknown_ecgs_and_answers_outside_the_set(demo, database, tmp_path):
    root, path, entries = _copy_qa(demo, tmp_path)
    entries[3]["ecg_id"] = [99999]
    path.write_text(json.dumps(entries))
    question_id = entries[3]["question_id"]
    with pytest.raises(DataError, match=rf"00000.json sample_id 3 \(question_id {question_id},.*ecg_id 99999 not in"):
        read_ecg_qa(root, database)
    full = read_ecg_qa(demo / "ecgqa" / "ptbxl", database)
    skipped = read_ecg_qa(root, database, on_missing="skip")
    assert skipped.attrs["n_skipped_missing_ecg"] == 1 and len(skipped) == len(full) - 1

    root, path, entries = _copy_qa(demo, tmp_path / "b")
    i = next(i for i, e in enumerate(entries) if e["question_type"] == "single-query")
    entries[i]["answer"] = ["atrial flutter"]
    path.write_text(json.dumps(entries))
    with pytest.raises(DataError, match=rf"question_id {entries[i]['question_id']},.*'atrial flutter'\] not in the "
                                        "template's answer set"):
        read_ecg_qa(root)
    # without answers_for_each_template.csv: verify/choose still checked, query answer sets derived from the data
    (root / "answers_for_each_template.csv").unlink()
    derived = read_ecg_qa(root)
    assert "atrial flutter" in derived.loc[derived["sample_id"] == entries[i]["sample_id"], "choices"].iloc[0]
    entries[0]["answer"] = ["maybe"]
    path.write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"sample_id 0 .*\['maybe'\] not in the choices"):
        read_ecg_qa(root)


def test_generation_is_reproducible_and_reused(demo, tmp_path):
    again = generate_ecg_demo(tmp_path / "again", n_records=N_RECORDS, seed=0)
    for name in ("ptbxl_database.csv", "records500/00000/00042_hr.dat", "records100/00000/00042_lr.dat",
                 "ecgqa/ptbxl/paraphrased/train/00000.json", "ecgqa/ptbxl/answers_for_each_template.csv"):
        assert (again / name).read_bytes() == (demo / name).read_bytes(), name
    stamp = (again / "ptbxl_database.csv").stat().st_mtime_ns
    assert generate_ecg_demo(again, n_records=N_RECORDS, seed=0) == again
    assert (again / "ptbxl_database.csv").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="made with"):
        generate_ecg_demo(again, n_records=N_RECORDS, seed=1)
    with pytest.raises(ValueError, match="at least 80"):
        generate_ecg_demo(tmp_path / "small", n_records=40)
    patient = Patient(1, 0, 50, 170.0, 70.0, axis_deg=45.0, qrs_scale=1.0)
    one, two, other = (synthesize_ecg("AFIB", patient, 90.0, np.random.default_rng(s)) for s in (3, 3, 4))
    assert np.array_equal(one, two) and not np.allclose(one, other)
