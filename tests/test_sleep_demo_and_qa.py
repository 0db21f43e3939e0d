from __future__ import annotations

import lightning as L
import numpy as np
import pytest
from scipy.signal import welch

from datamodules.sleep import AASM_STAGES, pair_sleep_edf_files, read_hypnogram, read_psg, read_scored_psg
from datamodules.sleep_qa import SleepQADataModule, split_subjects
from datamodules.synthetic.sleep import RK_LABELS, generate_sleep_demo
from mmclin.errors import ConfigError, DataError

EEG = ["EEG Fpz-Cz", "EEG Pz-Oz"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return generate_sleep_demo(tmp_path_factory.mktemp("sleep") / "demo", n_subjects=10, hours=2.0, seed=0)


@pytest.fixture(scope="module")
def scored(demo):
    pairs, unpaired = pair_sleep_edf_files(demo)
    assert len(pairs) == 10 and unpaired == []
    return [read_scored_psg(psg, hyp, EEG) for psg, hyp in pairs]


def test_demo_is_read_back_in_the_sleep_edf_layout(demo, scored):
    pairs, _ = pair_sleep_edf_files(demo)
    assert pairs[3][0].name == "SC4031E0-PSG.edf" and pairs[3][1].name == "SC4031EC-Hypnogram.edf"
    psg = read_psg(pairs[0][0], ["EEG Fpz-Cz", "EEG Pz-Oz", "EOG horizontal", "Resp oro-nasal"], target_fs=100)
    assert psg.signal.shape == (4, 2 * 3600 * 100) and psg.fs == 100.0 and psg.units == ["uV", "uV", "uV", ""]
    assert psg.start is not None and psg.start.year == 1989
    with pytest.raises(DataError, match=r"rates \[100.0, 1.0\] Hz"):  # like the real files: respiration at 1 Hz
        read_psg(pairs[0][0], ["EEG Fpz-Cz", "Resp oro-nasal"])
    labels = {a.label for a in read_hypnogram(pairs[0][1])}
    assert labels <= set(RK_LABELS.values()) and "Sleep stage ?" in labels and "Sleep stage 4" in labels
    counts = np.zeros(len(AASM_STAGES), int)
    for record, stages, summary in scored:
        assert len(stages) == 240 and stages[0] == 0 and summary.n_unscored >= 1 and summary.n_gap == 0
        counts += np.bincount(stages[stages >= 0], minlength=len(AASM_STAGES))
    assert counts.sum() >= 1000 and (counts > 100).all(), counts
    share = counts.max() / counts.sum()
    print(f"demo stages {dict(zip(AASM_STAGES, counts.tolist()))}; majority {AASM_STAGES[counts.argmax()]} "
          f"{share:.3f}")
    assert share < 0.5  # a majority-class guess stays a weak baseline


def test_demo_eeg_carries_the_spectral_signs_of_each_stage(scored):
    power = {stage: [] for stage in range(len(AASM_STAGES))}
    for record, stages, _ in scored:
        epochs = record.signal[:, : len(stages) * 3000].reshape(2, -1, 3000).transpose(1, 0, 2)
        f, pxx = welch(epochs, fs=100, nperseg=400)
        total = pxx[..., (f >= 0.5) & (f <= 30)].sum(-1)
        rel = {band: pxx[..., (f >= lo) & (f < hi)].sum(-1) / total
               for band, (lo, hi) in {"delta": (0.5, 4), "alpha": (8, 12), "sigma": (11, 16)}.items()}
        for stage in power:
            power[stage].append({band: r[stages == stage] for band, r in rel.items()})
    mean = {AASM_STAGES[s]: {b: np.concatenate([p[b] for p in parts]).mean(0) for b in ("delta", "alpha", "sigma")}
            for s, parts in power.items()}  # band -> (Fpz-Cz, Pz-Oz)
    assert (mean["N3"]["delta"] > 2 * mean["W"]["delta"]).all()
    assert mean["N3"]["delta"].min() > 0.8
    assert mean["W"]["alpha"][1] > 10 * mean["N3"]["alpha"][1]  # posterior alpha in relaxed wake
    assert (mean["N2"]["sigma"] > 2 * mean["N1"]["sigma"]).all()  # spindles
    assert (mean["N2"]["sigma"] > 2 * mean["R"]["sigma"]).all()


def test_datamodule_splits_by_subject_and_yields_qa_samples(demo):
    dm = SleepQADataModule(str(demo), batch_size=4, context_epochs=0)
    dm.setup()
    subjects = {split: {dm.nights[n].subject for n, _ in ds.index} for split, ds in dm.datasets.items()}
    assert subjects["train"].isdisjoint(subjects["val"]) and subjects["train"].isdisjoint(subjects["test"])
    assert subjects["val"].isdisjoint(subjects["test"]) and len(subjects["val"]) == len(subjects["test"]) == 2
    sample = dm.datasets["val"][5]
    (series,) = sample["series"]
    assert series.shape == (3, 3000) and sample["fs"] == 100.0 and sample["choices"] == list(AASM_STAGES)
    assert sample["answer"] == AASM_STAGES[sample["label"]] and sample["question"].startswith("Which sleep stage")
    assert sample["meta"]["subject"] in subjects["val"] and sample["meta"]["night"] == "1"
    assert dm.classnames == dm.choices == list(AASM_STAGES)
    # every unscored or movement epoch is counted, none silently dropped
    summaries = [read_scored_psg(p, h, EEG)[2] for p, h in pair_sleep_edf_files(demo)[0]]
    assert dm.skipped["unscored"] == sum(s.n_unscored for s in summaries) > 0
    assert dm.skipped["movement"] == sum(s.n_movement for s in summaries)
    scored = sum(sum(s.stage_counts.values()) for s in summaries)
    assert sum(len(d) for d in dm.datasets.values()) + dm.skipped["trimmed_wake"] == scored
    counts = dm.stage_counts("train")
    assert set(counts) == set(AASM_STAGES) and sum(counts.values()) == len(dm.datasets["train"])

    with pytest.raises(ConfigError, match="batches with the model's collator, and none is connected"):
        dm.train_dataloader()
    dm.connect(collator=list)
    batch = next(iter(dm.val_dataloader()))
    assert len(batch) == 4 and all(s["answer"] in s["choices"] for s in batch)
    with pytest.raises(DataError, match=r"SC4001EC-Hypnogram.edf: \{'unscored': \d+"):
        SleepQADataModule(str(demo), on_unscored="error").setup()


def test_context_epochs_and_balanced_training(demo):
    dm = SleepQADataModule(str(demo), context_epochs=1, balance_train=True, val_subjects=["00"],
                           test_subjects=["01", "02"], batch_size=64)
    dm.setup()
    assert dm.splits["00"] == "val" and dm.splits["02"] == "test" and dm.splits["09"] == "train"
    first = dm.datasets["val"][0]  # epoch 0: its left context lies before the recording and is zero-padded
    assert first["series"][0].shape == (3, 9000) and first["meta"]["epoch"] == 0
    assert (first["series"][0][:, :3000] == 0).all() and "middle 30-second epoch" in first["question"]
    dm.connect(collator=lambda s: [x["label"] for x in s])
    drawn = np.concatenate(list(dm.train_dataloader()))
    assert np.bincount(drawn, minlength=5).min() > 0.1 * len(drawn)  # N1 is ~8 % of epochs unbalanced


def test_missing_channel_and_bad_split_are_named(demo):
    with pytest.raises(DataError, match=r"SC4001E0-PSG.edf: no channel\(s\) \['EEG C3-A2'\]; the file has"):
        SleepQADataModule(str(demo), channels=["EEG Fpz-Cz", "EEG C3-A2"]).setup()
    with pytest.raises(DataError, match=r"test_subjects \['42'\] not among"):
        split_subjects(["00", "01"], 0.0, ["42"], seed=0)


def test_demo_qa_batches_through_the_multimodal_model(demo, tmp_path):
    from encoders.timeseries import PatchTransformerEncoder
    from mmclin.models.mllm import MultimodalLM

    L.seed_everything(0)
    encoder = PatchTransformerEncoder(n_channels=3, patch_size=100, d_model=16, n_layers=1, n_heads=2)
    model = MultimodalLM({"series": encoder}, lm={"tiny": {"hidden_size": 32, "intermediate_size": 64}},
                         predictions_dir=str(tmp_path))
    dm = SleepQADataModule(str(demo), batch_size=2)
    trainer = L.Trainer(accelerator="cpu", fast_dev_run=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, dm)
    batch = model.collator([dm.datasets["train"][0], dm.datasets["train"][1]])
    assert batch["series"].shape == (2, 3, 3000) and batch["answer"][0] in AASM_STAGES


def test_unset_root_generates_the_demo_once_into_the_cache(tmp_path):
    dm = SleepQADataModule(demo_subjects=3, demo_hours=1.0, cache_dir=str(tmp_path))
    dm.prepare_data()
    assert (dm.root / ".complete").exists() and dm.root.parent == tmp_path
    dm.setup()
    assert {split: len({dm.nights[n].subject for n, _ in d.index}) for split, d in dm.datasets.items()} == {
        "train": 1, "val": 1, "test": 1}


def test_trimmed_wake_keeps_file_epoch_numbers_and_samples(demo, scored):
    dm = SleepQADataModule(str(demo), trim_wake_min=5.0, context_epochs=1, val_subjects=["00"], test_subjects=0.1)
    dm.setup()
    sample = dm.datasets["val"][0]
    epoch = sample["meta"]["epoch"]
    record, stages, _ = scored[0]  # SC4001: sleep begins > 5 min in, so the first kept epoch is past 0
    assert epoch == np.flatnonzero(stages > 0)[0] - 10 > 0 and dm.skipped["trimmed_wake"] > 0
    window = record.signal[:, (epoch - 1) * 3000:(epoch + 2) * 3000]
    np.testing.assert_array_equal(sample["series"][0][:2].numpy(), window)
    assert sample["answer"] == AASM_STAGES[stages[epoch]]
