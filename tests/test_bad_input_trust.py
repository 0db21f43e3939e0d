"""Checkpoints and exports build only this project's classes of the base each setting takes, found without calling
anything the file names; every refusal is one line naming the file and the setting (issue 27, trusted construction).

The property-style test writes class paths outside the expected bases (os.system, builtins.eval, subprocess.Popen,
a demo generator, a library class, project classes of another base) into every place a checkpoint or export names a
class, and checks the refusal and that the target was never called. The fresh-process tests are the commands a user
runs (`mmclin predict`, `mmclin fit` of MMedPO with `init_from`).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, one_line_error

import datamodules.synthetic.ecg
from datamodules.preference import PreferenceDataModule
from mmclin.checkpoints import load_module, read_checkpoint
from mmclin.errors import CheckpointError, ConfigError, run_entry_point
from mmclin.export import load_exported
from mmclin.trusted import build_datamodule, datamodule_class, model_class

INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
MODEL = {
    "_class_path": "mmclin.models.MultimodalLM",
    "encoders": {"series": {"class_path": "encoders.timeseries.PatchTransformerEncoder",
                            "init_args": {"n_channels": 12, "patch_size": 50, "d_model": 16}}},
    "lm": {"tiny": {"hidden_size": 32, "intermediate_size": 64}},
    "connector": {"class_path": "mmclin.fusion.MLPProjector", "init_args": {"n_layers": 1}},
    "evaluator": {"class_path": "mmclin.tasks.vqa.VQAEvaluator"},
    "_instantiator": INSTANTIATOR,
}
DATA = {"_class_path": "datamodules.ecg_qa_data.ECGQADataModule", "sampling_rate": 100, "_instantiator": INSTANTIATOR}
PREFERENCE = {"_class_path": "datamodules.preference.PreferenceDataModule",
              "base": {"class_path": "datamodules.fundus.FundusReportDataModule", "init_args": {}}}

# Class paths a file may write, and what each is: outside the project (None) or the kind of project class
CANDIDATES = {
    "os.system": None,
    "builtins.eval": None,
    "subprocess.Popen": None,
    "torch.nn.Linear": None,
    "encoders.volume.ViT": None,  # MONAI's ViT, reachable through a project module
    "datamodules.synthetic.ecg.generate_ecg_demo": None,  # a function of the project
    "mmclin.__main__.main": None,  # importing it would run the CLI
    "datamodules.ecg.os.system": None,
    "mmclin.models.CLIPModule": "model",
    "datamodules.ecg_qa_data.ECGQADataModule": "datamodule",
    "encoders.timeseries.PatchTransformerEncoder": "part",
    "mmclin.tasks.vqa.VQAEvaluator": "callable",
}
# Where a checkpoint or export names a class: (section, keys to the setting, the kinds it takes)
SLOTS = {
    "model class": ("model", ("_class_path",), {"model"}),
    "connector": ("model", ("connector", "class_path"), {"part", "model"}),
    "encoder": ("model", ("encoders", "series", "class_path"), {"part", "model"}),
    "evaluator": ("model", ("evaluator", "class_path"), {"callable", "part", "model"}),
    "model instantiator": ("model", ("_instantiator",), set()),
    "datamodule class": ("data", ("_class_path",), {"datamodule"}),
    "nested datamodule": ("preference", ("base", "class_path"), {"datamodule"}),
    "datamodule instantiator": ("data", ("_instantiator",), set()),
}
REFUSED = [(slot, path) for slot, (_, _, kinds) in SLOTS.items() for path, kind in CANDIDATES.items()
           if kind not in kinds]


def _with(settings: dict, keys: tuple[str, ...], value: str) -> dict:
    settings = json.loads(json.dumps(settings))
    place = settings
    for key in keys[:-1]:
        place = place[key]
    place[keys[-1]] = value
    return settings


def _sections(slot: str, class_path: str) -> tuple[dict, dict]:
    """(model settings, datamodule settings) with `class_path` written at `slot`."""
    section, keys, _ = SLOTS[slot]
    if section == "model":
        return _with(MODEL, keys, class_path), DATA
    return MODEL, _with(PREFERENCE if section == "preference" else DATA, keys, class_path)


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    """Every candidate that can be watched records here when called or constructed (builtins.eval cannot be
    replaced: type hints are evaluated with it; like os.system it is refused before any import)."""
    record: list[str] = []

    def recorder(name):
        return lambda *args, **kwargs: record.append(name)

    monkeypatch.setattr(os, "system", recorder("os.system"))
    monkeypatch.setattr(datamodules.synthetic.ecg, "generate_ecg_demo", recorder("generate_ecg_demo"))
    from datamodules.ecg_qa_data import ECGQADataModule
    from encoders.timeseries import PatchTransformerEncoder
    from mmclin.models.clip import CLIPModule
    from mmclin.tasks.vqa import VQAEvaluator
    for cls in (subprocess.Popen, torch.nn.Linear, CLIPModule, ECGQADataModule, PatchTransformerEncoder,
                VQAEvaluator):
        monkeypatch.setattr(cls, "__init__", recorder(cls.__name__))
    return record


@pytest.mark.parametrize(("slot", "class_path"), REFUSED, ids=[f"{s}={p}" for s, p in REFUSED])
def test_a_class_path_outside_the_expected_base_is_refused_and_never_called(slot, class_path, calls, tmp_path):
    model, data = _sections(slot, class_path)
    setting = ".".join(SLOTS[slot][1])
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": model, "datamodule_hyper_parameters": data}, ckpt)
    export = tmp_path / "export"
    export.mkdir()
    (export / "mmclin_config.json").write_text(json.dumps({"model": model, "preprocessing": data}))

    if SLOTS[slot][0] == "model":
        with pytest.raises(CheckpointError) as refused:
            load_module(ckpt)
        assert f"{ckpt}: hyper_parameters.{setting}: {class_path!r}" in str(refused.value)
    else:
        settings = read_checkpoint(ckpt)["datamodule_hyper_parameters"]
        with pytest.raises(CheckpointError) as refused:
            build_datamodule(settings, f"{ckpt}: datamodule_hyper_parameters")
        assert f"{ckpt}: datamodule_hyper_parameters.{setting}: {class_path!r}" in str(refused.value)
    assert "\n" not in str(refused.value) and ("expected" in str(refused.value) or "refused" in str(refused.value))

    with pytest.raises(CheckpointError) as refused:
        load_exported(export)
    section = "model" if SLOTS[slot][0] == "model" else "preprocessing"
    assert f"{export / 'mmclin_config.json'}: {section}.{setting}: {class_path!r}" in str(refused.value)
    assert calls == [] and "mmclin.__main__" not in sys.modules


def test_the_settings_a_run_writes_pass_the_same_checks(calls):
    """The control: the checks refuse what is wrong, not what `lightning fit` writes."""
    assert model_class(MODEL, "x").__name__ == "MultimodalLM"
    assert datamodule_class(DATA, "x").__name__ == "ECGQADataModule"
    assert datamodule_class(PREFERENCE, "x") is PreferenceDataModule
    assert calls == []


def test_an_unknown_preprocessing_setting_is_named_not_dropped(tmp_path):
    (tmp_path / "mmclin_config.json").write_text(json.dumps({"model": MODEL, "preprocessing": {**DATA, "hu_windw": 1}}))
    with pytest.raises(CheckpointError, match=r"preprocessing\.hu_windw: not a setting of ECGQADataModule"):
        load_exported(tmp_path)


def test_a_config_names_only_a_datamodule_of_the_project_as_the_preference_base(calls):
    for class_path in ("datamodules.synthetic.ecg.generate_ecg_demo", "datamodules.fundus.os.system", "os.system"):
        with pytest.raises(ConfigError, match=rf"base\.class_path: '{class_path}'"):
            PreferenceDataModule(base={"class_path": class_path, "init_args": {"out_dir": "x"}})
    assert calls == []


# ------------------------------------------------------------------------------------------- unreadable files


def test_random_bytes_say_what_they_are_and_a_pickle_payload_is_refused_without_torchs_advice(tmp_path):
    random_bytes = tmp_path / "random.ckpt"
    random_bytes.write_bytes(bytes(range(7, 247)) * 8)
    with pytest.raises(CheckpointError, match=r"not a readable torch checkpoint \(not a zip archive or pickle: "
                                              r"first bytes 07 08 09 0a"):
        read_checkpoint(random_bytes)
    marker = tmp_path / "ran"
    for name, protocol in (("payload.ckpt", None), ("payload.pkl", 4)):
        path = tmp_path / name
        if protocol is None:
            torch.save({"state_dict": {}, "x": _Payload(marker)}, path)
        else:
            path.write_bytes(pickle.dumps({"state_dict": {}, "x": _Payload(marker)}, protocol=protocol))
        with pytest.raises(CheckpointError) as refused:
            read_checkpoint(path)
        message = str(refused.value)
        assert "refused: it holds objects other than tensors" in message and "open" in message, message
        assert "weights_only=False" not in message and "succeed" not in message and "False" not in message
    assert not marker.exists()


class _Payload:
    """Pickles as a call of open(marker, "w"): the marker file exists if the payload ever ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


