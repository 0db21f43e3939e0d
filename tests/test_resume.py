"""A fit killed with SIGKILL and resumed from its last.ckpt ends with exactly the uninterrupted run's state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, TINY_CLIP

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 10  # the training images of the 8-lesion demo in batches of 8, the short last one dropped


def _fit(tmp_path: Path, name: str, cache: Path, kill_at: int | None = None, resume: Path | None = None):
    run = tmp_path / name
    callbacks = [{"class_path": "mmclin.resume.ExactResume", "init_args": {"every_n_train_steps": 4}}]
    if kill_at is not None:
        callbacks.append({"class_path": "kill_at_step.KillAtStep", "init_args": {"step": kill_at}})
    overlay = {
        "trainer": {"max_epochs": 3, "check_val_every_n_epoch": 1, "default_root_dir": str(run),
                    "logger": False, "enable_progress_bar": False, "callbacks": callbacks},
        "model": {"init_args": {"model_config": TINY_CLIP}},
        "data": {"init_args": {"batch_size": 8, "demo_lesions_per_class": 8, "demo_image_size": 32}},
    }
    (tmp_path / f"{name}.yaml").write_text(json.dumps(overlay))
    args = [sys.executable, "-m", "mmclin", "fit", "-c", str(CONFIGS / "derm-clip.yaml"), "-c",
            str(tmp_path / f"{name}.yaml")] + (["--ckpt_path", str(resume)] if resume else [])
    env = {**os.environ, "MMCLIN_CACHE": str(cache), "PYTHONPATH": str(ROOT / "tests" / "helpers")}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return done, run / "checkpoints" / "last.ckpt"


def _state(path: Path) -> tuple[dict, dict, int]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["state_dict"], ckpt["optimizer_states"][0]["state"], ckpt["global_step"]


@pytest.mark.parametrize("kill_at", [STEPS_PER_EPOCH + 3, STEPS_PER_EPOCH + 1],
                         ids=["mid-epoch", "after-an-epoch-end"])
def test_a_killed_and_resumed_fit_is_the_uninterrupted_fit(demo_cache, tmp_path, kill_at):
    whole, whole_last = _fit(tmp_path, "whole", demo_cache)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed, last = _fit(tmp_path, "killed", demo_cache, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    saved_step = _state(last)[2]
    assert saved_step < kill_at  # the resume starts from a checkpoint before the kill
    resumed, resumed_last = _fit(tmp_path, "killed", demo_cache, resume=last)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    weights, moments, step = _state(whole_last)
    weights_r, moments_r, step_r = _state(resumed_last)
    assert step == step_r == 3 * STEPS_PER_EPOCH
    for name, value in weights.items():
        assert torch.equal(value, weights_r[name]), name
    for key, value in moments.items():
        assert all(torch.equal(value[k], moments_r[key][k]) for k in value), key


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from mmclin.resume import rng_states, set_rng_states

    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    torch.save({"rng": rng_states()}, tmp_path / "state.pt")
    expected = torch.rand(3), np.random.rand(3), random.random()
    set_rng_states(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    again = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]
