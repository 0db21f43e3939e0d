from __future__ import annotations

import datetime as dt
import shutil

import numpy as np
import pytest
import wfdb
from conftest import shared_data
from wfdb.io.convert.edf import read_edf

from datamodules.ecg import STANDARD_LEADS, ptbxl_record_path, read_ptbxl_database, read_wfdb_record
from datamodules.sleep import (
    AASM_STAGES,
    hypnogram_to_epochs,
    pair_sleep_edf_files,
    read_hypnogram,
    read_psg,
    read_scored_psg,
)
from mmclin.errors import DataError

# ---------------------------------------------------------------- real ECG records in ../shared/data


def test_ptbxl_cinc_records_match_their_database_rows():
    root = shared_data("ptbxl_cinc2021_sample")
    table = read_ptbxl_database(root / "ptbxl_database_rows_6000-6009.csv", root / "scp_statements.csv")
    assert list(table.index) == list(range(6000, 6010))
    assert table.loc[6000, "scp_codes"] == {"NORM": 100.0, "NT_": 0.0, "SR": 0.0}
    assert table.loc[6000, "diagnostic_superclass"] == ["NORM"]
    assert table.loc[6001, "diagnostic_superclass"] == ["STTC"]
    assert table.loc[6002, "diagnostic_superclass"] == ["CD", "NORM"]
    assert table.loc[6000, "filename_hr"] == "records500/06000/06000_hr"
    assert table["strat_fold"].tolist() == [10, 7, 4, 6, 10, 3, 4, 5, 6, 2]
    assert table["split"].value_counts().to_dict() == {"train": 8, "test": 2}
    for ecg_id, row in table.iterrows():
        ecg = read_wfdb_record(ptbxl_record_path(root, ecg_id, row))
        assert ecg.record.endswith(f"HR{ecg_id:05d}")
        assert ecg.signal.shape == (12, 5000) and ecg.signal.dtype == np.float32 and ecg.fs == 500.0
        assert tuple(ecg.lead_names) == STANDARD_LEADS and ecg.source_units == ["mv"] * 12
        assert 0.1 < np.abs(ecg.signal).max() < 10.0  # mV, not adu or uV
        # the CinC header and the PTB-XL row describe the same patient (PTB-XL sex: 0 male, 1 female)
        assert f"Age: {int(row['age'])}" in ecg.comments
        assert f"Sex: {'Female' if row['sex'] == 1 else 'Male'}" in ecg.comments
    hr06000 = read_wfdb_record(root / "HR06000.hea")
    assert "Dx: 164934002,426783006" in hr06000.comments
    # first samples are the header's initial values (10 and 625 adu) over the gain, 1000 adu/mV
    np.testing.assert_allclose(hr06000.signal[[0, 11], 0], [0.010, 0.625], atol=1e-6)


