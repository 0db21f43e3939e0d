"""Runs that resume exactly: a killed and resumed fit ends with the weights of the uninterrupted one.

Three things make a resumed run the run:

- the training order and every item's augmentation are functions of (seed, epoch, position) alone
  (:class:`ResumableSampler` hands each item its own seed, :class:`SeededItems` draws the item under it), so
  neither depends on how much of the process's random state earlier work consumed;
- :class:`ExactResume` writes ``last.ckpt`` at a fixed cadence of steps and at every epoch end (not only when
  validation runs), with the RNG states and the number of batches done in the epoch;
- on resume it restores them and starts the sampler after the batches already trained on.

Lightning restores the weights, optimiser, scheduler and loop counters itself; it saves RNG states only for
its spawn launcher, and its mid-epoch restart needs a loader that knows where it stopped.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.seed import isolate_rng
from torch.utils.data import Dataset, DistributedSampler

_STATE_KEY = "mmclin_resume"


def rng_states() -> dict:
    """Python's, NumPy's, torch's and (where present) CUDA's RNG states, in types ``torch.load(weights_only=True)``
    accepts (Lightning's own collector keeps NumPy's as an array, which it refuses)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss)}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what :func:`rng_states` returned."""
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumableSampler(DistributedSampler):
    """A training epoch's order as a function of (seed, epoch) alone, each index paired with its own item seed.

    Yields ``(index, item_seed)`` for :class:`SeededItems`. Being a ``DistributedSampler``, Lightning leaves it
    in place under DDP (it shards by `rank` itself, as ``DistributedSampler`` does) and calls ``set_epoch`` at
    every epoch start. ``start`` skips the items a resumed run has already trained on, once.

    Args:
        dataset: the training dataset (only its length is used).
        seed: seed of the order and of the item seeds.
        weights: per-item sampling weights (drawn with replacement, as ``WeightedRandomSampler``), or None for a
            shuffled permutation.
        num_replicas: processes sharing the epoch.
        rank: this process.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, weights: Any = None, num_replicas: int = 1,
                 rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        if self.weights is not None and len(self.weights) != len(dataset):
            raise ValueError(f"{len(self.weights)} sampling weights for {len(dataset)} items")
        self.start = 0

    def __iter__(self):
        if self.weights is None:
            order = list(super().__iter__())
        else:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            drawn = torch.multinomial(self.weights, self.total_size, replacement=True, generator=g).tolist()
            order = drawn[self.rank:self.total_size:self.num_replicas]
        seeds = np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(len(order)).tolist()
        start, self.start = self.start, 0
        return iter(list(zip(order, seeds))[start:])


class SeededItems(Dataset):
    """A map-style dataset read at ``(index, item_seed)`` keys: each item (and its random augmentation) is drawn
    with Python's, NumPy's and torch's CPU generators seeded by `item_seed`, and the process's own random state
    is left as it was."""

    def __init__(self, items: Dataset) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with isolate_rng(include_cuda=False):
            random.seed(seed)
            np.random.seed(seed)
            torch.random.default_generator.manual_seed(seed)  # CPU only: CUDA streams stay the model's
            return self.items[index]


class ExactResume(ModelCheckpoint):
    """``last.ckpt`` every `every_n_train_steps` optimiser steps and at every epoch end, resumable exactly.

    Every checkpoint of the run (this one's and any other ModelCheckpoint's) carries the RNG states (Python,
    NumPy, torch, CUDA), the epoch and the batches done in it; ``lightning fit ... --ckpt_path LAST`` restores
    them and starts the epoch's :class:`ResumableSampler` after those batches.

    Args:
        dirpath: where ``last.ckpt`` goes (default: the run's checkpoint folder, as ModelCheckpoint).
        every_n_train_steps: cadence of the step checkpoints (0: epoch ends only).
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 50) -> None:
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps,
                         save_on_train_epoch_end=True, enable_version_counter=False)
        self._restored: dict | None = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fast_dev_run and not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[_STATE_KEY] = {
            "rng": rng_states(),
            "epoch": trainer.current_epoch,
            "batches": trainer.fit_loop.epoch_loop.batch_progress.current.processed,
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._restored = checkpoint.get(_STATE_KEY)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if batch_idx + 1 < trainer.num_training_batches:  # the epoch's last step is saved at the epoch end
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._restored is None:
            return
        state, self._restored = self._restored, None
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, ResumableSampler):
            # Lightning made this epoch's iterator before the checkpoint was restored (and before a mid-epoch
            # restart sets the sampler's epoch): set epoch and position, then start the iterator again.
            epoch = trainer.fit_loop.epoch_progress.current.processed  # the epoch the loop goes on with
            sampler.set_epoch(epoch)
            sampler.start = state["batches"] * loader.batch_size if state["epoch"] == epoch else 0
            iter(trainer.fit_loop._data_fetcher)
        set_rng_states(state["rng"])
