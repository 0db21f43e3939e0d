"""Readers and question generation on the real sets in ../shared/data (skipped where it is absent)."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import shared_data

from datamodules.derm import HAM_DX_NAMES, DermDataModule
from datamodules.ptbxl_qa import DEFAULT_STATEMENTS, PTBXLQADataModule, present_labels, ptbxl_attributes

HAM_COUNTS = {"nv": 5695, "mel": 949, "bkl": 925, "bcc": 444, "akiec": 282, "vasc": 117, "df": 98}


@pytest.fixture(scope="module")
def ham():
    root = shared_data("ham10000_200x150")
    data = DermDataModule(root=str(root), format="isic", csv="HAM10000_metadata.csv", image_dir="images",
                          sampling="balanced", image_size=32)
    data.setup("fit")
    return data


def test_ham10000_reader_counts_classes_and_builds_metadata_captions(ham):
    table = ham.read_table()
    assert len(table) == 8510 and len(ham.skipped) == 0
    assert table["label"].value_counts().to_dict() == {HAM_DX_NAMES[k]: v for k, v in HAM_COUNTS.items()}
    assert ham.classnames == sorted(HAM_DX_NAMES.values())
    assert all(label in caption for label, caption in zip(table["label"], table["caption"]))
    # metadata reaches the captions in varied phrasing: sites, ages, how the diagnosis was made
    captions = " ".join(table["caption"])
    for phrase in ("located on the back", "site: face", "aged ", "confirmed by histopathology",
                   "stable on digital dermoscopic follow-up"):
        assert phrase in captions
    assert table["caption"].nunique() > 5000


def test_ham10000_splits_keep_each_lesion_on_one_side(ham):
    table = ham.read_table()
    lesions = {split: set(table.loc[table["split"] == split, "group"]) for split in ("train", "val", "test")}
    assert not (lesions["train"] & lesions["val"]) and not (lesions["train"] & lesions["test"])
    assert not (lesions["val"] & lesions["test"])
    assert sum(map(len, lesions.values())) == 6350
    # every class is in every split, and the balanced draw weights each class equally
    assert table.groupby("split")["label"].nunique().eq(7).all()
    weights = pd.Series(ham.sampling_weights("train")).groupby(ham.datasets["train"].table["label"].to_numpy()).sum()
    assert weights.max() == pytest.approx(weights.min())
    assert ham.baselines("test")["majority_bacc"] == pytest.approx(1 / 7)


def _answers(labels, attributes, row: int) -> dict[str, str]:
    return {name: "yes" if labels[row, j] else "no" for j, name in enumerate(attributes["name"])}


def test_ptbxl_questions_from_real_scp_codes_hand_checked():
    root = shared_data("ptbxl_1-500")
    from datamodules.ecg import read_ptbxl_database

    database = read_ptbxl_database(root / "ptbxl_database.csv", root / "scp_statements.csv")
    attributes = ptbxl_attributes(root / "scp_statements.csv", list(DEFAULT_STATEMENTS))
    picked = database.loc[[8, 12, 77]]
    labels = present_labels(picked, root / "scp_statements.csv", attributes)
    # ecg_id 8: {'IMI': 35.0, 'ABQRS': 0.0, 'SR': 0.0} - an inferior infarction of likelihood 35, abnormal QRS
    eight = _answers(labels, attributes, 0)
    assert {k: eight[k] for k in ("myocardial infarction", "normal ecg", "st/t change", "conduction disturbance",
                                  "hypertrophy")} == {"myocardial infarction": "yes", "normal ecg": "no",
                                                      "st/t change": "no", "conduction disturbance": "no",
                                                      "hypertrophy": "no"}
    assert eight["inferior myocardial infarction"] == eight["abnormal qrs"] == eight["sinus rhythm"] == "yes"
    assert sum(v == "yes" for v in eight.values()) == 4
    # ecg_id 12: {'NORM': 80.0, 'SBRAD': 0.0} - normal, but sinus bradycardia is not "sinus rhythm"
    twelve = _answers(labels, attributes, 1)
    assert twelve["normal ecg"] == "yes" and twelve["sinus rhythm"] == "no"
    # ecg_id 77: {'AMI': 50.0, 'IRBBB': 100.0, 'SR': 0.0}
    seventy_seven = _answers(labels, attributes, 2)
    assert seventy_seven["myocardial infarction"] == seventy_seven["conduction disturbance"] == "yes"
    assert seventy_seven["incomplete right bundle branch block"] == "yes"
    # the likelihood rule: at 80 % the likelihood-35 and -50 infarctions no longer count; form/rhythm still do
    strict = present_labels(picked, root / "scp_statements.csv", attributes, min_likelihood=80)
    assert _answers(strict, attributes, 0)["myocardial infarction"] == "no"
    assert _answers(strict, attributes, 0)["abnormal qrs"] == "yes"
    assert _answers(strict, attributes, 2)["myocardial infarction"] == "no"
    assert _answers(strict, attributes, 2)["conduction disturbance"] == "yes"


def test_ptbxl_datamodule_splits_by_fold_and_tests_a_whole_tree():
    root = shared_data("ptbxl_1-500")
    data = PTBXLQADataModule(root=str(root))
    data.setup("fit")
    n_questions = len(data.aux_classes)
    folds = pd.read_csv(root / "ptbxl_database.csv", index_col=0)["strat_fold"]
    sizes = {split: len(d) for split, d in data.datasets.items()}
    assert sizes == {"train": folds.between(1, 8).sum() * n_questions, "val": (folds == 9).sum() * n_questions,
                     "test": (folds == 10).sum() * n_questions}
    item = data.datasets["val"][0]
    assert item["series"][0].shape == (12, 1000) and item["series_targets"][0].shape == (n_questions,)
    assert item["answer"] in ("yes", "no") and item["choices"] == ["no", "yes"]
    ids = {split: set(d.table["ecg_id"]) for split, d in data.datasets.items()}
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["val"])
    whole = PTBXLQADataModule(root=str(root), test_folds="all")
    whole.setup("test")
    assert len(whole.datasets["test"]) == 500 * n_questions and len(whole.datasets["train"]) == 0


def test_ptbxl_datamodule_adds_real_ecgqa_questions_in_their_records_split():
    root = shared_data("ptbxl_1-500")
    ecgqa = shared_data("ecgqa_ptbxl_1-500") / "ecgqa" / "ptbxl"
    data = PTBXLQADataModule(root=str(root), ecgqa=str(ecgqa))
    data.setup("fit")
    added = pd.concat([d.table.assign(split=s) for s, d in data.datasets.items()])
    added = added[added["source"] == "ecgqa"]
    assert len(added) == 413 and data.n_skipped_ecgqa == 224  # the single-ECG ones; comparisons left out
    folds = pd.read_csv(root / "ptbxl_database.csv", index_col=0)["strat_fold"]
    expected = folds.loc[added["ecg_id"]].map(lambda f: "train" if f <= 8 else "val" if f == 9 else "test")
    assert (expected.to_numpy() == added["split"].to_numpy()).all()


def _cinc_tree(tmp_path):
    """The CinC-2021 PTB-XL sample laid out as a PTB-XL tree of its own: 10 records at 500 Hz (HR*.mat), whatever
    their folds."""
    import shutil

    sample = shared_data("ptbxl_cinc2021_sample")
    tree = tmp_path / "other-tree"
    shutil.copytree(sample, tree)
    (tree / "ptbxl_database_rows_6000-6009.csv").rename(tree / "ptbxl_database.csv")
    return tree


def test_ptbxl_qa_reads_another_tree_with_500_hz_records_only(tmp_path):
    data = PTBXLQADataModule(root=str(_cinc_tree(tmp_path)), test_folds="all")
    data.setup("test")
    test = data.datasets["test"]
    assert len(test) == 10 * len(data.aux_classes) and set(test.table["ecg_id"]) == set(range(6000, 6010))
    item = test[0]  # ecg_id 6000: {'NORM': 100.0, 'NT_': 0.0, 'SR': 0.0}, resampled from 500 to 100 Hz
    assert item["series"][0].shape == (12, 1000)
    answers = dict(zip(test.table["attribute"][:len(data.aux_classes)], test.table["answer"]))
    assert answers["normal ecg"] == answers["sinus rhythm"] == answers["non-specific t-wave changes"] == "yes"
    assert answers["myocardial infarction"] == "no"


def test_a_trained_model_is_tested_on_another_ptbxl_tree_with_one_command(demo_cache, tmp_path):
    import json

    from conftest import CONFIGS, fit_ecg_qa

    from mmclin.cli import main as cli_main

    tree = _cinc_tree(tmp_path)
    (tmp_path / "fit").mkdir()
    ckpt = fit_ecg_qa(tmp_path / "fit", "ecg-ptbxl-qa.yaml", "--test_after_fit", "false")
    run = tmp_path / "other"
    cli_main(["test", "-c", str(CONFIGS / "ecg-ptbxl-qa.yaml"), "--ckpt_path", str(ckpt),
              "--data.init_args.root", str(tree), "--data.init_args.test_folds", "all",
              "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run)])
    rows = [json.loads(line) for line in next(run.rglob("test-predictions/predictions.jsonl")).read_text().splitlines()]
    assert len(rows) == 10 * 24 and {r["meta"]["ecg_id"] for r in rows} == set(range(6000, 6010))
    assert all(set(r["choice_loglik"]) == {"no", "yes"} and "blind" in r for r in rows)


def test_ptbxl_qa_settings_and_codes_are_checked(tmp_path):
    from mmclin.errors import ConfigError, DataError

    with pytest.raises(ConfigError, match="strat_fold values 1-10"):
        PTBXLQADataModule(root=str(tmp_path), test_folds=[11])
    with pytest.raises(ConfigError, match="min_likelihood"):
        PTBXLQADataModule(root=str(tmp_path), min_likelihood=150)
    with pytest.raises(ConfigError, match="sampling must be"):
        DermDataModule(root=str(tmp_path), sampling="oversample")
    root = shared_data("ptbxl_1-500")
    with pytest.raises(DataError, match=r"scp_statements.csv: SCP code\(s\) \['NOPE'\] not listed"):
        ptbxl_attributes(root / "scp_statements.csv", ["SR", "NOPE"])
