"""Where a run's files go: its logger's directory, or for a logger without a local one (MLflow on a database
store) ``<default_root_dir>/<experiment id>/<run id>``, where Lightning's ModelCheckpoint also puts it; which
checkpoint is the run's best (:class:`BestCheckpoint`, after the datamodule's ``selection_metric``)."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger

from mmclin.contracts import ClinicalDataModule
from mmclin.errors import ConfigError


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


class BestCheckpoint(ModelCheckpoint):
    """Keeps the checkpoint with the highest validation figure the datamodule picks models by (its declared
    ``selection_metric``, :class:`mmclin.contracts.ClinicalDataModule`), named after it:
    ``epoch009-zs_bacc0.611.ckpt``. Data without one (or no datamodule) keeps the last checkpoint only,
    ``epoch009.ckpt``. One callback for every run config: the metric is the data's, not the config's."""

    def __init__(self) -> None:
        super().__init__(mode="max", save_top_k=1, auto_insert_metric_name=False)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        data = trainer.datamodule
        self.monitor = data.selection_metric if isinstance(data, ClinicalDataModule) else None
        self.filename = "epoch{epoch:03d}"
        if self.monitor is not None:  # "val/zs_bacc" -> "epoch{epoch:03d}-zs_bacc{val/zs_bacc:.3f}"
            self.filename += f"-{self.monitor.rsplit('/', 1)[-1]}{{{self.monitor}:.3f}}"
        super().setup(trainer, pl_module, stage)


class CSVRunLogger(CSVLogger):
    """Lightning's CSVLogger whose ``save_dir`` may be left unset in a config: ``mmclin fit`` then writes under
    the trainer's ``default_root_dir`` (:meth:`mmclin.cli.MMClinCLI.before_instantiate_classes` fills it in; a
    logger is built before the trainer and never sees it), so a run config names its directory once.

    Args:
        save_dir: the directory the ``name/version_N`` folders go under.
        name: the experiment folder.
        version: a fixed version (an int, or a folder name); default the next free ``version_N``.
        prefix: prefix of the metric names.
        flush_logs_every_n_steps: how often the metrics file is written.
    """

    def __init__(self, save_dir: str | None = None, name: str = "lightning_logs", version: int | str | None = None,
                 prefix: str = "", flush_logs_every_n_steps: int = 100) -> None:
        if save_dir is None:
            raise ConfigError("trainer.logger: CSVRunLogger needs a save_dir (under `mmclin fit` / `lightning fit` "
                              "it is the trainer's default_root_dir)")
        super().__init__(save_dir, name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)
