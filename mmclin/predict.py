"""``lightning predict`` output: one JSONL file of every model's rows, in the data's order, once per study."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from mmclin.runs import run_dir


def _plain(value: Any) -> Any:
    """JSON-ready: tensors and NumPy scalars as numbers or lists."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class JSONLPredictionWriter(BasePredictionWriter):
    """Writes ``predictions.jsonl``: the rows every ``predict_step`` returns, each with its ``index`` in the
    predict split, sorted by it.

    Under N processes each rank writes its part (Lightning shards the predict split without padding and records
    each batch's indices), then rank 0 merges them, so each study appears once and in the split's order.

    Args:
        output_dir: where ``predictions.jsonl`` goes; default the trainer's log directory (or root dir).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.path: Path | None = None

    def _directory(self, trainer: L.Trainer) -> Path:
        directory = Path(self.output_dir or run_dir(trainer))
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        # Lightning passes the batches' rows flat for one predict loader, per loader for several; indices per loader
        per_loader = bool(predictions) and isinstance(predictions[0], list) and bool(predictions[0]) and \
            isinstance(predictions[0][0], list)
        rows = []
        for loader_rows, loader_indices in zip(predictions if per_loader else [predictions], batch_indices):
            for batch_rows, indices in zip(loader_rows, loader_indices):
                rows += [{"index": int(index), **_plain(row)} for row, index in zip(batch_rows, indices)]
        directory = self._directory(trainer)
        part = directory / f"predictions-rank{trainer.global_rank}.jsonl"
        part.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        trainer.strategy.barrier()
        self.path = directory / "predictions.jsonl"
        if trainer.global_rank == 0:
            parts = [directory / f"predictions-rank{r}.jsonl" for r in range(trainer.world_size)]
            merged = sorted((json.loads(line) for p in parts for line in p.read_text(encoding="utf-8").splitlines()),
                            key=lambda r: r["index"])
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in merged), encoding="utf-8")
            os.replace(tmp, self.path)
            for p in parts:
                p.unlink()
            rank_zero_info(f"Predictions: {self.path} ({len(merged)} rows)")
        trainer.strategy.barrier()
