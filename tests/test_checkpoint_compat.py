"""A checkpoint written by an earlier mmclin (tests/fixtures/checkpoints/README.md) still loads, predicts and
validates: configs and checkpoints outlive the code that wrote them."""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIGS, ROOT, shared_data

from mmclin.checkpoints import load_module
from mmclin.fusion import CrossAttentionFusion

OLD = ROOT / "tests" / "fixtures" / "checkpoints" / "ecg-qa-xattn-v0.ckpt"


def test_an_old_cross_attention_checkpoint_loads_with_its_fusion_as_a_class():
    with pytest.deprecated_call(match="fusion: 'cross_attention'"):
        module, data = load_module(OLD)
    assert isinstance(module.fusion, CrossAttentionFusion) and module.fusion.every_n == 2
    assert data["_class_path"] == "datamodules.ecg_qa_data.ECGQADataModule"


def test_an_old_checkpoint_predicts_a_real_ptbxl_record():
    from mmclin.study import predict_study

    record = shared_data("ptbxl_1-500") / "records100" / "00000" / "00001_lr"
    with pytest.deprecated_call():
        [row] = predict_study(str(OLD), [str(record)], "Does this ECG show sinus rhythm?", ["yes", "no"])
    assert row["ranked"] in ("yes", "no") and row["input"] == str(record)


def test_an_old_checkpoint_validates_through_the_cli(tmp_path, demo_cache):
    from mmclin.cli import build_cli

    cli = build_cli(["validate", "-c", str(CONFIGS / "ecg-qa-xattn.yaml"), "--ckpt_path", str(OLD),
                     "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
                     "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
