"""Where a run's files go: its logger's directory, or for a logger without a local one (MLflow on a database
store) ``<default_root_dir>/<experiment id>/<run id>``, where Lightning's ModelCheckpoint also puts it."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback


def run_dir(trainer: L.Trainer) -> str:
    """The run's directory (config, plots, predictions); the same on every rank."""
    if trainer.log_dir is not None:  # a broadcast under DDP
        return trainer.log_dir
    logger = trainer.logger
    if logger is None:
        return trainer.default_root_dir
    return os.path.join(trainer.default_root_dir, str(logger.name), str(logger.version))


class SaveRunConfig(SaveConfigCallback):
    """LightningCLI's config saving, into :func:`run_dir` when the logger has no local directory (where
    LightningCLI's own callback would stop on ``assert log_dir is not None``)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved or trainer.log_dir is not None:
            return super().setup(trainer, pl_module, stage)
        directory = trainer.strategy.broadcast(run_dir(trainer))
        if trainer.is_global_zero:
            os.makedirs(directory, exist_ok=True)
            self.parser.save(self.config, os.path.join(directory, self.config_filename), skip_none=False,
                             overwrite=self.overwrite, multifile=self.multifile)
        self.already_saved = True
        self.save_config(trainer, pl_module, stage)