def test_mitbih_100_format_212_resampled_with_anti_alias():
    root = shared_data("wfdb_physionet_samples")
    ecg = read_wfdb_record(root / "100")
    assert ecg.signal.shape == (2, 650000) and ecg.fs == 360.0 and ecg.lead_names == ["MLII", "V5"]
    assert ecg.signal.shape[1] / ecg.fs == pytest.approx(1805.56, abs=0.01)  # 30 min 5.6 s
    np.testing.assert_allclose(ecg.signal[:, 0], [(995 - 1024) / 200, (1011 - 1024) / 200], atol=1e-6)
    at500 = read_wfdb_record(root / "100.hea", target_fs=500)
    assert at500.fs == 500.0 and at500.signal.shape == (2, round(650000 * 500 / 360)) == (2, 902778)
    # every 1/20 s both grids meet (18 samples at 360 Hz, 25 at 500 Hz): the waveform is kept
    diff = np.abs(at500.signal[:, ::25][:, : 650000 // 18] - ecg.signal[:, ::18][:, : 650000 // 18])
    assert np.median(diff) < 0.005 and np.percentile(diff, 99) < 0.05


def test_ptb_s0010_re_15_leads_over_two_signal_files(tmp_path):
    root = shared_data("wfdb_physionet_samples")
    ecg = read_wfdb_record(root / "s0010_re")
    assert ecg.signal.shape == (15, 38400) and ecg.fs == 1000.0
    assert ecg.lead_names == [*STANDARD_LEADS, "vx", "vy", "vz"]
    np.testing.assert_allclose(ecg.signal[[0, 14], 0], [-489 / 2000, -18 / 2000], atol=1e-6)
    picked = read_wfdb_record(root / "s0010_re", leads=["AVR", "v6", "VX"], target_fs=500)
    assert picked.lead_names == ["aVR", "V6", "vx"] and picked.signal.shape == (3, 19200)
    with pytest.raises(DataError, match=r"missing requested lead\(s\) \['V7'\]"):
        read_wfdb_record(root / "s0010_re", leads=["I", "V7"])
    for suffix in (".hea", ".dat"):
        shutil.copy(root / f"s0010_re{suffix}", tmp_path)
    with pytest.raises(DataError, match=r"s0010_re.xyz \(leads \['vx', 'vy', 'vz'\]\).* is missing"):
        read_wfdb_record(tmp_path / "s0010_re")


# ---------------------------------------------------------------- broken ECG inputs


def _write_record(folder, name="rec", fs=250, units="mV", nan_at=None, flat_lead=None, n=1000):
    rng = np.random.default_rng(0)
    signal = np.sin(np.linspace(0, 20 * np.pi, n))[:, None] + rng.normal(0, 0.05, (n, 3))
    if nan_at is not None:
        signal[nan_at, 1] = np.nan
    if flat_lead is not None:
        signal[:, flat_lead] = 0.25
    wfdb.wrsamp(name, fs=fs, units=[units] * 3, sig_name=["I", "II", "III"], p_signal=signal, fmt=["16"] * 3,
                write_dir=str(folder))
    return folder / name, signal.T


def test_units_are_converted_to_mv_and_lead_order_follows_the_request(tmp_path):
    path, truth = _write_record(tmp_path, units="uV")
    ecg = read_wfdb_record(path, leads=["iii", "I"])
    assert ecg.lead_names == ["III", "I"] and ecg.source_units == ["uV", "uV"]
    np.testing.assert_allclose(ecg.signal, truth[[2, 0]] / 1000, atol=1e-6)
    pressure, _ = _write_record(tmp_path, name="abp", units="mmHg")
    with pytest.raises(DataError, match=r"abp: lead I is in 'mmHg'; expected a voltage unit"):
        read_wfdb_record(pressure)


def test_missing_signal_file_and_fewer_leads_than_configured(tmp_path):
    path, _ = _write_record(tmp_path)
    with pytest.raises(DataError, match=r"rec: has 3 leads \['I', 'II', 'III'\]; missing requested lead\(s\) "
                                        r"\['aVR', 'aVL', 'aVF', 'V1', 'V2', 'V3', 'V4', 'V5', 'V6'\]"):
        read_wfdb_record(path, leads=STANDARD_LEADS)
    (tmp_path / "rec.dat").unlink()
    with pytest.raises(DataError, match=r"rec.dat \(leads \['I', 'II', 'III'\]\) named in the header is missing"):
        read_wfdb_record(path)
    with pytest.raises(DataError, match=r"nothing.hea: WFDB header not found"):
        read_wfdb_record(tmp_path / "nothing")


@pytest.mark.parametrize("declared, message", [(1200, r"does not hold the 1200 samples x 3 signals"),
                                               (800, r"lead I: checksum .* header length and signal file disagree")])
def test_header_and_signal_length_mismatch(tmp_path, declared, message):
    path, _ = _write_record(tmp_path)
    header = tmp_path / "rec.hea"
    header.write_text(header.read_text().replace("rec 3 250 1000", f"rec 3 250 {declared}"))
    with pytest.raises(DataError, match=message):
        read_wfdb_record(path)


def test_nan_and_flat_leads_are_errors_or_counted(tmp_path):
    path, _ = _write_record(tmp_path, nan_at=[10, 11])
    with pytest.raises(DataError, match=r"rec: NaN \(invalid\) samples per lead \{'II': 2\}"):
        read_wfdb_record(path)
    ecg = read_wfdb_record(path, on_nan="zero")
    assert ecg.n_nan == 2 and ecg.signal[1, 10] == 0.0
    flat, _ = _write_record(tmp_path, name="flat", flat_lead=2)
    with pytest.raises(DataError, match=r"flat: flat-line lead\(s\) \['III'\]"):
        read_wfdb_record(flat)
    assert read_wfdb_record(flat, on_flat="allow").flat_leads == ["III"]
    assert read_wfdb_record(flat, leads=["I", "II"]).flat_leads == []


def test_resampling_filters_what_the_new_rate_cannot_hold(tmp_path):
    t = np.arange(2000) / 1000
    signal = np.stack([np.sin(2 * np.pi * 5 * t), np.sin(2 * np.pi * 200 * t)], axis=1)  # 5 Hz and 200 Hz
    wfdb.wrsamp("tones", fs=1000, units=["mV"] * 2, sig_name=["I", "II"], p_signal=signal, fmt=["16"] * 2,
                write_dir=str(tmp_path))
    ecg = read_wfdb_record(tmp_path / "tones", target_fs=250)
    assert ecg.signal.shape == (2, 500)
    inner = ecg.signal[:, 50:-50]  # away from the edges
    assert 0.95 < np.abs(inner[0]).max() < 1.05  # 5 Hz kept
    assert np.abs(inner[1]).max() < 0.01  # 200 Hz removed; [::4] would alias it to a 50 Hz tone of amplitude 1


def test_ptbxl_unknown_scp_code_and_bad_fold_are_named(tmp_path):
    (tmp_path / "scp.csv").write_text(",description,diagnostic,diagnostic_class\nNORM,normal ECG,1.0,NORM\n"
                                      "SR,sinus rhythm,,\n")
    columns = "ecg_id,scp_codes,strat_fold,filename_lr,filename_hr\n"
    good = "1,\"{'NORM': 100.0, 'SR': 0.0}\",9,records100/00000/00001_lr,records500/00000/00001_hr\n"
    (tmp_path / "db.csv").write_text(columns + good)
    table = read_ptbxl_database(tmp_path / "db.csv", tmp_path / "scp.csv")
    assert table.loc[1, "diagnostic_superclass"] == ["NORM"] and table.loc[1, "split"] == "val"
    (tmp_path / "db.csv").write_text(columns + good + "2,\"{'NORM': 50.0, 'XYZ_': 0.0}\",1,a,b\n")
    with pytest.raises(DataError, match=r"line 3 \(ecg_id 2\): SCP code\(s\) \['XYZ_'\] not in .*scp.csv"):
        read_ptbxl_database(tmp_path / "db.csv", tmp_path / "scp.csv")
    (tmp_path / "db.csv").write_text(columns + good + "3,\"{'NORM': 50.0}\",11,a,b\n")
    with pytest.raises(DataError, match=r"ecg_id 3\): strat_fold 11; expected an integer 1-10"):
        read_ptbxl_database(tmp_path / "db.csv", tmp_path / "scp.csv")
    with pytest.raises(DataError, match=r"ecg_id 1: no WFDB header at .*00001_hr.hea.*HR00001.hea"):
        ptbxl_record_path(tmp_path, 1, table.loc[1])


# ---------------------------------------------------------------- sleep: real EDF+ hypnogram


def test_real_edf_plus_hypnogram_hmc_labels():
    path = shared_data("wfdb_physionet_samples") / "test_edfann.edf"
    annotations = read_hypnogram(path)
    # the file: 856 annotations = 854 30-s stages from 0 to 25620 s (7.12 h) + lights off/on with a channel suffix
    assert len(annotations) == 856
    assert annotations[0] == (0.0, 30.0, "Sleep stage W") and annotations[9] == (240.0, 30.0, "Sleep stage N1")
    assert annotations[2] == (33.43, 0.0, "Lights off@@EEG F4-A1")
    assert annotations[-1] == (25618.74, 0.0, "Lights on@@EEG Fpz-Cz")
    stages, summary = hypnogram_to_epochs(annotations, source=str(path))
    assert stages.shape == (854,) and summary.n_epochs == 854 and 854 * 30 / 3600 == pytest.approx(7.117, abs=1e-3)
    assert summary.stage_counts == {"W": 151, "N1": 109, "N2": 430, "N3": 23, "R": 141}
    assert (summary.n_unscored, summary.n_movement, summary.n_gap) == (0, 0, 0)
    assert summary.ignored == {"Lights off": 1, "Lights on": 1}
    assert [AASM_STAGES[s] for s in stages[:10]] == ["W"] * 8 + ["N1", "N1"]
    assert np.bincount(stages).tolist() == [151, 109, 430, 23, 141]


# ---------------------------------------------------------------- sleep: Sleep-EDF layout, written here


def _write_edf(path, signals=(), n_records=1, record_s=1.0, tals=None, start=("01.01.90", "22.00.00")):
    """Write EDF(+): signals are (label, unit, samples per record, values) in -1000..1000; tals one per record."""
    specs = [(label, unit, -1000, 1000, spr,
              np.round((np.asarray(v) + 1000) / 2000 * 65535 - 32768).astype("<i2").reshape(n_records, spr))
             for label, unit, spr, v in signals]
    if tals is not None:
        spr = max(len(t) for t in tals) // 2 + 1
        specs.append(("EDF Annotations", "", -1, 1, spr,
                      np.stack([np.frombuffer(t.ljust(2 * spr, b"\0"), "<i2") for t in tals])))
    def cell(value, width):
        return str(value).ljust(width)[:width]

    header = (cell(0, 8) + cell("X X X X", 80) + cell("Startdate X X X X", 80) + cell(start[0], 8)
              + cell(start[1], 8) + cell(256 * (len(specs) + 1), 8) + cell("EDF+C" if tals else "", 44)
              + cell(n_records, 8) + cell(f"{record_s:g}", 8) + cell(len(specs), 4))
    fields = [(16, lambda s: s[0]), (80, lambda s: ""), (8, lambda s: s[1]), (8, lambda s: s[2]), (8, lambda s: s[3]),
              (8, lambda s: -32768), (8, lambda s: 32767), (80, lambda s: ""), (8, lambda s: s[4]), (32, lambda s: "")]
    for width, get in fields:  # EDF stores each header field for all signals before the next field
        header += "".join(cell(get(s), width) for s in specs)
    body = np.concatenate([s[5] for s in specs], axis=1).astype("<i2").tobytes()
    path.write_bytes(header.encode("ascii") + body)
    return path


def _tal(onset, duration, text):
    return f"+{onset:g}\x15{duration:g}\x14{text}\x14\x00".encode()


def _sleep_edf_pair(tmp_path, seconds=420, stages=()):
    t = np.arange(seconds * 100) / 100
    eeg = 50 * np.sin(2 * np.pi * 10 * t)  # uV alpha
    resp = 200 * np.sin(2 * np.pi * 0.25 * np.arange(seconds))
    psg = _write_edf(tmp_path / "SC4001E0-PSG.edf", [("EEG Fpz-Cz", "uV", 100, eeg), ("Resp oro-nasal", "", 1, resp)],
                     n_records=seconds)
    onset, tals = 0, [b"+0\x14\x14\x00"]
    for label, duration in stages:
        tals.append(_tal(onset, duration, label))
        onset += duration
    hyp = _write_edf(tmp_path / "SC4001EC-Hypnogram.edf", record_s=0, tals=[b"".join(tals)])
    return psg, hyp, eeg


RK_NIGHT = [("Sleep stage W", 90), ("Sleep stage 1", 30), ("Sleep stage 2", 60), ("Sleep stage 3", 30),
            ("Sleep stage 4", 60), ("Sleep stage R", 30), ("Movement time", 30), ("Sleep stage ?", 90)]


def test_sleep_edf_rk_stages_map_to_aasm(tmp_path):
    psg, hyp, eeg = _sleep_edf_pair(tmp_path, stages=RK_NIGHT)
    with pytest.raises(DataError, match=r"rates \[100.0, 1.0\] Hz; pass target_fs"):
        read_psg(psg, ["EEG Fpz-Cz", "Resp oro-nasal"])
    record, stages, summary = read_scored_psg(psg, hyp, ["eeg fpz-cz", "Resp oro-nasal"], target_fs=100)
    assert record.signal.shape == (2, 42000) and record.fs == 100.0 and record.units == ["uV", ""]
    assert record.channel_names == ["EEG Fpz-Cz", "Resp oro-nasal"] and record.start == dt.datetime(1990, 1, 1, 22)
    np.testing.assert_allclose(record.signal[0], eeg, atol=0.02)  # one digital step is 0.03 uV
    assert stages.tolist() == [0, 0, 0, 1, 2, 2, 3, 3, 3, 4, -1, -1, -1, -1]
    assert summary.stage_counts == {"W": 3, "N1": 1, "N2": 2, "N3": 3, "R": 1}
    assert (summary.n_movement, summary.n_unscored, summary.n_gap, summary.n_trimmed) == (1, 3, 0, 0)
    assert pair_sleep_edf_files(tmp_path) == ([(psg, hyp)], [])


def test_psg_reader_agrees_with_wfdb_on_a_single_rate_file(tmp_path):
    psg, _, eeg = _sleep_edf_pair(tmp_path)
    single = _write_edf(tmp_path / "single.edf", [("EEG Fpz-Cz", "uV", 100, eeg), ("EOG", "uV", 100, -eeg)],
                        n_records=420)
    # wfdb rounds the EDF offset to an integer WFDB baseline: up to one digital step (0.03 uV) apart
    reference = read_edf(str(single)).p_signal.T
    np.testing.assert_allclose(read_psg(single, ["EEG Fpz-Cz", "EOG"]).signal, reference, atol=0.07)


def test_psg_bad_inputs_are_named(tmp_path):
    psg, hyp, _ = _sleep_edf_pair(tmp_path, seconds=300, stages=[("Sleep stage W", 360)])
    with pytest.raises(DataError, match=r"no channel\(s\) \['EEG C3-A2'\]; the file has \['EEG Fpz-Cz', 'Resp"):
        read_psg(psg, ["EEG C3-A2"])
    with pytest.raises(DataError, match=r"Hypnogram.edf: 'Sleep stage W' at 0.0 s \(12 epochs\) lies outside the "
                                        r"PSG \(10 epochs of 30.0 s\); hypnogram longer than the PSG"):
        read_scored_psg(psg, hyp, ["EEG Fpz-Cz"])
    psg, hyp, _ = _sleep_edf_pair(tmp_path, seconds=300, stages=[("Sleep stage W", 240), ("Sleep stage ?", 120)])
    _, stages, summary = read_scored_psg(psg, hyp, ["EEG Fpz-Cz"])
    assert stages.tolist() == [0] * 8 + [-1] * 2 and (summary.n_unscored, summary.n_trimmed) == (2, 2)
    truncated = tmp_path / "short-PSG.edf"
    truncated.write_bytes(psg.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"short-PSG.edf: header declares 300 data records"):
        read_psg(truncated, ["EEG Fpz-Cz"])
    with pytest.raises(DataError, match=r"missing.edf: EDF file not found"):
        read_hypnogram(tmp_path / "missing.edf")
    with pytest.raises(DataError, match=r"no 'EDF Annotations' signal"):
        read_hypnogram(psg)


@pytest.mark.parametrize("annotation, message", [
    ((0.0, 30.0, "Sleep stage X"), r"unknown stage 'Sleep stage X' at 0.0 s"),
    ((15.0, 30.0, "Sleep stage 2"), r"'Sleep stage 2' at 15.0 s for 30.0 s is not aligned to 30.0-s epochs"),
])
def test_unknown_or_misaligned_stage_is_named(annotation, message):
    with pytest.raises(DataError, match=message):
        hypnogram_to_epochs([annotation], source="night.edf")


def test_gaps_and_overlaps_in_a_hypnogram():
    stages, summary = hypnogram_to_epochs([(0.0, 30.0, "Sleep stage W"), (60.0, 30.0, "Sleep stage R")])
    assert stages.tolist() == [0, -1, 4] and summary.n_gap == 1
    with pytest.raises(DataError, match=r"'Sleep stage 1' at 30.0 s overlaps"):
        hypnogram_to_epochs([(0.0, 60.0, "Sleep stage W"), (30.0, 30.0, "Sleep stage 1")])


def test_sleep_edf_pairs_and_unpaired_files(tmp_path):
    for name in ("SC4001E0-PSG.edf", "SC4001EC-Hypnogram.edf", "SC4002E0-PSG.edf", "SC4011EH-Hypnogram.edf"):
        (tmp_path / name).touch()
    pairs, unpaired = pair_sleep_edf_files(tmp_path)
    assert [(p.name, h.name) for p, h in pairs] == [("SC4001E0-PSG.edf", "SC4001EC-Hypnogram.edf")]
    assert [p.name for p in unpaired] == ["SC4002E0-PSG.edf", "SC4011EH-Hypnogram.edf"]
