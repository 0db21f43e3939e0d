"""The split loaders every datamodule shares: each defines ``_loader(split, train)`` once."""

from __future__ import annotations

from torch.utils.data import DataLoader, Dataset, Sampler

from mmclin.errors import DataError
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
                      sampler: Sampler | None = None) -> DataLoader:
        """A loader of `dataset` batched by the attached model's collator, from the usual hparams (``batch_size``,
        ``eval_batch_size``, ``num_workers``); shuffled (or drawn by `sampler`) and without a short last batch when
        training.

        Raises:
            DataError: the split is empty (naming `source` and the `unit` it has none of).
        """
        if len(dataset) == 0:
            raise DataError(f"{source}: the '{split}' split has no {unit}")
        h = self.hparams
        return DataLoader(dataset, batch_size=h.batch_size if train else (h.eval_batch_size or h.batch_size),
                          shuffle=train and sampler is None, sampler=sampler,
                          drop_last=train and len(dataset) > h.batch_size, num_workers=h.num_workers,
                          persistent_workers=h.num_workers > 0,
                          collate_fn=model_collator(self.trainer, type(self).__name__))
