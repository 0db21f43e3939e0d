"""Settings, lists and the CLI: another family's checkpoint, impossible numbers, misspelt keys, predict-list
questions and MMedPO pair weights end in one named line (exit code 2) before anything is read, or are skipped and
counted under an explicit option.

Fresh processes for what a user types (`python -m mmclin` is `lightning`), in-process calls for the readers.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import io
import json
import math
import pkgutil
import re
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import CONFIGS, TINY_CLIP, one_line_error

from mmclin.checkpoints import check_checkpoint_fits
from mmclin.cli import main as cli_main
from mmclin.errors import CheckpointError, ConfigError, DataError
from mmclin.setting_checks import PROJECT_PACKAGES, PROJECT_RULES, check_numbers

ECG_QA = str(CONFIGS / "ecg-qa-softprompt.yaml")
SLEEP_QA = str(CONFIGS / "sleep-qa-softprompt.yaml")


def _quick(tmp_path: Path) -> list[str]:
    """Settings that keep a run that got through out of the repository and short."""
    return ["--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_epochs",
            "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"]


# ------------------------------------------------------------------------------------------- checkpoints


def _foreign_checkpoint(tmp_path: Path, model: str, data: str, **hparams) -> Path:
    """A LightningCLI checkpoint's records (model and datamodule classes) without weights: refused before use."""
    path = tmp_path / f"{data.rsplit('.', 1)[-1]}.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": model, **hparams},
                "datamodule_hyper_parameters": {"_class_path": data}}, path)
    return path


@pytest.mark.parametrize("model, data, words", [
    ("mmclin.models.CLIPModule", "datamodules.DermDataModule",
     "a checkpoint of CLIPModule trained on DermDataModule, but this config runs MultimodalLM on ECGQADataModule"),
    ("mmclin.models.MultimodalLM", "datamodules.ct_vqa.CTVQADataModule",  # the same model class, a CT one
     "a checkpoint of MultimodalLM trained on CTVQADataModule, but this config runs MultimodalLM on ECGQADataModule"),
])
def test_another_familys_checkpoint_is_named_in_one_line(model, data, words, tmp_path):
    extra = {"model_config": TINY_CLIP} if "CLIP" in model else {}
    ckpt = _foreign_checkpoint(tmp_path, model, data, **extra)
    line = one_line_error(["-m", "mmclin", "predict", "-c", ECG_QA, "--ckpt_path", str(ckpt), *_quick(tmp_path)],
                          tmp_path / "cache", words)
    assert str(ckpt) in line
    assert not (tmp_path / "cache").exists()  # refused before any data was generated or read


def test_a_checkpoint_of_the_configs_family_passes_and_a_wrapped_base_counts():
    ecg = {"class_path": "datamodules.ecg_qa_data.ECGQADataModule", "init_args": {}}
    ckpt = {"hyper_parameters": {"_class_path": "mmclin.models.MultimodalLM"},
            "datamodule_hyper_parameters": {"_class_path": "datamodules.ecg_qa_data.ECGQADataModule"}}
    check_checkpoint_fits(ckpt, "run.ckpt", {"class_path": "mmclin.models.mllm.MultimodalLM"}, ecg)
    check_checkpoint_fits({"state_dict": {}}, "plain.ckpt", {"class_path": "mmclin.models.MultimodalLM"}, ecg)

    def preference(base: str) -> dict:
        return {"class_path": "datamodules.preference.PreferenceDataModule",
                "init_args": {"base": {"class_path": base}}}

    mmedpo = {"hyper_parameters": {"_class_path": "mmclin.models.MMedPO"}, "datamodule_hyper_parameters": {
        "_class_path": "datamodules.preference.PreferenceDataModule",
        "base": {"class_path": "datamodules.ct_vqa.CTVQADataModule"}}}
    check_checkpoint_fits(mmedpo, "po.ckpt", {"class_path": "mmclin.models.MMedPO"},
                          preference("datamodules.ct_vqa.CTVQADataModule"))
    with pytest.raises(CheckpointError, match="po.ckpt: a checkpoint of MMedPO trained on CTVQADataModule, but this "
                                              "config runs MMedPO on ECGQADataModule"):
        check_checkpoint_fits(mmedpo, "po.ckpt", {"class_path": "mmclin.models.MMedPO"},
                              preference("datamodules.ecg_qa_data.ECGQADataModule"))
    with pytest.raises(CheckpointError, match="sft.ckpt: a checkpoint of MultimodalLM trained on ECGQADataModule, "
                                              "but this config runs MMedPO"):
        check_checkpoint_fits({**ckpt}, "sft.ckpt", {"class_path": "mmclin.models.MMedPO"}, None)


def test_a_checkpoint_naming_a_foreign_data_class_is_refused_without_importing_it():
    ckpt = {"hyper_parameters": {}, "datamodule_hyper_parameters": {"_class_path": "os.system"}}
    with pytest.raises(CheckpointError, match="x.ckpt: datamodule_hyper_parameters"):
        check_checkpoint_fits(ckpt, "x.ckpt", None, {"class_path": "datamodules.ecg_qa_data.ECGQADataModule"})


