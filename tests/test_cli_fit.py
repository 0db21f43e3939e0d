"""The headline job, end to end through the CLI: the model learns on held-out demo data."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONFIGS

from mmclin.cli import main, metrics_table

ROOT = Path(__file__).resolve().parents[1]


def _last_val(metrics_csv: Path) -> dict[str, float]:
    rows = [r for r in csv.DictReader(open(metrics_csv)) if r.get("val/zs_bacc")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}


def test_derm_clip_learns_zero_shot_on_held_out_demo(demo_cache, tmp_path):
    main([
        "fit", "-c", str(CONFIGS / "derm-clip.yaml"),
        "--trainer.max_epochs", "20", "--trainer.check_val_every_n_epoch", "20", "--data.batch_size", "32",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--data.demo_lesions_per_class", "40",
    ])
    run = next(tmp_path.glob("lightning_logs/version_*"))
    metrics = _last_val(run / "metrics.csv")
    chance = 1 / 7
    assert metrics["val/zs_bacc"] > chance + 0.3, metrics
    assert metrics["val/i2t_r10"] > 10 / 84 + 0.2, metrics  # ~84 validation pairs: R@10 by chance is ~0.12
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert "CLIPModule" in (run / "config.yaml").read_text()


def test_console_entry_points_print_config():
    for cmd in ([sys.executable, "-m", "mmclin"], [str(Path(sys.executable).parent / "lightning")]):
        out = subprocess.run([*cmd, "fit", "-c", str(CONFIGS / "derm-clip.yaml"), "--print_config"],
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "class_path: mmclin.models.CLIPModule" in out.stdout
        assert "class_path: datamodules.DermDataModule" in out.stdout


def test_metrics_table_puts_intervals_beside_figures_and_counts_the_finer_ones():
    metrics = {"test/acc": 0.5, "test/acc_ci_low": 0.4, "test/acc_ci_high": 0.6,
               "test/acc/measurement": 0.42, "test/acc_ci_low/measurement": 0.35, "test/acc_ci_high/measurement": 0.49,
               "test/acc/measurement/organ_volume": 0.3, "test/acc_ci_low/measurement/organ_volume": 0.2,
               "test/acc_ci_high/measurement/organ_volume": 0.4, "test/baseline/majority_acc/recognition": 0.3,
               "test/loss": float("nan")}
    lines = metrics_table(metrics).splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["test/acc", "test/acc/measurement",
                                                          "test/baseline/majority_acc/recognition", "test/loss"]
    assert lines[0].endswith("0.5000 [0.4000, 0.6000]") and lines[1].endswith("0.4200 [0.3500, 0.4900]")
    assert lines[3].endswith("nan") and lines[-1].startswith("  (1 finer figure, e.g. per question subtype")


def test_fit_on_a_bad_report_folder_ends_in_one_named_line(tmp_path, capsys):
    (tmp_path / "indiana_reports.csv").write_text(
        'uid,MeSH,Problems,image,indication,comparison,findings,impression\n7,normal,normal,x,,,"",""\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", "configs/cxr-error-check-text.yaml", "--data.init_args.root", str(tmp_path),
              "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "row 1 (uid 7): no findings and no impression" in err[-1]
    assert not any(line.startswith("Traceback") for line in err)


def test_the_tensorboard_overlay_logs_curves_and_figures(demo_cache, tmp_path):
    from conftest import TINY_CLIP
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(["fit", "-c", str(CONFIGS / "derm-clip.yaml"), "-c", str(CONFIGS / "overlays" / "tensorboard.yaml"),
          "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1", "--data.batch_size", "8",
          "--data.demo_lesions_per_class", "8", "--data.demo_image_size", "32", "--trainer.default_root_dir",
          str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
          "--model.init_args.model_config", str(TINY_CLIP).replace("'", '"')])
    run = next(tmp_path.glob("lightning_logs/version_*"))
    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    assert {"val/zero_shot_confusion", "val/zero_shot_roc"} <= set(events.Tags()["images"])
    assert "val/zs_bacc" in events.Tags()["scalars"]
    assert list((run / "plots").glob("val-zero_shot_confusion-epoch000.png"))


def test_the_mlflow_overlay_logs_curves_and_figures_to_a_local_store(demo_cache, tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install -e '.[mlflow]')")
    from conftest import TINY_CLIP
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    main(["fit", "-c", str(CONFIGS / "derm-clip.yaml"), "-c", str(CONFIGS / "overlays" / "mlflow.yaml"),
          "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1", "--data.batch_size", "8",
          "--data.demo_lesions_per_class", "8", "--data.demo_image_size", "32", "--trainer.default_root_dir",
          str(tmp_path), "--trainer.logger.init_args.tracking_uri", store,
          "--trainer.logger.init_args.artifact_location", str(tmp_path / "artifacts"),
          "--trainer.logger.init_args.save_dir", str(tmp_path / "mlflow"),
          "--model.init_args.model_config", str(TINY_CLIP).replace("'", '"')])
    client = MlflowClient(tracking_uri=store)
    [run] = client.search_runs([client.get_experiment_by_name("mmclin").experiment_id])
    assert "val/zs_bacc" in run.data.metrics and run.data.params  # curves and the run's settings
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "val")}
    assert any("zero_shot_confusion" in path for path in figures), figures
    assert list(tmp_path.rglob("plots/val-zero_shot_confusion-epoch000.png"))
