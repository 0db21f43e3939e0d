"""Bad input at every entry point ends in one named line and exit code 2, never a traceback.

Each case builds its malformed file itself. Reader-level cases live beside their readers (truncated and foreign
WFDB/EDF files in test_ecg_sleep_readers.py, NIfTI grids/units/NaN and missing masks in test_ct_data.py and
test_ct_questions.py, CSV rows, duplicates and missing images in test_derm_data.py, test_fundus_data.py and
test_reports.py); here are the commands a user runs, end to end in a fresh process.
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, ROOT, TINY_CLIP, one_line_error

from mmclin.errors import CheckpointError, ConfigError, DataError, error_line

FIXTURES = Path(__file__).resolve().parent / "fixtures"


# ------------------------------------------------------------------------------------------- checkpoints


def _bad_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Files given where a checkpoint is expected, and the words their error must contain."""
    random_bytes = tmp_path / "random.ckpt"
    random_bytes.write_bytes(random.Random(0).randbytes(2048))
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, unsafe)  # a pickled object weights_only refuses
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    other_model = tmp_path / "other-model.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "mmclin.models.mllm.MultimodalLM"}}, other_model)
    untrusted = tmp_path / "untrusted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "os.system"}}, untrusted)
    truncated = tmp_path / "truncated.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:1500])
    return {
        "random bytes": (random_bytes, "not a readable torch checkpoint"),
        "unsafe pickle": (unsafe, "refused: it holds objects other than tensors"),
        "foreign torch file": (foreign, "not a Lightning checkpoint"),
        "another model's checkpoint": (other_model, "a checkpoint of MultimodalLM, not of CLIPModule"),
        "untrusted class": (untrusted, "only classes of"),
        "truncated": (truncated, "not a readable torch checkpoint"),
        "missing": (tmp_path / "nowhere.ckpt", "not found"),
    }


def test_every_bad_checkpoint_gets_its_named_error_in_process(tmp_path):
    from mmclin.models.clip import load_clip

    for case, (path, words) in _bad_checkpoints(tmp_path).items():
        with pytest.raises(CheckpointError, match=words):
            load_clip(str(path))
        assert str(path) in error_line(CheckpointError(f"{path}: x")), case


# every bad checkpoint is refused in process above; each tool's console route runs one case by default and the
# others with -m slow (a fresh process is ~10 s of CI time)
@pytest.mark.parametrize("tool, case", [
    (tool, case) if case == "unsafe pickle" else pytest.param(tool, case, marks=pytest.mark.slow)
    for tool in ("zero_shot", "export") for case in ("unsafe pickle", "random bytes", "another model's checkpoint")])
def test_tools_refuse_bad_checkpoints_in_one_line(tool, case, tmp_path, demo_cache):
    path, words = _bad_checkpoints(tmp_path)[case]
    flag = ["--model"] if tool == "zero_shot" else ["--format", "open_clip", "--checkpoint"]
    line = one_line_error([f"tools/{tool}.py", *flag, str(path), "--out", str(tmp_path / "out")], demo_cache,
                          words)
    assert str(path) in line, (case, line)


def test_report_checker_tool_refuses_a_bad_checkpoint_in_one_line(tmp_path, demo_cache):
    data = tmp_path / "injected"
    subprocess.run([sys.executable, "tools/report_error_check.py", "inject", "--reports",
                    str(FIXTURES / "iu_realistic"), "--format", "iu-csv", "--limit", "60", "--out", str(data),
                    "--on-error", "skip"],
                   cwd=ROOT, check=True, capture_output=True)
    path, words = _bad_checkpoints(tmp_path)["unsafe pickle"]
    one_line_error(["tools/report_error_check.py", "evaluate", "--data", str(data), "--checker", f"ckpt:{path}",
                     "--out", str(tmp_path / "eval")], demo_cache, words)


# ------------------------------------------------------------------------------------------- lightning fit


def test_fit_on_a_truncated_jpeg_names_the_file_in_one_line(tmp_path, demo_cache):
    """The image is read in a DataLoader worker; the worker's traceback is not shown, our line is."""
    from datamodules.derm import DermDataModule

    demo = DermDataModule(demo_lesions_per_class=4, demo_image_size=32)
    demo.prepare_data()
    root = tmp_path / "derm"
    shutil.copytree(demo.root, root)
    for image in root.rglob("*.jpg"):  # truncated downloads: the first one read names itself
        image.write_bytes(image.read_bytes()[:300])
    line = one_line_error(
        ["-m", "mmclin", "fit", "-c", str(CONFIGS / "derm-clip.yaml"), "--data.init_args.root", str(root),
         "--data.init_args.num_workers", "1", "--data.init_args.batch_size", "4",
         "--model.init_args.model_config", str(TINY_CLIP).replace("'", '"'), "--trainer.max_epochs", "1",
         "--trainer.logger.init_args.save_dir", str(tmp_path / "run"), "--trainer.default_root_dir",
         str(tmp_path / "run")], demo_cache, "cannot read image")
    assert str(root) in line and ".jpg" in line


def test_fit_on_a_report_folder_with_an_empty_report_names_it_in_one_line(tmp_path, demo_cache):
    root = tmp_path / "iu"
    shutil.copytree(FIXTURES / "iu_realistic", root)
    reports = root / "indiana_reports.csv"
    rows = list(csv.DictReader(open(reports, encoding="utf-8")))
    rows[3]["findings"] = rows[3]["impression"] = ""
    with open(reports, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    line = one_line_error(["-m", "mmclin", "fit", "-c", str(CONFIGS / "cxr-error-check-text.yaml"),
                            "--data.init_args.root", str(root), "--trainer.max_epochs", "1",
                            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "run")],
                           demo_cache, rows[3]["uid"])
    assert "indiana_reports.csv" in line and "--data.init_args.on_error skip" in line  # the fit's own option


def test_debug_shows_the_traceback(tmp_path, demo_cache):
    path, _ = _bad_checkpoints(tmp_path)["random bytes"]
    done = subprocess.run([sys.executable, "tools/zero_shot.py", "--model", str(path), "--out", str(tmp_path),
                           "--debug"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" in done.stderr and "CheckpointError" in done.stderr


# ------------------------------------------------------------------------------------------- settings


def test_sleep_datamodule_without_a_target_rate_is_a_config_error():
    from datamodules.sleep_qa import SleepQADataModule

    with pytest.raises(ConfigError, match="target_fs=None: the datamodule resamples every channel to one rate"):
        SleepQADataModule(target_fs=None)


def test_worker_wrapped_errors_reduce_to_their_own_line():
    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1, in f\nmmclin.errors.DataError: a.csv line 3: cannot read "
                        "image 'b.jpg'")
    assert error_line(wrapped) == "a.csv line 3: cannot read image 'b.jpg'"