# ------------------------------------------------------------------------------------------- fresh processes


def _export(tmp_path: Path, model: dict, data: dict) -> Path:
    out = tmp_path / "export"
    out.mkdir()
    (out / "mmclin_config.json").write_text(json.dumps({"model": model, "preprocessing": data}))
    return out


def test_predict_refuses_an_export_naming_a_demo_generator_before_calling_it(tmp_path, demo_cache):
    written = tmp_path / "generated"
    data = {"_class_path": "datamodules.synthetic.ecg.generate_ecg_demo", "out_dir": str(written), "n_records": 80}
    out = _export(tmp_path, MODEL, data)
    line = one_line_error(["-m", "mmclin", "predict", "--model", str(out), "--input", str(tmp_path / "x.hea")],
                          demo_cache, "preprocessing._class_path: 'datamodules.synthetic.ecg.generate_ecg_demo' is "
                                      "a function; expected a LightningDataModule")
    assert str(out / "mmclin_config.json") in line and not written.exists()


@pytest.mark.parametrize(("case", "model", "data", "words"), [
    ("connector of a library", _with(MODEL, ("connector", "class_path"), "torch.nn.Linear"), DATA,
     "model.connector.class_path: 'torch.nn.Linear': only classes of"),
    # the other cases, covered in process above, also run in a fresh process with -m slow (CI time)
    pytest.param("unknown preprocessing key", MODEL, {**DATA, "bogus": 1},
                 "preprocessing.bogus: not a setting of ECGQADataModule", marks=pytest.mark.slow),
    pytest.param("nested non-project datamodule path", MODEL, {**DATA, "_class_path": "datamodules.ecg.os.system"},
                 "preprocessing._class_path: 'datamodules.ecg.os.system' cannot be imported", marks=pytest.mark.slow),
    pytest.param("non-project preference base", MODEL,
                 _with(PREFERENCE, ("base", "class_path"), "datamodules.fundus.os.system"),
                 "preprocessing.base.class_path: 'datamodules.fundus.os.system' cannot be imported",
                 marks=pytest.mark.slow),
])
def test_predict_refuses_a_bad_export_in_one_line(case, model, data, words, tmp_path, demo_cache):
    out = _export(tmp_path, model, data)
    line = one_line_error(["-m", "mmclin", "predict", "--model", str(out), "--input", str(tmp_path / "x.hea")],
                          demo_cache, words)
    assert str(out / "mmclin_config.json") in line


