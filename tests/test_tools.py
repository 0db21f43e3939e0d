"""tools/export.py and tools/zero_shot.py on a tiny checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from conftest import TINY_CLIP, shared_data

from mmclin.models.clip import CLIPModule, load_clip

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import export  # noqa: E402
import zero_shot  # noqa: E402

CLASSES = ["melanoma", "melanocytic nevus", "basal cell carcinoma", "actinic keratosis", "benign keratosis",
           "dermatofibroma", "vascular lesion"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    module = CLIPModule(model_config=TINY_CLIP, classnames=CLASSES)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_export_loads_in_stock_open_clip_with_equal_embeddings(checkpoint, tmp_path):
    out = export.main(["--format", "open_clip", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "oc")])
    assert {p.name for p in out.iterdir()} == {"open_clip_config.json", "open_clip_model.safetensors", "README.md"}
    module = load_clip(str(checkpoint))
    assert export.max_embedding_difference(module, out) == pytest.approx(0, abs=1e-6)
    # and the exported directory is itself a model source for our tools, class names included
    again = load_clip(str(out))
    assert again.hparams.classnames == CLASSES
    image = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again.encode(image)[0], module.encode(image)[0])


def test_zero_shot_on_isic_sample_reports_missing_rows(checkpoint, tmp_path):
    root = shared_data("derm_isic_sample")
    out = tmp_path / "zs"
    metrics = zero_shot.main(["--model", str(checkpoint), "--root", str(root), "--format", "isic",
                              "--csv", "ISIC_2019_Training_GroundTruth_rows.csv", "--image-dir", "full_res",
                              "--on-missing", "skip", "--out", str(out)])
    written = json.loads((out / "metrics.json").read_text())
    assert written["n"] == metrics["n"] == 5 and written["n_skipped_rows"] == 24
    assert {"accuracy", "balanced_accuracy", "macro_auroc", "per_class"} <= set(written)
    per_class = written["per_class"]
    assert per_class["melanoma"]["support"] == 2 and per_class["melanocytic nevus"]["support"] == 3
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == 5 and set(predictions["predicted"]) <= set(CLASSES)
    assert predictions.filter(like="p_").sum(axis=1).round(3).eq(1).all()
    assert len(pd.read_csv(out / "skipped_rows.csv")) == 24
    assert (out / "confusion_matrix.png").stat().st_size > 1000


def test_zero_shot_missing_images_are_an_error_by_default(checkpoint, tmp_path):
    root = shared_data("derm_isic_sample")
    with pytest.raises(Exception, match=r"line 7: image .*ISIC_0000006.jpg' not found"):
        zero_shot.main(["--model", str(checkpoint), "--root", str(root), "--format", "isic",
                        "--csv", "ISIC_2019_Training_GroundTruth_rows.csv", "--image-dir", "full_res",
                        "--out", str(tmp_path)])


def test_the_model_card_is_filled_from_the_run(demo_cache, tmp_path):
    """A short derm-clip fit, then export: the card names the data, the preprocessing and the run's figures."""
    import json

    from conftest import CONFIGS

    from mmclin.cli import main as cli_main

    overlay = tmp_path / "tiny.yaml"
    overlay.write_text(json.dumps({
        "trainer": {"max_epochs": 1, "check_val_every_n_epoch": 1, "default_root_dir": str(tmp_path),
                    "enable_progress_bar": False, "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                                             "init_args": {"save_dir": str(tmp_path)}}},
        "model": {"init_args": {"model_config": TINY_CLIP}},
        "data": {"init_args": {"batch_size": 8, "demo_lesions_per_class": 8, "demo_image_size": 32}}}))
    cli_main(["fit", "-c", str(CONFIGS / "derm-clip.yaml"), "-c", str(overlay)])
    ckpt = next(tmp_path.glob("lightning_logs/version_0/checkpoints/last.ckpt"))
    out = export.main(["--format", "open_clip", "--checkpoint", str(ckpt), "--out", str(tmp_path / "oc")])
    card = (out / "README.md").read_text()
    assert "mmclin.models.CLIPModule" in card and "datamodules.DermDataModule" in card
    assert "generated demo data" in card and "Research use only" in card
    assert '"demo_lesions_per_class": 8' in card and '"size"' in card and '"mean"' in card  # data, preprocessing
    assert "| val | zs_bacc |" in card and "| val | i2t_r10 |" in card  # the run's own figures
    assert 'create_model_and_transforms("local-dir:' in card


def test_a_clip_run_exports_as_mmclin_and_predicts_from_the_directory(demo_cache, tmp_path):
    """The generic export (any model of ours): the directory predicts the ISIC photograph as the checkpoint does."""
    from conftest import CONFIGS

    from mmclin.cli import main as cli_main
    from mmclin.study import predict_study

    photo = next((shared_data("derm_isic_sample") / "full_res").glob("*.jpg"))
    overlay = tmp_path / "tiny.yaml"
    overlay.write_text(json.dumps({
        "trainer": {"max_epochs": 1, "default_root_dir": str(tmp_path), "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path)}}},
        "model": {"init_args": {"model_config": TINY_CLIP}},
        "data": {"init_args": {"batch_size": 8, "demo_lesions_per_class": 8, "demo_image_size": 32}}}))
    cli_main(["fit", "-c", str(CONFIGS / "derm-clip.yaml"), "-c", str(overlay)])
    ckpt = next(tmp_path.glob("lightning_logs/version_0/checkpoints/last.ckpt"))
    out = export.main(["--format", "mmclin", "--checkpoint", str(ckpt), "--out", str(tmp_path / "mm")])
    assert {p.name for p in out.iterdir()} == {"mmclin_config.json", "model.safetensors", "README.md"}
    [from_ckpt] = predict_study(str(ckpt), [str(photo)])
    [from_dir] = predict_study(str(out), [str(photo)])
    assert from_dir["predicted"] == from_ckpt["predicted"]
    assert from_dir["probabilities"] == pytest.approx(from_ckpt["probabilities"], abs=1e-6)
