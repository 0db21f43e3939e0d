"""The split loaders every datamodule shares: each defines ``_loader(split, train)`` once."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from mmclin.errors import DataError
from mmclin.resume import ResumableSampler, SeededItems
from mmclin.tasks.qa import model_collator


class SplitLoaders:
    """Mixin for a LightningDataModule: train/val/test/predict loaders from its ``_loader(split, train)``."""

    def _loader(self, split: str, train: bool) -> DataLoader:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def model_batches(self, dataset: Dataset, split: str, train: bool, source: object, unit: str,
                      weights: Any = None) -> DataLoader:
        """A loader of `dataset` batched by the attached model's collator, from the usual hparams (``batch_size``,
        ``eval_batch_size``, ``num_workers``); see :func:`split_loader`.

        Raises:
            DataError: the split is empty (naming `source` and the `unit` it has none of).
        """
        if len(dataset) == 0:
            raise DataError(f"{source}: the '{split}' split has no {unit}")
        return split_loader(dataset, train, self.trainer, self.hparams, weights,
                            model_collator(self.trainer, type(self).__name__))


def split_loader(dataset: Dataset, train: bool, trainer: L.Trainer | None, hparams: Any, weights: Any = None,
                 collate_fn: Callable | None = None) -> DataLoader:
    """The loader of one split, exact under resume and under several processes.

    Training: a :class:`~mmclin.resume.ResumableSampler` (shuffled, or drawn by `weights` with replacement;
    seeded by ``seed_everything``'s seed, sharded by rank) over :class:`~mmclin.resume.SeededItems`, without a
    short last batch. Evaluation: the split in order; under several processes each rank takes every
    world-size-th item with no padding (Lightning's ``UnrepeatedDistributedSampler``), so no study is scored twice
    and :func:`mmclin.distributed.interleave` restores the one-process order.

    Args:
        hparams: with ``batch_size``, ``num_workers`` and optionally ``eval_batch_size``.
    """
    world, rank = getattr(trainer, "world_size", 1), getattr(trainer, "global_rank", 0)  # 1, 0 outside a Trainer
    sampler = None
    if train:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = ResumableSampler(dataset, seed=seed, weights=weights, num_replicas=world, rank=rank)
        dataset = SeededItems(dataset)
    elif world > 1:
        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    batch_size = hparams.batch_size if train else (getattr(hparams, "eval_batch_size", None) or hparams.batch_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                      drop_last=train and len(dataset) > hparams.batch_size, num_workers=hparams.num_workers,
                      persistent_workers=hparams.num_workers > 0, collate_fn=collate_fn,
                      pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator())  # worker seeds from here, not from the process's RNG
