"""`mmclin predict --model MODEL --input FILE`: one study of the user's, preprocessed as the model was trained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import wfdb
from conftest import CONFIGS, TINY_CLIP, shared_data

from datamodules.ecg_qa_data import ECGQADataModule
from mmclin.cli import main
from mmclin.errors import ConfigError, DataError
from mmclin.study import predict_study


def test_an_ecg_record_is_read_with_the_models_leads_and_rate(tmp_path):
    """A 250 Hz, 10 s record with the leads in another order becomes (12, 1000) at the model's 100 Hz."""
    data = ECGQADataModule(sampling_rate=100)
    leads = ["V6", "V5", "V4", "V3", "V2", "V1", "aVF", "aVL", "aVR", "III", "II", "I"]
    t = np.arange(2500) / 250
    signal = np.stack([np.sin(2 * np.pi * (k + 1) * t) * 0.1 * (k + 1) for k in range(12)], axis=1)
    wfdb.wrsamp("rec250", fs=250, units=["mV"] * 12, sig_name=leads, p_signal=signal, fmt=["16"] * 12,
                write_dir=str(tmp_path))
    item = data.study_item(tmp_path / "rec250.hea", "Is this ECG normal?", ["yes", "no"])
    series = item["series"][0]
    assert tuple(series.shape) == (12, 1000)
    assert float(series[0].abs().max()) == pytest.approx(1.2, rel=0.05)  # lead I: the 12th column, 1.2 mV
    assert item["choices"] == ["yes", "no"] and item["question"] == "Is this ECG normal?"


def test_an_ecg_without_the_models_leads_says_what_the_model_takes():
    record = shared_data("wfdb_physionet_samples") / "100"  # MIT-BIH: MLII and V5 at 360 Hz
    with pytest.raises(DataError, match=r"missing requested lead.*the model takes the leads \['I', 'II'"):
        ECGQADataModule(sampling_rate=100).study_item(record, "Is this ECG normal?")