# ------------------------------------------------------------------------------------------- settings


def test_a_constructors_config_error_is_the_one_line(tmp_path):
    one_line_error(["-m", "mmclin", "fit", "-c", SLEEP_QA, "--data.init_args.target_fs", "null", *_quick(tmp_path)],
                   tmp_path / "cache", "target_fs=None: the datamodule resamples every channel to one rate")


def test_a_negative_learning_rate_is_refused_before_any_data_is_read(tmp_path):
    one_line_error(["-m", "mmclin", "fit", "-c", SLEEP_QA, "--model.init_args.lr", "-0.001", *_quick(tmp_path)],
                   tmp_path / "cache", "model.init_args.lr=-0.001: must be > 0")
    assert not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def sleep_qa_resolved() -> dict:
    """The whole config of sleep-qa-softprompt.yaml (its own settings and its bases'), as the CLI checks it."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main(["fit", "-c", SLEEP_QA, "--print_config"])
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("where, value, words", [
    (("model", "init_args", "lr"), 0.0, "model.init_args.lr=0.0: must be > 0"),
    (("model", "init_args", "lr"), math.nan, "model.init_args.lr=nan: must be > 0"),
    (("model", "init_args", "weight_decay"), -0.1, "model.init_args.weight_decay=-0.1: must be >= 0"),
    (("model", "init_args", "encoders", "series", "init_args", "d_model"), 0,
     "model.init_args.encoders.series.init_args.d_model=0: must be > 0"),
    (("model", "init_args", "lm", "tiny", "hidden_size"), -64, "model.init_args.lm.tiny.hidden_size=-64"),
    (("data", "init_args", "batch_size"), 0, "data.init_args.batch_size=0: must be > 0"),
    (("data", "init_args", "val_subjects"), 1.5, "data.init_args.val_subjects=1.5: must be in [0, 1)"),
    (("data", "init_args", "target_fs"), -100, "data.init_args.target_fs=-100: must be > 0"),
    (("trainer", "max_epochs"), -2, "trainer.max_epochs=-2: must be >= 0, or -1 for no limit"),
    (("trainer", "limit_val_batches"), 1.5, "trainer.limit_val_batches=1.5: must be a fraction in [0, 1]"),
    (("trainer", "accumulate_grad_batches"), 0, "trainer.accumulate_grad_batches=0: must be >= 1"),
    (("optimizer",), {"class_path": "torch.optim.SGD", "init_args": {"lr": -1.0}}, "optimizer.init_args.lr=-1.0"),
])
def test_impossible_numbers_are_named(where, value, words, sleep_qa_resolved):
    config = copy.deepcopy(sleep_qa_resolved)
    node = config
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    with pytest.raises(ConfigError, match=rf"^{re.escape(words)}"):
        check_numbers(config)


def test_split_fractions_must_leave_studies_to_train_on():
    config = {"data": {"class_path": "datamodules.derm.DermDataModule",
                       "init_args": {"val_fraction": 0.5, "test_fraction": 0.5}}}
    with pytest.raises(ConfigError, match=r"data.init_args.val_fraction \+ test_fraction = 0.5 \+ 0.5: must be < 1"):
        check_numbers(config)


def test_every_config_and_every_default_passes_the_checks():
    """The rules go by name: each project class taking a setting of that name accepts its own default under it, and
    every shipped config passes (a rule that refused a working setting would stop real runs)."""
    for path in sorted(CONFIGS.rglob("*.yaml")):
        check_numbers(yaml.safe_load(path.read_text()))
    checked = set()
    for cls in _project_classes():
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if name in PROJECT_RULES and parameter.default is not inspect.Parameter.empty:
                check_numbers({"x": {"class_path": f"{cls.__module__}.{cls.__name__}",
                                     "init_args": {name: parameter.default}}})
                checked.add(name)
    assert {"lr", "batch_size", "val_fraction", "d_model", "target_fs", "beta"} <= checked


def _project_classes() -> list[type]:
    import torch.nn as nn

    classes = []
    for package in (p.rstrip(".") for p in PROJECT_PACKAGES):
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, f"{package}."):
            if info.name.endswith("__main__"):
                continue
            module = importlib.import_module(info.name)
            classes += [c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == info.name
                        and issubclass(c, (L.LightningModule, L.LightningDataModule, nn.Module, L.Callback))]
    return classes


# ------------------------------------------------------------------------------------------- parse errors


@pytest.mark.slow  # the same parse error is tested in process below; this is the console route
def test_a_misspelt_key_is_one_line_with_the_closest_key(tmp_path):
    one_line_error(["-m", "mmclin", "fit", "-c", SLEEP_QA, "--data.init_args.batch_sise", "4", *_quick(tmp_path)],
                   tmp_path / "cache", "data: 'batch_sise' is not a setting of datamodules.sleep_qa.SleepQADataModule; "
                                       "did you mean 'batch_size'?")


@pytest.mark.parametrize("args, words", [
    (["--model.init_args.encoders.series.init_args.n_channel", "3"],
     "model.init_args.encoders: 'n_channel' is not a setting of encoders.timeseries.PatchTransformerEncoder; did "
     "you mean 'n_channels'?"),
    (["--trainer.max_epochz", "3"], "unrecognized arguments: --trainer.max_epochz 3; did you mean "
                                    "'--trainer.max_epochs'?"),
    # a prefix of a real option is no option: argparse would have run it as --trainer.max_epochs
    (["--trainer.max_epoch", "3"], "unrecognized arguments: --trainer.max_epoch 3; did you mean "
                                   "'--trainer.max_epochs'?"),
    (["--trainer.max_epochs", "abc"], "trainer.max_epochs: Expected a <class 'int'>; got abc"),
    (["--model.init_args.aux_level", "pixel"], "model.init_args.aux_level: Expected a typing.Literal['token', "
                                               "'medium']. Got value: pixel"),
    # a fusion is a class (or a config file of one); the deprecated names are still accepted
    (["--model.init_args.fusion", "soft"], "model.init_args.fusion: Expected a path but soft either not accessible or "
                                           "invalid; Expected a dot import path string: soft; Expected a "
                                           "typing.Literal['soft_prompt', 'cross_attention']; got soft; got 'soft'"),
])
def test_parse_errors_are_one_line_without_the_usage(args, words, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MMCLIN_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["lightning"])  # else Lightning warns of args given beside pytest's own
    with pytest.raises(SystemExit) as stopped:
        cli_main(["fit", "-c", SLEEP_QA, *args, *_quick(tmp_path)])
    assert stopped.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"error: {words}"], err


@pytest.mark.parametrize("overlay, words", [
    ("trainer:\n  max_epochz: 3\n", "does not accept option 'trainer.max_epochz'; did you mean 'trainer.max_epochs'?"),
    ("model:\n  init_args:\n    lrr: 0.1\n", "model: 'lrr' is not a setting of mmclin.models.MultimodalLM; did you "
                                               "mean 'lr'?"),
])
def test_a_misspelt_key_in_a_config_file_is_named(overlay, words, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MMCLIN_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["lightning"])
    (tmp_path / "typo.yaml").write_text(overlay)
    with pytest.raises(SystemExit):
        cli_main(["fit", "-c", SLEEP_QA, "-c", str(tmp_path / "typo.yaml"), *_quick(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


# ------------------------------------------------------------------------------------------- predict lists


def test_predict_list_choices_must_be_a_list(tmp_path):
    from datamodules.loaders import read_studies

    good = {"input": "a.dat", "question": "Is this a normal ECG?", "choices": ["yes", "no"]}
    cases = {"'choices' must be a list of answers such as \\[\"yes\", \"no\"\\], got 'yes,no'": {"choices": "yes,no"},
             "'choices' must be a list of answers .* got \\['yes', 1\\]": {"choices": ["yes", 1]},
             "'choices' lists an answer twice": {"choices": ["yes", "yes"]},
             "'question' must be text, got \\['Is it\\?'\\]": {"question": ["Is it?"]}}
    path = tmp_path / "studies.jsonl"
    for words, change in cases.items():
        path.write_text(json.dumps(good) + "\n" + json.dumps({**good, **change}) + "\n")
        with pytest.raises(DataError, match=rf"studies.jsonl line 2: {words}"):
            read_studies(path)
    path.write_text("".join(json.dumps({**good, "choices": c}) + "\n" for c in (["yes", "no"], [], None)))
    assert [s["choices"] for s in read_studies(path)] == [["yes", "no"], [], None]  # [] / null: an open question


# ------------------------------------------------------------------------------------------- MMedPO pairs


def test_pair_weights_must_be_finite_and_positive_or_are_skipped_and_counted(tmp_path, demo_cache):
    from datamodules.preference import PreferenceDataModule

    base = {"class_path": "datamodules.fundus.FundusReportDataModule",
            "init_args": {"image_size": 64, "demo_images": 40, "demo_image_size": 64}}
    probe = PreferenceDataModule(base)
    probe.base.prepare_data()
    probe.base.setup("fit")
    good = {"study": str(probe.base.datasets["train"][0]["meta"]["image_id"]), "prompt": "Describe.",
            "chosen": "No diabetic retinopathy.", "rejected": "Proliferative diabetic retinopathy.",
            "kind": "severity", "weight": 2.0}
    path = tmp_path / "pairs.jsonl"
    bad = [-1.0, 0.0, math.nan, math.inf]
    for weight in bad:
        path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "weight": weight}) + "\n")  # NaN as JSON NaN
        with pytest.raises(DataError, match=rf"pairs.jsonl line 2: the weight is not a finite number > 0 "
                                            rf"\({weight!r}\) \(on_bad_pair: skip drops such pairs\)"):
            PreferenceDataModule(base, pairs=str(path)).setup("fit")
    path.write_text("".join(json.dumps({**good, "weight": w}) + "\n" for w in [2.0, *bad]))
    skipping = PreferenceDataModule(base, pairs=str(path), on_bad_pair="skip")
    skipping.setup("fit")
    assert [p.weight for p in skipping.train_pairs] == [2.0]
    assert dict(skipping.skipped) == {"the weight is not a finite number > 0": 4}
