"""The contracts between mmclin's parts: what an encoder returns, what a datamodule offers a model (and the model
hands it), and what a trained model kind offers export and ``mmclin predict``.

::

    files ──► ClinicalDataModule ──batches──► model (CLIPModule | MultimodalLM | ReportChecker | ...)
                 ▲  study_items(path)              │  encoders: Encoder -> EncoderOutput
                 └──── connect(collator, ...) ◄────┤  fusion: Fusion (soft prompt | cross-attention | ...)
                                                   ▼
                                    Servable: study_batch, reference_outputs, export_to, from_export
                                    (mmclin.export, mmclin predict)

A part asks another only for what these classes declare; every optional hook has a default here, so a new
dataset, encoder or model kind is a subclass, not an edit of the code that uses it (docs/architecture.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mmclin.errors import ConfigError, DataError

IGNORE_INDEX = -100  # the label value transformers' causal-LM loss skips (torch cross_entropy's ignore_index)


# -- encoders ---------------------------------------------------------------------------------------------
@dataclass
class EncoderOutput:
    """What an encoder returns (time series, images, volumes).

    Attributes:
        tokens: (B, T, D) float; zero where ``mask`` is False.
        pooled: (B, D) mean of the valid tokens.
        mask: (B, T) bool, True where a token is valid.
        channel_index: (T,) long, the channel each token came from; -1 where a token mixes channels.
        mean: (B, C) per-channel mean of the valid samples when the encoder z-normalised, else None.
        std: (B, C) per-channel population std (correction=0) of the valid samples, before the eps floor
            used for dividing (a flat lead reports 0), when the encoder z-normalised, else None.
        region_logits: (B, R, *spatial) segmentation logits of anatomical regions, from encoders with a region
            head (:class:`encoders.regions.RegionEncoder`), else None.
        regions: (B, R, F) statistics of those regions, else None.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor
    channel_index: torch.Tensor
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    region_logits: torch.Tensor | None = None
    regions: torch.Tensor | None = None


class Encoder(nn.Module):
    """Base of every medium's encoder: ``forward(x, lengths=None) -> EncoderOutput`` with tokens of width
    :attr:`out_dim`.

    Attributes:
        out_dim: token and pooled width D.
        grid: the token grid (rows, columns) or (depth, rows, columns) when tokens lie on one (images, volumes),
            else None (time series: tokens per channel and patch). Dense auxiliary targets are pooled to it.
        regions: names of the anatomical regions a region head segments (their targets are auxiliary classes),
            else None.
    """

    out_dim: int
    grid: tuple[int, ...] | None = None
    regions: list[str] | None = None

    def scaled_parameters(self) -> list[tuple[nn.Module, float]]:
        """Parts trained at another learning rate: (submodule, factor of the model's rate); default none."""
        return []


