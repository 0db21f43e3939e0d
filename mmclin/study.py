"""``mmclin predict --model MODEL --input FILE``: a trained model applied to one study of the user's own.

The preprocessing comes from the model: the checkpoint (or the export's ``mmclin_config.json``) carries its
datamodule's settings (LightningCLI saves them), and the datamodule's ``study_item`` reads the file as its
evaluation split would (sampling rate, lead order, image transform, ...). A file the model cannot take is a
named error that says what it expects.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import transformers

from mmclin.checkpoints import load_module
from mmclin.contracts import Servable
from mmclin.errors import ConfigError
from mmclin.export import CONFIG_NAME, load_exported
from mmclin.trusted import build_datamodule

STUDY_BATCH = 32  # samples per forward pass (a night has ~1,000 epochs)


def _datamodule(hparams: dict, path: Path):
    """The model's datamodule, built from its saved settings once every class they name is checked (nothing is
    read or generated)."""
    where = f"{path / CONFIG_NAME}: preprocessing" if path.is_dir() else f"{path}: datamodule_hyper_parameters"
    return build_datamodule(hparams, where)


def predict_study(model: str, inputs: list[str], question: str | None = None,
                  choices: list[str] | None = None) -> list[dict]:
    """One prediction row per input file (see each model's ``predict_step``), with the file under ``input``."""
    path = Path(model)
    transformers.utils.logging.disable_progress_bar()
    logging.disable(logging.WARNING)  # open_clip's "initialized randomly" while the architecture is built: the
    try:                              # checkpoint's weights follow
        module, data_hparams = load_exported(path) if path.is_dir() else load_module(path)
    finally:
        logging.disable(logging.NOTSET)
    if not isinstance(module, Servable):
        raise ConfigError(f"{path}: {type(module).__name__} is not a servable model kind (mmclin.contracts.Servable)")
    if not (data_hparams or {}).get("_class_path"):  # a checkpoint written without LightningCLI
        data_hparams = module.study_data() or data_hparams
    data = _datamodule(data_hparams, path)
    module.connect_data(data)
    rows = []
    for name in inputs:
        items = data.study_items(name, question, choices)  # one, or a study's many (a night's 30-s epochs)
        for start in range(0, len(items), STUDY_BATCH):
            with torch.no_grad():
                batch_rows = module.predict_step(module.study_batch(items[start:start + STUDY_BATCH]), 0)
            rows += [{"input": name, **row} for row in batch_rows]
    return rows


def main(argv: list[str]) -> list[dict]:
    p = argparse.ArgumentParser(prog="mmclin predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a checkpoint written by `lightning fit`, or a directory written "
                                                  "by `tools/export.py --format mmclin`")
    p.add_argument("--input", nargs="+", required=True,
                   help="the study's file(s): a JPEG/PNG photograph, a WFDB record (path without extension or its "
                        ".hea), a CT (NIfTI file or DICOM folder), an EDF night, a report .txt")
    p.add_argument("--question", help="for question-answering models")
    p.add_argument("--choices", help="comma-separated allowed answers of a closed question (scored by likelihood)")
    p.add_argument("--out", help="also write the rows to this JSONL file")
    args = p.parse_args(argv)
    choices = [c.strip() for c in args.choices.split(",")] if args.choices else None
    rows = predict_study(args.model, args.input, args.question, choices)
    nights: dict[str, list[str]] = {}
    for row in rows:
        if "epoch" in row.get("meta", {}):  # a night: one stage per epoch, summed up below
            nights.setdefault(row["input"], []).append(row["ranked"] or row["parsed"])
        elif "has_error" in row:
            if row["has_error"] is None:
                print(f"{row['input']}: no verdict ({row.get('refused', 'refused')})")
                continue
            found = f"error: {row['fine_type'] or 'unspecified'}" if row["has_error"] else "no error"
            windows = f", {row['n_windows']} windows" if row.get("n_windows", 1) > 1 else ""
            print(f"{row['input']}: {found}  (p_error {row['p_error']:.3f}{windows})")
        elif "probabilities" in row:
            top = sorted(row["probabilities"].items(), key=lambda kv: -kv[1])[:3]
            print(f"{row['input']}: {row['predicted']}  (" + ", ".join(f"{k} {v:.3f}" for k, v in top) + ")")
        else:
            ranked = f"  [most likely choice: {row['ranked']}]" if row.get("ranked") else ""
            answer = row["parsed"] if row["parsed"] is not None else f"{row['generated'].strip()!r} (names no choice)"
            span = row.get("meta", {}).get("span_s")  # one window of a longer record (duration_policy: window)
            where = f" [{span[0]:g}-{span[1]:g} s]" if span else ""
            print(f"{row['input']}{where}: {row['question']} -> {answer}{ranked}")
    for name, stages in nights.items():
        counts = ", ".join(f"{stage} {stages.count(stage)}" for stage in dict.fromkeys(sorted(map(str, stages))))
        print(f"{name}: {len(stages)} epochs staged ({counts}); per-epoch stages with --out")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {args.out}")
    return rows
