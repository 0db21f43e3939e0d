"""The model card (``README.md``) every export carries: data, preprocessing, figures beside baselines, use.

Filled from the checkpoint (its model and datamodule settings, epoch and step, the monitored metric) and from the
run's ``metrics.csv`` beside it (the last validation and test figures, with their intervals and the data's
baselines), so what it says is what the run measured.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path


def run_metrics(checkpoint_path: str | Path) -> dict[str, float]:
    """The last value of every ``val/...`` and ``test/...`` figure in the run's ``metrics.csv`` (the CSV logger's
    file two levels above ``checkpoints/x.ckpt``); empty when the run logged elsewhere."""
    path = Path(checkpoint_path).resolve()
    csv_path = next((p / "metrics.csv" for p in path.parents[:3] if (p / "metrics.csv").is_file()), None)
    if csv_path is None:
        return {}
    figures: dict[str, float] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value and key.startswith(("val/", "test/")):
                    figures[key] = float(value)
    return figures


def _metric_lines(figures: dict[str, float]) -> list[str]:
    rows = []
    for name in sorted(figures):
        if "_ci_" in name or "/baseline/" in name or name.count("/") > 2 or name.endswith("loss"):
            continue
        value = figures[name]
        if not math.isfinite(value):
            continue
        split, metric = name.split("/", 1)
        head, _, group = metric.partition("/")
        low = figures.get(f"{split}/{head}_ci_low" + (f"/{group}" if group else ""))
        high = figures.get(f"{split}/{head}_ci_high" + (f"/{group}" if group else ""))
        interval = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
        rows.append(f"| {split} | {metric} | {value:.3f}{interval} |")
    baselines = [f"| {n.split('/')[0]} | {n.split('/baseline/')[1]} | {v:.3f} |" for n, v in sorted(figures.items())
                 if "/baseline/" in n]
    lines = ["| split | metric | value [95% CI] |", "|---|---|---:|", *rows] if rows else [
        "No validation or test figures were found beside the checkpoint (the run logged elsewhere)."]
    if baselines:
        lines += ["", "What a trivial answerer scores on the same split; `shuffled_media_*` and `blank_media_*`: this "
                  "model with each study's medium replaced by another study's or by zeros (a model that does not "
                  "look at its input scores the same; `*_minus_shuffled_media` above is the paired difference):", "",
                  "| split | baseline | value |", "|---|---|---:|", *baselines]
    return lines


def model_card(checkpoint: dict, checkpoint_path: str | Path, title: str, load: str,
               preprocessing: dict) -> str:
    """Markdown of the card.

    Args:
        checkpoint: the checkpoint's dict (as read by :func:`mmclin.checkpoints.read_checkpoint`).
        checkpoint_path: its file, to find the run's metrics.
        title: what the model is, in a few words.
        load: a code block's content showing how to load and predict.
        preprocessing: the inputs' preprocessing as the model expects it (JSON-ready).
    """
    data = {k: v for k, v in (checkpoint.get("datamodule_hyper_parameters") or {}).items() if not k.startswith("_")}
    data_class = (checkpoint.get("datamodule_hyper_parameters") or {}).get("_class_path", "unknown")
    model_class = (checkpoint.get("hyper_parameters") or {}).get("_class_path", "unknown")
    demo = data.get("root") in (None, "")
    source = ("the project's generated demo data (random-init model on synthetic studies: a functional check, "
              "not a clinical model)" if demo else f"`{data.get('root')}`")
    monitor = next((state for key, state in (checkpoint.get("callbacks") or {}).items()
                    if "ModelCheckpoint" in key and state.get("monitor")), None)
    selected = (f"selected on `{monitor['monitor']}` = {float(monitor['best_model_score']):.4f}"
                if monitor and monitor.get("best_model_score") is not None else "the last weights of the run")
    epochs = checkpoint["epoch"] + 1 if isinstance(checkpoint.get("epoch"), int) else "?"
    lines = [
        f"# {title}", "",
        f"Model `{model_class}`, data `{data_class}`; trained {epochs} epochs ({checkpoint.get('global_step', '?')} "
        f"steps), {selected}.", "",
        "## Training data", "",
        f"Source: {source}. Split: validation fraction {data.get('val_fraction', 'the dataset’s own')}, test fraction "
        f"{data.get('test_fraction', 'the dataset’s own')}, seed {data.get('seed', 0)} (the datamodule's split, "
        "grouped by patient/lesion/report where it has one).", "",
        "Data settings:", "", "```json", json.dumps(data, indent=2, default=str), "```", "",
        "## Architecture", "", "Constructor settings (the export's config holds the same):", "", "```json",
        json.dumps({k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if not k.startswith("_")
                    and k not in ("vocab",)}, indent=2, default=str), "```", "",
        "## Preprocessing (travels with the model)", "", "```json", json.dumps(preprocessing, indent=2, default=str),
        "```", "",
        "## Figures", "", *_metric_lines(run_metrics(checkpoint_path)), "",
        "## Intended use and limits", "",
        "Research use only; not a medical device and not validated for clinical decisions. "
        + ("Trained on generated demo data: its figures show that the pipeline learns, not how it performs on "
           "patients. " if demo else "")
        + "Figures hold for the data and split above; check calibration and subgroup performance on your own "
        "data before drawing conclusions.", "",
        "## Load and predict", "", "```python", load.strip(), "```", "",
    ]
    return "\n".join(lines)
