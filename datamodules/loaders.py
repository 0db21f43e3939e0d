"""The split loaders every datamodule shares: each defines ``_loader(split, train)`` once."""

from __future__ import annotations

from torch.utils.data import DataLoader


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
