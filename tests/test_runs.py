"""The best checkpoint is picked by the figure the datamodule declares, and named after it."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from mmclin.contracts import ClinicalDataModule
from mmclin.runs import BestCheckpoint


class Scores(ClinicalDataModule):
    """Four batches of one number; the model's validation score is a fixed sequence over the epochs."""

    selection_metric = "val/score"

    def _loader(self, split: str, train: bool) -> DataLoader:
        return DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=2)


class Unranked(Scores):
    selection_metric = None


class Scored(L.LightningModule):
    SCORES = (0.2, 0.7, 0.4)  # the second epoch is the best

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/score", self.SCORES[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(data: ClinicalDataModule, root: Path) -> BestCheckpoint:
    best = BestCheckpoint()
    trainer = L.Trainer(max_epochs=3, default_root_dir=root, callbacks=[best], logger=False, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Scored(), datamodule=data)
    return best


def test_the_best_checkpoint_follows_the_datamodules_selection_metric(tmp_path):
    best = _fit(Scores(), tmp_path / "scored")
    assert best.monitor == "val/score"
    assert Path(best.best_model_path).name == "epoch001-score0.700.ckpt"
    assert [p.name for p in (tmp_path / "scored" / "checkpoints").iterdir()] == ["epoch001-score0.700.ckpt"]


def test_without_a_selection_metric_the_last_checkpoint_is_kept(tmp_path):
    best = _fit(Unranked(), tmp_path / "unranked")
    assert best.monitor is None
    assert [p.name for p in (tmp_path / "unranked" / "checkpoints").iterdir()] == ["epoch002.ckpt"]