def test_derm_clip_predicts_a_real_isic_photograph(demo_cache, tmp_path):
    photo = next((shared_data("derm_isic_sample") / "full_res").glob("*.jpg"))
    overlay = tmp_path / "tiny.yaml"
    overlay.write_text(json.dumps({
        "trainer": {"max_epochs": 1, "default_root_dir": str(tmp_path), "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path), "name": "", "version": ""}}},
        "model": {"init_args": {"model_config": TINY_CLIP}},
        "data": {"init_args": {"batch_size": 8, "demo_lesions_per_class": 8, "demo_image_size": 32}}}))
    main(["fit", "-c", str(CONFIGS / "derm-clip.yaml"), "-c", str(overlay)])
    model = tmp_path / "checkpoints" / "last.ckpt"
    [row] = predict_study(str(model), [str(photo)])
    assert row["input"] == str(photo) and row["predicted"] in row["probabilities"]
    assert len(row["probabilities"]) == 7 and sum(row["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    main(["predict", "--model", str(model), "--input", str(photo), "--out", str(tmp_path / "one.jsonl")])
    assert json.loads((tmp_path / "one.jsonl").read_text())["predicted"] == row["predicted"]
    # the same file through lightning predict, listed as a study: the same answer (in fp32, as mmclin predict;
    # the config's bf16 autocast moves probabilities by ~1e-3)
    main(["predict", "-c", str(CONFIGS / "derm-clip.yaml"), "-c", str(overlay), "--ckpt_path", str(model),
          "--data.init_args.predict", str(photo), "--trainer.precision", "32-true"])
    [listed] = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert listed["input"] == str(photo) and listed["predicted"] == row["predicted"]
    assert listed["probabilities"] == pytest.approx(row["probabilities"], abs=1e-6)
    with pytest.raises(DataError, match="cannot read image"):
        predict_study(str(model), [str(shared_data("wfdb_physionet_samples") / "100.hea")])


def test_a_study_list_names_its_bad_lines(tmp_path):
    from datamodules.loaders import read_studies

    listed = tmp_path / "studies.jsonl"
    listed.write_text('{"input": "a/rec1", "question": "Is this ECG normal?", "choices": ["yes", "no"]}\n\n'
                      '{"question": "no input"}\n')
    with pytest.raises(DataError, match=r"studies.jsonl line 3: a study needs an 'input' path"):
        read_studies(listed)
    listed.write_text('{"input": "a/rec1", "question": "Is this ECG normal?"}\n')
    assert read_studies(listed) == [{"input": str(tmp_path / "a/rec1"), "question": "Is this ECG normal?"}]
    (tmp_path / "paths.txt").write_text("# photographs\n/data/x.jpg\ny.jpg\n")
    assert [s["input"] for s in read_studies(tmp_path / "paths.txt")] == ["/data/x.jpg", str(tmp_path / "y.jpg")]


def test_a_fundus_photograph_is_preprocessed_as_the_training_split():
    from datamodules.fundus import FundusReportDataModule

    photo = next((shared_data("fundus_idrid_codras") / "images").glob("*.jpg"))
    data = FundusReportDataModule(image_size=64)
    item = data.study_item(photo)
    [image] = item["image"]
    assert tuple(image.shape) == (3, 64, 64) and item["question"] == data.hparams.question
    assert abs(float(image.mean())) < 3  # normalised with the datamodule's mean and std, not raw 0-255
    with pytest.raises(DataError):
        data.study_item(shared_data("wfdb_physionet_samples") / "100.hea")


def test_a_real_ct_and_its_dicom_series_go_through_the_models_ct_preprocessing():
    from datamodules.ct_vqa import CTVQADataModule

    folder = shared_data("ct_totalsegmentator_example")
    data = CTVQADataModule(grid=(16, 32, 32))
    item = data.study_item(folder / "example_ct.nii.gz", "Is there a lesion in the liver?", ["yes", "no"])
    [volume] = item["volume"]
    assert tuple(volume.shape) == (1, 16, 32, 32) and 0 <= float(volume.min()) < float(volume.max()) <= 1
    assert item["question"].endswith("A. yes\nB. no") and item["choices"] == ["yes", "no"]
    [again] = data.study_item(folder / "example_ct_dicom", "Is there a lesion in the liver?")["volume"]
    assert tuple(again.shape) == (1, 16, 32, 32)
    with pytest.raises(ConfigError, match="give one"):
        data.study_item(folder / "example_ct.nii.gz", None)


def test_an_edf_night_becomes_one_sample_per_epoch_at_the_models_rate(tmp_path):
    """A 3-min PSG at 200 Hz (channels in another order, an extra one) -> six 30-s epochs at the model's 100 Hz,
    with one epoch of context on each side, zero-padded at the night's ends; unscored, so no answer."""
    from datamodules.sleep_qa import SleepQADataModule
    from datamodules.synthetic.sleep import write_edf

    t = np.arange(180 * 200) / 200
    signals = [(name, "uV", 200.0, -500.0, 500.0, (k + 1) * 20 * np.sin(2 * np.pi * 5 * t))
               for k, name in enumerate(["EOG horizontal", "EMG submental", "EEG Pz-Oz", "EEG Fpz-Cz"])]
    path = write_edf(tmp_path / "night.edf", signals)
    data = SleepQADataModule(target_fs=100, context_epochs=1)
    items = data.study_items(path)
    assert len(items) == 6 and all(tuple(i["series"][0].shape) == (3, 9000) for i in items)
    assert [i["meta"]["epoch"] for i in items] == list(range(6)) and {i["answer"] for i in items} == {""}
    first = items[0]["series"][0]
    assert float(first[:, :3000].abs().max()) == 0  # context before the recording: zeros
    assert float(first[0, 3000:].abs().max()) == pytest.approx(80, rel=0.02)  # EEG Fpz-Cz (4th written) first
    with pytest.raises(DataError, match="the model takes the channels"):
        SleepQADataModule(channels=["EEG C3-A2"]).study_items(path)


def test_a_report_to_check_is_read_as_written_and_bad_ones_are_named(tmp_path):
    from datamodules.report_errors import ReportErrorDataModule

    report = tmp_path / "r1.txt"
    report.write_text("FINDINGS: XXXX. Heart size normal. No pleural effusion.\nIMPRESSION: No acute disease.\n")
    item = ReportErrorDataModule(mode="text").study_item(report)
    assert item["text"] == report.read_text() and item["meta"] == {"id": "r1", "input": str(report)}
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"empty.txt: the report is empty"):
        ReportErrorDataModule(mode="text").study_item(tmp_path / "empty.txt")
    with pytest.raises(DataError, match=r"r1.txt: the multimodal checker reads the report with its frontal"):
        ReportErrorDataModule(mode="qa").study_item(report)


def test_a_night_to_stage_must_have_the_models_channels(tmp_path):
    from datamodules.sleep_qa import SleepQADataModule

    with pytest.raises(DataError, match=r"the model takes the channels \['EEG Fpz-Cz'"):
        SleepQADataModule().study_items(tmp_path / "missing-PSG.edf")
