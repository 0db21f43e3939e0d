"""Does the model look? Blind (shuffled and blank media) scoring of MultimodalLM and the verify evaluator."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch

from datamodules.ptbxl_qa import PTBXLQADataModule
from encoders.timeseries import ResNet1dEncoder
from mmclin.models import MultimodalLM
from mmclin.tasks.blind import other_media_index, recent_distinct
from mmclin.tasks.verify import VerifyEvaluator


def test_shuffled_media_come_from_another_study():
    a, b, c = (torch.full((2, 5), float(v)) for v in (1, 2, 3))
    media = torch.stack([a, a, a, b])  # three questions on one record, then another record
    assert other_media_index(media) == [3, 3, 3, 0]
    assert other_media_index(torch.stack([a, a])) == [None, None]  # one study only: nothing to swap in
    assert other_media_index(torch.stack([a, a]), previous=torch.stack([c])) == [2, 2]  # the batch before
    assert recent_distinct(torch.stack([a, b, a, c, b]), keep=2) == [0, 1]


def _test_rows(model: MultimodalLM, tmp_path) -> tuple[list[dict], dict]:
    data = PTBXLQADataModule(demo_records=80, batch_size=8, eval_batch_size=12)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.test(model, datamodule=data, verbose=False)
    path = tmp_path / "test-predictions" / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()], dict(trainer.callback_metrics)


def _tiny(tmp_path) -> MultimodalLM:
    torch.manual_seed(0)
    return MultimodalLM(encoders={"series": ResNet1dEncoder(12, widths=(8, 8), blocks_per_stage=(1, 1), d_model=16)},
                        lm={"tiny": {"hidden_size": 32, "intermediate_size": 64}, "freeze": "none"},
                        evaluator=VerifyEvaluator(n_boot=50), predictions_dir=str(tmp_path))


def test_a_model_that_ignores_its_media_scores_the_same_blind(demo_cache, tmp_path):
    model = _tiny(tmp_path)
    with torch.no_grad():  # the connector maps every medium to zeros: the LM never sees the ECG
        for parameter in model.connectors.parameters():
            parameter.zero_()
    rows, metrics = _test_rows(model, tmp_path)
    assert all(set(r["blind"]) == {"shuffled_media", "blank_media"} for r in rows)
    # the first record's questions have no other record to borrow from yet; every later one has
    first = [r["meta"]["ecg_id"] == rows[0]["meta"]["ecg_id"] for r in rows]
    assert [r["blind"]["shuffled_media"] is None for r in rows] == first
    for row in rows:
        for variant in ("shuffled_media", "blank_media"):
            if row["blind"][variant] is None:
                continue
            assert row["blind"][variant]["choice_loglik"] == pytest.approx(row["choice_loglik"], abs=1e-5)
    for name in ("acc_likelihood", "acc_generation", "superclass_macro_auroc"):  # blank: every question
        assert float(metrics[f"test/baseline/blank_media_{name}"]) == pytest.approx(float(metrics[f"test/{name}"]))
    for variant in ("shuffled_media", "blank_media"):  # paired over the questions scored both ways
        for name in ("acc_likelihood", "acc_generation", "superclass_macro_auroc"):
            assert float(metrics[f"test/{name}_minus_{variant}"]) == pytest.approx(0.0, abs=1e-9)


def test_a_model_that_reads_its_media_scores_differently_blind(demo_cache, tmp_path):
    rows, metrics = _test_rows(_tiny(tmp_path), tmp_path)
    for variant in ("shuffled_media", "blank_media"):
        changes = [abs(r["blind"][variant]["choice_loglik"]["yes"] - r["choice_loglik"]["yes"]) for r in rows
                   if r["blind"][variant] is not None]
        assert max(changes) > 1e-3
        assert f"test/acc_likelihood_minus_{variant}_ci_low" in metrics


def test_verify_evaluator_auroc_and_paired_difference():
    rng = np.random.default_rng(0)
    rows = []
    for study in range(40):
        for attribute in ("a", "b"):
            truth = bool(rng.random() < 0.4)
            sighted = 2.0 if truth else -2.0  # a perfect ranking of the studies
            blind = float(rng.normal())  # p(yes) unrelated to the truth
            rows.append({"answer": "yes" if truth else "no", "ranked": "yes" if sighted > 0 else "no",
                         "choice_loglik": {"yes": sighted, "no": 0.0},
                         "meta": {"ecg_id": study, "attribute": attribute, "group": "superclass"},
                         "blind": {"shuffled_media": {"ranked": "no", "choice_loglik": {"yes": blind, "no": 0.0}}}})
    metrics = VerifyEvaluator(n_boot=200)(rows, "test")
    assert metrics["test/superclass_macro_auroc"] == 1.0 and metrics["test/bacc/a"] == 1.0
    assert metrics["test/superclass_macro_auroc_minus_shuffled_media_ci_low"] > 0.2
