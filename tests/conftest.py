from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmclin.cli import main as cli_main

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# A CLIP small enough for a test step in well under a second on a laptop CPU.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def shared_data(name: str) -> Path:
    """A folder of ../shared/data, or skip the test when this clone has none beside it."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} not present (real sample data lives in ../shared/data beside the repository)")
    return path


def one_line_error(args: list[str], cache: Path, expected: str) -> str:
    """Run ``python *args`` in a fresh process from the repository root; assert exit code 2, no traceback and a
    single ``error: ...`` line on stderr that contains `expected`; return that line."""
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MMCLIN_CACHE": str(cache), "MMCLIN_DEBUG": ""})
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(errors) == 1 and expected in errors[0], done.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """A cache dir shared by the tests so the demo dataset is generated once per session."""
    path = tmp_path_factory.mktemp("mmclin-cache")
    os.environ["MMCLIN_CACHE"] = str(path)
    return path


def fit_ecg_qa(tmp_path: Path, config: str, *overrides: str) -> Path:
    """A few steps of an ECG-QA config on a small demo; returns its last.ckpt."""
    overlay = tmp_path / "short.yaml"
    overlay.write_text(json.dumps({
        "trainer": {"max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 1, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path), "logger": {
                        "class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}}},
        "data": {"init_args": {"demo_records": 120, "batch_size": 8}}}))
    cli_main(["fit", "-c", str(CONFIGS / config), "-c", str(overlay), *overrides])
    return next(tmp_path.glob("lightning_logs/version_0/checkpoints/last.ckpt"))
