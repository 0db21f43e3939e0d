"""Evaluation under several CPU processes (gloo DDP) gives exactly the 1-process figures and prediction file.

The test splits do not divide by the number of processes (59 ECG questions on 2, 16 photographs on 3), so a
padding sampler would score some of them twice.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONFIGS, TINY_CLIP

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # model and data arguments, processes
    "derm-clip": ({"model_config": TINY_CLIP}, {"batch_size": 8, "demo_lesions_per_class": 8, "demo_image_size": 32},
                  3),
    "ecg-qa-softprompt": ({}, {"batch_size": 8, "demo_records": 100}, 2),
}


def _run(tmp_path: Path, config: str, name: str, cache: Path, command: str, devices: int, ckpt: Path | None = None):
    model, data, _ = CASES[config]
    run = tmp_path / name
    overlay = {
        "trainer": {"accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto",
                    "max_epochs": 1, "default_root_dir": str(run), "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(run), "name": "", "version": ""}}},
        "model": {"init_args": model},
        "data": {"init_args": {**data, "num_workers": 0}},
    }
    (tmp_path / f"{name}.yaml").write_text(json.dumps(overlay))
    args = [sys.executable, "-m", "mmclin", command, "-c", str(CONFIGS / f"{config}.yaml"), "-c",
            str(tmp_path / f"{name}.yaml")] + (["--ckpt_path", str(ckpt)] if ckpt else [])
    # A fresh job: an earlier in-process test may have left MASTER_PORT set, with its store still listening there
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK",
                                                              "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")}
    done = subprocess.run(args, cwd=ROOT, env={**env, "MMCLIN_CACHE": str(cache)}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def _test_metrics(run: Path) -> dict[str, float]:
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    return {k: float(v) for row in rows for k, v in row.items() if k.startswith("test/") and v}


# derm-clip's two-process run (~80 s) with -m slow: the ECG case already holds one process = two (CI time)
@pytest.mark.parametrize("config", [pytest.param(c, marks=pytest.mark.slow) if c == "derm-clip" else c
                                    for c in sorted(CASES)])
def test_multi_process_evaluation_equals_one_process(demo_cache, tmp_path, config):
    fitted = _run(tmp_path, config, "fit", demo_cache, "fit", 1)
    ckpt = fitted / "checkpoints" / "last.ckpt"
    one = _run(tmp_path, config, "one", demo_cache, "test", 1, ckpt)
    two = _run(tmp_path, config, "two", demo_cache, "test", CASES[config][2], ckpt)
    metrics_one, metrics_two = _test_metrics(one), _test_metrics(two)
    assert metrics_one and metrics_one.keys() == metrics_two.keys()
    for name, value in metrics_one.items():
        if "shuffled_media" in name:  # another study's medium: drawn from the process's own shard, so it differs
            continue
        if name.endswith("/loss"):  # a mean over differently composed batches: equal up to rounding
            assert metrics_two[name] == pytest.approx(value, rel=1e-5), name
        else:
            assert metrics_two[name] == value, name
    figure = "test-zero_shot_roc" if config == "derm-clip" else "test-answer_confusion"
    assert list((one / "plots").glob(f"{figure}-epoch*.png")), sorted(one.rglob("*.png"))  # the run keeps its plots
    predictions = sorted(one.rglob("predictions.jsonl"))
    if config != "derm-clip":  # the QA models write one row per question, in the split's order
        assert predictions
        for path in predictions:
            mirror = two / path.relative_to(one)
            rows, rows_n = ([json.loads(line) for line in p.read_text().splitlines()] for p in (path, mirror))
            assert len(rows) == 59 and len({json.dumps(r) for r in rows}) == len(rows)
            for row, row_n in zip(rows, rows_n, strict=True):
                blind, blind_n = row.pop("blind", {}), row_n.pop("blind", {})
                assert blind.keys() == blind_n.keys()
                for scored, scored_n in ((row, row_n), (blind.get("blank_media"), blind_n.get("blank_media"))):
                    if scored is not None:  # scores of differently composed batches: equal up to rounding
                        assert scored_n.pop("choice_loglik") == pytest.approx(scored.pop("choice_loglik"), rel=1e-5,
                                                                             abs=1e-6)
                        assert scored_n == scored
    # lightning predict: one row per study, in the split's order, whatever the number of processes
    files = [_run(tmp_path, config, f"predict{n}", demo_cache, "predict", n, ckpt) / "predictions.jsonl"
             for n in (1, CASES[config][2])]
    rows, rows_n = ([json.loads(line) for line in f.read_text().splitlines()] for f in files)
    assert [r["index"] for r in rows] == list(range(len(rows))) and len(rows) == (16 if config == "derm-clip" else 59)
    scores = "probabilities" if config == "derm-clip" else "choice_loglik"
    for row, row_n in zip(rows, rows_n, strict=True):  # scores of differently padded batches: equal up to rounding
        assert row[scores] and row_n.pop(scores) == pytest.approx(row.pop(scores), rel=1e-5, abs=1e-6)
        assert row_n == row