@pytest.mark.parametrize(("case", "words"), [
    ("instantiator", "hyper_parameters._instantiator: 'os.system' is refused"),
    pytest.param("random bytes", "not a readable torch checkpoint (not a zip archive or pickle: first bytes 07 08",
                 marks=pytest.mark.slow),  # in process above; fresh process with -m slow
])
def test_predict_refuses_a_bad_checkpoint_in_one_line(case, words, tmp_path, demo_cache):
    ckpt = tmp_path / "model.ckpt"
    if case == "random bytes":
        ckpt.write_bytes(bytes(range(7, 247)) * 8)
    else:
        torch.save({"state_dict": {}, "hyper_parameters": {**MODEL, "_instantiator": "os.system"},
                    "datamodule_hyper_parameters": DATA}, ckpt)
    line = one_line_error(["-m", "mmclin", "predict", "--model", str(ckpt), "--input", str(tmp_path / "x.hea")],
                          demo_cache, words)
    assert str(ckpt) in line


@pytest.mark.parametrize("case", ["another family's checkpoint", pytest.param("pickle payload",
                                                                              marks=pytest.mark.slow)])
def test_mmedpo_init_from_a_wrong_file_is_one_named_line(case, tmp_path, demo_cache):
    ckpt = tmp_path / "sft.ckpt"
    marker = tmp_path / "ran"
    if case == "pickle payload":
        torch.save({"state_dict": {}, "x": _Payload(marker)}, ckpt)
        words = "refused: it holds objects other than tensors"
    else:
        torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "mmclin.models.CLIPModule"}}, ckpt)
        words = "a checkpoint of CLIPModule, not of MultimodalLM"
    line = one_line_error(["-m", "mmclin", "fit", "-c", str(CONFIGS / "fundus-report-mmedpo.yaml"),
                           "--model.init_args.init_from", str(ckpt)], demo_cache, words)
    assert str(ckpt) in line and not marker.exists()
    assert "weights_only=False" not in line


def test_an_error_a_constructor_raised_under_jsonargparse_is_reported_as_itself(capsys, monkeypatch):
    """jsonargparse re-raises an error of a `class_path` constructor (MMedPO's `init_from`) as a ValueError "Does not
    validate against any of the Union subtypes" from it: the entry point reports the named error; --debug the rest."""
    def main(argv):
        try:
            raise CheckpointError("sft.ckpt: a checkpoint of CLIPModule, not of MultimodalLM")
        except CheckpointError as err:
            raise ValueError("Does not validate against any of the Union subtypes\n...") from err

    monkeypatch.delenv("MMCLIN_DEBUG", raising=False)
    with pytest.raises(SystemExit) as stopped:
        run_entry_point(main, [])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "error: sft.ckpt: a checkpoint of CLIPModule, not of MultimodalLM\n"
    with pytest.raises(ValueError, match="Does not validate"):
        run_entry_point(main, ["--debug"])
    with pytest.raises(RuntimeError):  # a bug keeps its traceback
        run_entry_point(lambda argv: (_ for _ in ()).throw(RuntimeError("bug")), [])


def test_encoder_weights_are_refused_like_checkpoints(tmp_path):
    from encoders.image2d import read_weights

    marker = tmp_path / "ran"
    payload = tmp_path / "resnet.pth"
    torch.save({"state_dict": {}, "x": _Payload(marker)}, payload)
    with pytest.raises(CheckpointError, match="refused: it holds objects other than tensors") as refused:
        read_weights(str(payload))
    assert "weights_only=False" not in str(refused.value) and not marker.exists()
    garbage = tmp_path / "vit.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="vit.safetensors"):
        read_weights(str(garbage))
