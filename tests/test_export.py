"""`tools/export.py --format mmclin`: a trained MultimodalLM as a directory that loads without its config.

The round trip is judged on the LM's logits (the export command checks them in a new process before it
succeeds) and on the answers `mmclin predict` gives for a real PTB-XL record, beside the checkpoint's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, fit_ecg_qa, shared_data

from mmclin.cli import main as cli_main
from mmclin.errors import CheckpointError
from mmclin.export import load_exported, reference_outputs
from mmclin.llm import load_causal_lm, save_lm
from mmclin.models.mllm import MultimodalLM
from mmclin.study import predict_study

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import export  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Does this ECG show sinus rhythm?"


def test_export_reloads_with_equal_logits_and_answers_a_real_record(demo_cache, tmp_path):
    record = shared_data("ptbxl_cinc2021_sample") / "HR06001"  # 500 Hz CinC 2021 record; the model takes 100 Hz
    ckpt = fit_ecg_qa(tmp_path, "ecg-qa-softprompt.yaml")
    out = export.main(["--format", "mmclin", "--checkpoint", str(ckpt), "--out", str(tmp_path / "export")])
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"mmclin_config.json", "model.safetensors", "README.md", "lm/config.json", "lm/model.safetensors",
            "lm/tokenizer.json"} <= files
    assert not [f for f in files if f.endswith((".ckpt", ".pt", ".bin", ".pkl", ".pickle"))]  # no pickle anywhere
    config = json.loads((out / "mmclin_config.json").read_text())
    assert config["preprocessing"]["sampling_rate"] == 100 and config["extra"]["media_shapes"] == {"series": [12, 1000]}

    module, preprocessing = load_exported(out)
    original = MultimodalLM.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    assert torch.equal(reference_outputs(module, seed=3), reference_outputs(original, seed=3))
    assert preprocessing["_class_path"] == "datamodules.ecg_qa_data.ECGQADataModule"

    # the same real record through the checkpoint, the export in a fresh process, and lightning predict
    [from_ckpt] = predict_study(str(ckpt), [str(record)], QUESTION, ["yes", "no"])
    done = subprocess.run([sys.executable, "-m", "mmclin", "predict", "--model", str(out), "--input", str(record),
                           "--question", QUESTION, "--choices", "yes,no", "--out", str(tmp_path / "rows.jsonl")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    from_export = json.loads((tmp_path / "rows.jsonl").read_text())
    assert from_export["ranked"] == from_ckpt["ranked"] and from_export["generated"] == from_ckpt["generated"]
    assert from_export["choice_loglik"] == pytest.approx(from_ckpt["choice_loglik"], abs=1e-4)
    studies = tmp_path / "studies.jsonl"
    studies.write_text(json.dumps({"input": str(record), "question": QUESTION, "choices": ["yes", "no"]}) + "\n")
    cli_main(["predict", "-c", str(CONFIGS / "ecg-qa-softprompt.yaml"), "-c", str(tmp_path / "short.yaml"),
              "--ckpt_path", str(ckpt), "--data.init_args.predict", str(studies)])
    written = tmp_path / "lightning_logs/version_1/predictions.jsonl"  # the predict run's directory
    [listed] = [json.loads(line) for line in written.read_text().splitlines()]
    assert listed["ranked"] == from_ckpt["ranked"] and listed["generated"] == from_ckpt["generated"]
    card = (out / "README.md").read_text()
    assert "MultimodalLM.from_pretrained" in card and '"sampling_rate": 100' in card and "| val |" in card


def test_a_lora_model_exports_its_adapter_and_names_its_base(demo_cache, tmp_path):
    base = tmp_path / "base-lm"  # a "pretrained" LM in a local directory, as a user's would be
    save_lm(*load_causal_lm(tiny={"hidden_size": 64, "intermediate_size": 128}, freeze="none"), base)
    lm = {"source": str(base), "freeze": "all_but_lora", "lora": {"r": 4, "alpha": 8}}
    ckpt = fit_ecg_qa(tmp_path, "ecg-qa-xattn.yaml", "--model.init_args.lm", json.dumps(lm))
    out = export.main(["--format", "mmclin", "--checkpoint", str(ckpt), "--out", str(tmp_path / "export")])
    assert (out / "lm" / "adapter_config.json").is_file() and not (out / "lm" / "model.safetensors").exists()
    assert json.loads((out / "mmclin_config.json").read_text())["lm"]["base"] == str(base)
    original = MultimodalLM.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    expected = reference_outputs(original)
    assert torch.equal(reference_outputs(MultimodalLM.from_pretrained(out)), expected)

    moved = tmp_path / "elsewhere"
    shutil.move(base, moved)
    with pytest.raises(CheckpointError, match="LoRA adapter of the LM .* pass the base LM's local directory"):
        MultimodalLM.from_pretrained(out)
    assert torch.equal(reference_outputs(MultimodalLM.from_pretrained(out, base_lm=str(moved))), expected)


def test_a_directory_that_is_not_an_export_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="not an mmclin export"):
        load_exported(tmp_path)
    (tmp_path / "mmclin_config.json").write_text('{"model": {"_class_path": "os.system"}, "preprocessing": {}}')
    with pytest.raises(CheckpointError, match="only classes of"):
        load_exported(tmp_path)
