"""Inputs of another length than the model's (issue 27, area D): never taken as they come.

Time series: a 2-s or a 10-min ECG for a model of 10-s records meets the datamodule's ``duration_policy`` (refuse,
crop, window, pad), recorded in checkpoints and exports so ``mmclin predict`` applies it; a night to stage meets
the sleep datamodule's policy for its last part. Reports: a report longer than the checker's window is read in
windows, and a report not in English gets no verdict.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import wfdb
from conftest import ROOT, fit_ecg_qa, one_line_error

from datamodules.ecg import STANDARD_LEADS
from datamodules.ecg_qa_data import ECGQADataModule
from datamodules.ptbxl_qa import PTBXLQADataModule
from datamodules.series_length import fit_dataset_record, fit_duration
from datamodules.sleep_qa import SleepQADataModule
from datamodules.synthetic.sleep import write_edf
from mmclin.errors import ConfigError, DataError
from mmclin.export import export_module
from mmclin.models.report_checker import ReportChecker, word_tokenizer
from mmclin.reports.language import non_english_reason
from mmclin.study import predict_study

FIXTURES = ROOT / "tests" / "fixtures"
QUESTION = "Does this ECG show sinus rhythm?"
GERMAN = ("Befund: Herz normal groß. Kein Pleuraerguss, kein Pneumothorax. Die Lunge ist beidseits frei belüftet, "
          "ohne Infiltrate. Beurteilung: Unauffälliger Befund des Thorax, keine akute kardiopulmonale Pathologie.")
OTHER_LANGUAGES = {
    "German": GERMAN,
    "French": "Résultats : Le cœur est de taille normale. Pas d'épanchement pleural ni de pneumothorax. Les poumons "
              "sont clairs, sans foyer de condensation. Conclusion : radiographie thoracique sans anomalie aiguë.",
    "Spanish": "Hallazgos: El corazón es de tamaño normal. No hay derrame pleural ni neumotórax. Los pulmones están "
               "claros, sin consolidación. Impresión: radiografía de tórax sin hallazgos agudos.",
    "Italian": "Reperto: Il cuore è di dimensioni normali. Non versamento pleurico né pneumotorace. I polmoni sono "
               "liberi, senza addensamenti. Conclusione: radiografia del torace nella norma.",
    "Latin alphabet": "Заключение: сердце нормальных размеров. Плеврального выпота нет. Легкие без изменений.",
}


def ecg_record(directory: Path, seconds: float, fs: float = 100, name: str | None = None) -> Path:
    """A 12-lead WFDB record of `seconds` at `fs` whose lead k is 0.5 mV * sin(2 pi t) + k * 0.01 mV plus a ramp
    (the time in minutes, mV), so that where a window was taken from can be read off its samples."""
    t = np.arange(round(seconds * fs)) / fs
    signal = np.stack([0.5 * np.sin(2 * np.pi * t) + 0.01 * k + t / 60 for k in range(12)], axis=1)
    name = name or f"ecg{seconds:g}s"
    wfdb.wrsamp(name, fs=fs, units=["mV"] * 12, sig_name=list(STANDARD_LEADS), p_signal=signal, fmt=["16"] * 12,
                adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(directory))
    return directory / name


# ------------------------------------------------------------------------------------------- the policy itself


def test_each_policy_takes_what_it_names_and_refuses_the_rest():
    fs, signal = 100, np.arange(2500, dtype=np.float32)[None].repeat(2, 0)  # 25 s, sample value = its index
    with pytest.raises(DataError, match=r"rec: 25.00 s \(2500 samples at 100 Hz\); the model takes 10-s records "
                                        r"\(duration_policy 'refuse'; 'crop' or 'window' would take it\)"):
        fit_duration(signal, fs, 10, "refuse", "rec")
    [(start, first)] = fit_duration(signal, fs, 10, "crop", "rec")
    assert start == 0 and first[0, 0] == 0 and first.shape == (2, 1000)
    [(start, centre)] = fit_duration(signal, fs, 10, "crop", "rec", crop_at="centre")
    assert start == 7.5 and centre[0, 0] == 750 and centre.shape == (2, 1000)
    windows = fit_duration(signal, fs, 10, "window", "rec")
    assert [s for s, _ in windows] == [0, 10, 15]  # the last window ends at the record's end: nothing left out
    assert all(w.shape == (2, 1000) for _, w in windows) and windows[-1][1][0, -1] == 2499
    assert all(np.shares_memory(w, signal) for _, w in windows)  # views: no copy of a long record per window
    [(_, padded)] = fit_duration(signal[:, :600], fs, 10, "pad", "rec")
    assert padded.shape == (2, 1000) and padded[0, 599] == 599 and not padded[:, 600:].any()
    with pytest.raises(DataError, match=r"2.00 s .*\(duration_policy 'pad' pads records of at least 5 s only\)"):
        fit_duration(signal[:, :200], fs, 10, "pad", "rec")
    with pytest.raises(DataError, match="too short even for 'pad', which pads records of at least 5 s"):
        fit_duration(signal[:, :200], fs, 10, "refuse", "rec")
    with pytest.raises(DataError, match=r"6.00 s .*'pad' would take it"):
        fit_duration(signal[:, :600], fs, 10, "window", "rec")
    # a sample or two of resampling is no other duration; no duration set takes any record
    assert fit_duration(signal[:, :1001], fs, 10, "refuse", "rec")[0][1].shape == (2, 1001)
    assert fit_duration(signal, fs, None, "refuse", "rec")[0][1].shape == (2, 2500)


def test_a_dataset_record_is_never_split_into_windows():
    signal = np.zeros((12, 2500), np.float32)
    with pytest.raises(DataError, match="3 windows of 10 s; a dataset record answers its questions whole"):
        fit_dataset_record(signal, 100, 10, "window", "rec")
    cropped = fit_dataset_record(signal, 100, 10, "crop", "rec")
    assert cropped.shape == (12, 1000) and cropped.flags["C_CONTIGUOUS"] and not np.shares_memory(cropped, signal)


@pytest.mark.parametrize("settings, words", [
    ({"duration_policy": "stretch"}, "duration_policy='stretch'"),
    ({"duration_s": 0}, "duration_s=0"),
    ({"duration_s": float("nan")}, "duration_s=nan"),
    ({"crop_at": "end"}, "crop_at='end'"),
])
def test_bad_duration_settings_are_named(settings, words):
    for datamodule in (ECGQADataModule, PTBXLQADataModule):
        with pytest.raises(ConfigError, match=words):
            datamodule(**settings)
    with pytest.raises(ConfigError, match="duration_policy='crop'"):
        SleepQADataModule(duration_policy="crop")  # a night is staged epoch by epoch: nothing to crop to


# -------------------------------------------------------------------------------------------------- ECG studies


def test_a_2_second_and_a_10_minute_ecg_are_refused_by_default_naming_both_durations(tmp_path):
    data = ECGQADataModule(sampling_rate=100)
    for seconds, fits in ((2, "too short even for 'pad'"), (600, "'crop' or 'window' would take it")):
        record = ecg_record(tmp_path, seconds)
        with pytest.raises(DataError, match=rf"{record}: {seconds:.2f} s .*the model takes 10-s records.*{fits}"):
            data.study_items(record, QUESTION)
    # a 500 Hz record of 10 s is resampled to 1000 samples and taken
    [item] = data.study_items(ecg_record(tmp_path, 10, fs=500), QUESTION)
    assert tuple(item["series"][0].shape) == (12, 1000) and item["meta"]["span_s"] == [0.0, 10.0]


def test_a_10_minute_ecg_under_window_gives_60_model_length_samples_each_naming_its_span(tmp_path):
    record = ecg_record(tmp_path, 600)
    items = ECGQADataModule(duration_policy="window").study_items(record, QUESTION, ["yes", "no"])
    assert len(items) == 60 and all(tuple(i["series"][0].shape) == (12, 1000) for i in items)
    assert [i["meta"]["span_s"] for i in items[:2]] == [[0.0, 10.0], [10.0, 20.0]]
    assert items[-1]["meta"] | {"record": None} == {"record": None, "input": str(record), "span_s": [590.0, 600.0],
                                                    "window": 59, "n_windows": 60}
    # the window's samples are the record's at that time (the ramp of 1 mV per minute)
    assert float(items[30]["series"][0][0, 0]) == pytest.approx(300 / 60, abs=0.01)
    [centre] = ECGQADataModule(duration_policy="crop", crop_at="centre").study_items(record, QUESTION)
    assert centre["meta"]["span_s"] == [295.0, 305.0]
    [padded] = ECGQADataModule(duration_policy="pad").study_items(ecg_record(tmp_path, 7), QUESTION)
    assert padded["meta"]["span_s"] == [0.0, 7.0] and padded["meta"]["padded_s"] == pytest.approx(3.0)
    assert float(padded["series"][0][:, 700:].abs().max()) == 0


def test_ptbxl_qa_and_prediction_lists_apply_the_same_policy(tmp_path):
    record = ecg_record(tmp_path, 25)
    items = PTBXLQADataModule(duration_policy="window").study_items(record, QUESTION)
    assert [i["meta"]["span_s"] for i in items] == [[0.0, 10.0], [10.0, 20.0], [15.0, 25.0]]
    assert all(i["choices"] == ["no", "yes"] for i in items)
    with pytest.raises(DataError, match="25.00 s"):
        PTBXLQADataModule().study_item(record, QUESTION)
    studies = tmp_path / "studies.jsonl"
    studies.write_text(json.dumps({"input": record.name, "question": QUESTION}) + "\n")
    data = ECGQADataModule(duration_policy="window", predict=str(studies))
    data.connect(collator=list)  # (no model attached: the samples as they are)
    listed = list(data.predict_dataloader().dataset)
    assert [i["meta"]["window"] for i in listed] == [0, 1, 2] and {i["meta"]["input"] for i in listed} == {
        str(record)}
    with pytest.raises(DataError, match="25.00 s"):
        ECGQADataModule(predict=str(studies)).predict_dataloader()


def test_a_trained_models_policy_travels_with_its_checkpoint_and_export(tmp_path, demo_cache):
    """Trained with ``duration_policy: window``: its checkpoint and export carry the policy and ``mmclin predict``
    answers a 25-s record once per window; an export set to refuse names a 10-min record in one line."""
    ckpt = fit_ecg_qa(tmp_path, "ecg-qa-softprompt.yaml", "--data.init_args.duration_policy", "window")
    from mmclin.checkpoints import load_module, read_checkpoint

    module, _ = load_module(ckpt)
    export = export_module(module, read_checkpoint(ckpt), tmp_path / "export")
    preprocessing = json.loads((export / "mmclin_config.json").read_text())["preprocessing"]
    assert preprocessing["duration_policy"] == "window" and preprocessing["duration_s"] == 10
    rows = predict_study(str(export), [str(ecg_record(tmp_path, 25))], QUESTION, ["yes", "no"])
    assert [r["meta"]["span_s"] for r in rows] == [[0.0, 10.0], [10.0, 20.0], [15.0, 25.0]]
    assert all(r["ranked"] in ("yes", "no") for r in rows)
    config = json.loads((export / "mmclin_config.json").read_text())
    config["preprocessing"]["duration_policy"] = "refuse"
    (export / "mmclin_config.json").write_text(json.dumps(config))
    long_record = ecg_record(tmp_path, 600)
    line = one_line_error(["-m", "mmclin", "predict", "--model", str(export), "--input", str(long_record),
                           "--question", QUESTION], demo_cache, "600.00 s (60000 samples at 100 Hz); the model "
                                                               "takes 10-s records")
    assert str(long_record) in line


# ------------------------------------------------------------------------------------------------ sleep nights


def _night(directory: Path, seconds: float) -> Path:
    t = np.arange(round(seconds * 100)) / 100
    signals = [(name, "uV", 100.0, -500.0, 500.0, 20 * np.sin(2 * np.pi * 5 * t))
               for name in ("EEG Fpz-Cz", "EEG Pz-Oz", "EOG horizontal")]
    return write_edf(directory / f"night{seconds:g}.edf", signals, record_s=10)


def test_a_nights_last_part_shorter_than_an_epoch_is_reported_padded_or_refused(tmp_path, caplog):
    night = _night(tmp_path, 110)  # 3 epochs and 20 s
    items = SleepQADataModule().study_items(night)
    assert len(items) == 3 and {i["meta"]["unstaged_s"] for i in items} == {20.0}
    assert "its last 20.0 s, shorter than one 30-s epoch, are not staged" in caplog.text
    padded = SleepQADataModule(duration_policy="pad").study_items(night)
    assert len(padded) == 4 and padded[-1]["meta"]["padded_s"] == 10.0
    assert float(padded[-1]["series"][0][:, 2000:].abs().max()) == 0
    with pytest.raises(DataError, match=r"night110.edf: 110.0 s, not a whole number of 30-s epochs \(20.0 s over"):
        SleepQADataModule(duration_policy="refuse").study_items(night)
    with pytest.raises(DataError, match=r"night10.edf: 10.0 s, shorter than one 30-s epoch"):
        SleepQADataModule(duration_policy="pad").study_items(_night(tmp_path, 10))
    assert len(SleepQADataModule(duration_policy="pad").study_items(_night(tmp_path, 20))) == 1
    assert len(SleepQADataModule(duration_policy="refuse").study_items(_night(tmp_path, 90))) == 3


# ----------------------------------------------------------------------------------------------------- reports


def _fixture_reports() -> list[str]:
    from datamodules.reports import read_reports

    return [r.text for r in read_reports(FIXTURES / "iu_realistic", "iu-csv").reports]


def test_reports_not_in_english_are_told_apart_and_english_ones_pass():
    for language, text in OTHER_LANGUAGES.items():
        reason = non_english_reason(text)
        assert reason and language in reason, (language, reason)
    english = _fixture_reports()
    assert len(english) == 420 and [t for t in english if non_english_reason(t)] == []
    assert non_english_reason("Heart size normal. Lungs clear. No effusion.") is None  # telegraphic


def _checker(max_length: int = 512) -> ReportChecker:
    vocab = [t for t, _ in sorted(word_tokenizer(texts=_fixture_reports()).get_vocab().items(), key=lambda x: x[1])]
    torch.manual_seed(0)
    return ReportChecker(vocab=vocab, max_length=max_length, encoder={"hidden_size": 32, "intermediate_size": 64,
                                                                      "num_hidden_layers": 1})


def test_a_1_mb_report_is_read_whole_in_windows_and_flagged_by_its_strongest_window():
    checker = _checker().eval()
    reports = _fixture_reports()
    huge = "\n".join(reports * (1 + 2**20 // sum(map(len, reports))))[:2**20]
    windows = checker.collator.encode([huge])
    [row] = checker.predict_reports([{"modified": huge}], progress=False)
    assert row["n_windows"] == len(windows["input_ids"]) > 300  # every token read, none cut off
    assert windows["input_ids"].shape[1] == 512
    # a report's verdict is its strongest window's: the same as checking each window on its own
    middle = " ".join(reports[:40])
    encoded = checker.collator.encode([middle])
    per_window = [torch.sigmoid(checker(ids[None], mask[None])[0]).item()
                  for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
    [row] = checker.predict_reports([{"modified": middle}], progress=False)
    assert row["n_windows"] == len(per_window) > 1 and row["p_error"] == pytest.approx(max(per_window), abs=1e-5)
    [short] = checker.predict_reports([{"modified": reports[0]}], progress=False)
    assert short["n_windows"] == 1


def test_training_reads_long_reports_in_windows_too():
    checker = _checker(max_length=32)
    reports = _fixture_reports()
    batch = checker.collator([{"text": " ".join(reports[:6]), "has_error": True, "fine_type": "negation_flip"},
                              {"text": reports[7], "has_error": False}])
    assert len(batch["input_ids"]) > 2 and batch["window_report"].tolist()[-1] == 1
    loss, simple, _ = checker._loss(batch)
    loss.backward()
    assert simple.shape == (2,) and torch.isfinite(loss) and checker.simple_head.weight.grad.abs().sum() > 0


def test_a_report_not_in_english_gets_no_verdict(tmp_path, demo_cache):
    checker = _checker()
    with pytest.raises(DataError, match=r"report 3: reads as German .*the checker reads English reports only"):
        checker.predict_reports([{"id": 3, "modified": GERMAN}], progress=False)
    rows = checker.predict_reports([{"modified": GERMAN}, {"modified": _fixture_reports()[0]}], progress=False,
                                   on_non_english="skip")
    assert rows[0]["has_error"] is None and "reads as German" in rows[0]["refused"]
    assert isinstance(rows[1]["has_error"], bool) and rows[1]["n_windows"] == 1
    # through mmclin predict: one line
    path = tmp_path / "checker.ckpt"
    torch.save({"state_dict": checker.state_dict(), "pytorch-lightning_version": L.__version__,
                "hyper_parameters": {**checker.hparams, "_class_path": "mmclin.models.report_checker.ReportChecker"}},
               path)
    report = tmp_path / "befund.txt"
    report.write_text(GERMAN, encoding="utf-8")
    one_line_error(["-m", "mmclin", "predict", "--model", str(path), "--input", str(report)], demo_cache,
                   "reads as German")


def test_report_error_check_evaluate_counts_the_reports_it_leaves_out(tmp_path, demo_cache):
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    import report_error_check

    data = tmp_path / "injected"
    report_error_check.main(["inject", "--reports", str(FIXTURES / "iu_realistic"), "--format", "iu-csv",
                             "--out", str(data), "--on-error", "skip", "--limit", "60"])
    records = [json.loads(line) for line in (data / "errors.jsonl").read_text().splitlines()]
    records[5] |= {"modified": GERMAN, "original": GERMAN}
    (data / "errors.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    one_line_error(["tools/report_error_check.py", "evaluate", "--data", str(data), "--checker", "rule",
                    "--n-boot", "10", "--out", str(tmp_path / "eval")], demo_cache,
                   f"report {records[5]['id']}: reads as German")
    metrics = report_error_check.main(["evaluate", "--data", str(data), "--checker", "rule", "--n-boot", "10",
                                       "--out", str(tmp_path / "eval"), "--on-non-english", "skip"])
    assert metrics["n_refused"] == 1 and metrics["refused"][0]["id"] == records[5]["id"]
    assert metrics["n"] == len(records) - 1


def test_mmclin_predict_prints_each_windows_span_and_a_reports_window_count(monkeypatch, capsys):
    import mmclin.study as study

    rows = [{"input": "r600", "question": QUESTION, "parsed": "yes", "ranked": "yes", "generated": "yes",
             "meta": {"span_s": [10.0, 20.0]}},
            {"input": "long.txt", "has_error": True, "fine_type": None, "p_error": 0.9, "n_windows": 4},
            {"input": "de.txt", "has_error": None, "refused": "reads as German"}]
    monkeypatch.setattr(study, "predict_study", lambda *args: rows)
    study.main(["--model", "m", "--input", "x"])
    out = capsys.readouterr().out.splitlines()
    assert out == [f"r600 [10-20 s]: {QUESTION} -> yes  [most likely choice: yes]",
                   "long.txt: error: unspecified  (p_error 0.900, 4 windows)",
                   "de.txt: no verdict (reads as German)"]