# -- data -------------------------------------------------------------------------------------------------
class ClinicalDataModule(L.LightningDataModule):
    """Base of every mmclin datamodule: the split loaders from one ``_loader(split, train)``, and every hook a model,
    the CLI or ``mmclin predict`` may ask for, with its default.

    The model hands the datamodule what only it knows (its batch collator, image transforms, tokenizer) through
    :meth:`connect`, from its ``setup``; no datamodule reaches into the trainer for the model.

    Attributes:
        selection_metric: the validation metric (higher is better) that picks the best checkpoint
            (:class:`mmclin.runs.BestCheckpoint`); None keeps the last one.
    """

    selection_metric: ClassVar[str | None] = None
    collator: Callable | None = None
    transforms: tuple[Callable, Callable] | None = None
    tokenizer: Callable | None = None
    answerer: Callable | None = None

    # -- what the model hands over ----------------------------------------------------------------------
    def connect(self, collator: Callable | None = None, transforms: tuple[Callable, Callable] | None = None,
                tokenizer: Callable | None = None, answerer: Callable | None = None) -> None:
        """Take what only the model knows; each None leaves the datamodule's own default.

        Args:
            collator: samples -> the model's batch.
            transforms: (train, eval) image transforms, as the model's weights expect.
            tokenizer: the model's text tokenizer.
            answerer: the model's answers to samples, ``(samples, generate) -> answers``, for data built from them
                (preference pairs of the model's own answers).
        """
        self.collator, self.transforms, self.tokenizer, self.answerer = collator, transforms, tokenizer, answerer

    # -- what the data offers (defaults: the data has none) ---------------------------------------------
    @property
    def classnames(self) -> list[str] | None:
        """Class names in label order (zero-shot classification), or None."""
        return None

    @property
    def aux_classes(self) -> list[str]:
        """Names of the auxiliary findings the samples carry targets for (``MultimodalLM(aux_classes=...)``)."""
        return []

    @property
    def choices(self) -> list[str]:
        """Answers every question of the data chooses from (added to a fitted tokenizer's corpus)."""
        return []

    def corpus(self, split: str = "train") -> list[str]:
        """The texts of `split`, to fit a tokenizer on.

        Raises:
            ConfigError: the data has no text of its own.
        """
        raise ConfigError(f"{type(self).__name__} has no texts to fit a tokenizer or vocabulary on: give the model "
                          "a pretrained tokenizer (or vocabulary), or train it on data with reports")

    def baselines(self, split: str) -> dict[str, float]:
        """What answering without looking scores on `split` (majority answers), printed beside the model's."""
        return {}

    def lesion_masks(self, split: str, lesion_classes: list[str] | None = None) -> list[torch.Tensor] | None:
        """Per sample of `split`, a bool mask of its lesions (noised by MMedPO's ``lesion_noise``), or None where
        the data localises none."""
        return None

    # -- one study of a user's --------------------------------------------------------------------------
    def study_item(self, path: str | os.PathLike, question: str | None = None,
                   choices: list[str] | None = None) -> dict:
        """One study of a user's (`path`), read as the evaluation split is, as one sample; `question` and
        `choices` for question-answering data.

        Raises:
            ConfigError: the datamodule reads no single studies. DataError: see the subclass.
        """
        raise ConfigError(f"one-study prediction is not available for {type(self).__name__} yet; use `lightning "
                          "predict -c CONFIG --ckpt_path MODEL` on a data folder")

    def study_items(self, path: str | os.PathLike, question: str | None = None,
                    choices: list[str] | None = None) -> list[dict]:
        """The samples of one study: one (:meth:`study_item`), or several where a study is split (a night's 30-s
        epochs, the windows of a long record)."""
        return [self.study_item(path, question, choices)]

    def read_study_items(self, study: dict) -> list[dict]:
        """The samples of one row of the ``predict`` list (see :func:`datamodules.loaders.read_studies`)."""
        return self.study_items(study["input"], study.get("question"), study.get("choices"))

    def study_collate(self) -> Callable | None:
        """How samples of studies are batched: the connected collator, else torch's default collate."""
        return self.collator

    # -- loaders ----------------------------------------------------------------------------------------
    def _loader(self, split: str, train: bool) -> DataLoader:
        raise NotImplementedError(f"{type(self).__name__} defines no _loader(split, train)")

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        """Every sample of every study of the ``predict`` setting when the datamodule has one (see
        :func:`datamodules.loaders.read_studies`), read by :meth:`read_study_items`; else the test split."""
        from datamodules.loaders import read_studies

        spec = self.hparams.get("predict")  # a setting of the datamodules that predict from a list of studies
        if not spec:
            return self._loader("test", train=False)
        return self.study_loader(read_studies(spec))

    def study_loader(self, studies: list[dict]) -> DataLoader:
        """Every sample of `studies` (``{"input", ...}`` rows, each read by :meth:`read_study_items`), in order."""
        from datamodules.loaders import split_loader

        items = [item for study in studies for item in self.read_study_items(study)]
        return split_loader(items, False, self.trainer, self.hparams, collate_fn=self.study_collate())

    def model_batches(self, dataset: Dataset, split: str, train: bool, source: object, unit: str,
                      weights: Any = None) -> DataLoader:
        """A loader of `dataset` batched by the connected collator, from the usual hparams (``batch_size``,
        ``eval_batch_size``, ``num_workers``); see :func:`datamodules.loaders.split_loader`.

        Raises:
            DataError: the split is empty (naming `source` and the `unit` it has none of).
            ConfigError: no model connected its collator.
        """
        from datamodules.loaders import split_loader

        if len(dataset) == 0:
            raise DataError(f"{source}: the '{split}' split has no {unit}")
        return split_loader(dataset, train, self.trainer, self.hparams, weights, self.required_collator())

    def required_collator(self) -> Callable:
        """The connected collator.

        Raises:
            ConfigError: none was connected (a model connects its collator in its ``setup``; outside a Trainer,
                call ``datamodule.connect(collator=model.collator)``).
        """
        if self.collator is None:
            raise ConfigError(f"{type(self).__name__} batches with the model's collator, and none is connected: "
                              "train it with a model that has one (MultimodalLM, ReportChecker), or call "
                              "connect(collator=...)")
        return self.collator


class QADataModule(ClinicalDataModule):
    """Base of the question-answering datamodules: samples ``{<medium>: [tensor], "question", "answer",
    "choices", "meta"}`` batched by the model's collator (a :class:`mmclin.tasks.qa.QACollator`)."""

    selection_metric: ClassVar[str | None] = "val/acc_likelihood"

    def study_collate(self) -> Callable:
        return self.required_collator()


# -- trained models ---------------------------------------------------------------------------------------
class Servable:
    """Base of a trained model kind that export and ``mmclin predict`` serve without knowing which kind it is
    (mixed into its LightningModule). The default :meth:`export_to` suits a module whose weights are all its own
    tensors; a kind whose LM has a format of its own (``save_pretrained``) overrides it."""

    def connect_data(self, datamodule: ClinicalDataModule) -> None:
        """Hand `datamodule` what reading the model's data needs from the model (:meth:`ClinicalDataModule.connect`);
        called from the model's ``setup`` and by ``mmclin predict``."""
        raise NotImplementedError

    def study_data(self) -> dict | None:
        """The settings (with ``_class_path``) of the datamodule that reads this model's studies when its checkpoint
        records none (a model trained without LightningCLI); None: the checkpoint must record them."""
        return None

    def study_batch(self, items: list[dict]) -> Any:
        """The batch ``predict_step`` takes, of the datamodule's :meth:`~ClinicalDataModule.study_items`."""
        raise NotImplementedError

    def reference_outputs(self, generator: torch.Generator) -> torch.Tensor:
        """Raw outputs (eval mode) on a fixed input built from the model's own settings and `generator`, to compare
        a reload of its export with."""
        raise NotImplementedError

    def export_to(self, out: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
        """Write what needs a format of its own under `out`; returns the tensors for the export's weight file and
        how ``out`` holds the rest (the export config's ``lm`` entry), or None."""
        return self.state_dict(), None

    @classmethod
    def from_export(cls, directory: Path, config: Any, **kwargs) -> L.LightningModule:
        """The model of an export `directory` whose settings are `config` (:class:`mmclin.export.ExportConfig`);
        :func:`mmclin.export.load_own_tensors` reads what the default :meth:`export_to` wrote.

        Raises:
            CheckpointError: the settings do not build the model, or the weights do not fit it.
        """
        raise NotImplementedError
