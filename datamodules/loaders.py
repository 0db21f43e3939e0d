"""Loaders every datamodule shares: one split's (exact under resume and several processes) and the list of
studies to predict (:class:`mmclin.contracts.ClinicalDataModule` builds on them)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from mmclin.errors import DataError
from mmclin.resume import ResumableSampler, SeededItems


def read_studies(spec: str | os.PathLike) -> list[dict]:
    """Studies to predict: ``{"input": path, ...}`` rows of a ``.jsonl`` file (with ``question`` and ``choices``
    for QA models), the paths of a ``.txt`` file (one per line; ``#`` comments), or the one path given. Relative
    inputs are taken from the list file's folder. ``choices`` is a JSON list of the allowed answers
    (``["yes", "no"]``); an empty list or none asks an open question.

    Raises:
        DataError: the list file is missing or empty, a line is not JSON or has no ``input``, its ``question`` is
            not text or its ``choices`` not a list of distinct answers (a string such as ``"yes,no"`` included).
    """
    path = Path(spec)
    if path.suffix not in (".jsonl", ".txt"):
        return [{"input": str(path)}]
    if not path.is_file():
        raise DataError(f"{path}: list of studies not found")
    studies = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if path.suffix == ".txt":
            study = {"input": line.strip()}
        else:
            try:
                study = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number}: not JSON ({err})") from None
            if not isinstance(study, dict) or not study.get("input"):
                raise DataError(f"{path} line {number}: a study needs an 'input' path")
            _check_question(study, f"{path} line {number}")
        study["input"] = str(path.parent / study["input"]) if not Path(study["input"]).is_absolute() else \
            study["input"]
        studies.append(study)
    if not studies:
        raise DataError(f"{path}: no studies listed")
    return studies


def _check_question(study: dict, where: str) -> None:
    """A listed study's ``question`` is text and its ``choices`` a list of distinct answers: a string would be read
    character by character ("yes,no" as y, e, s, ...)."""
    question, choices = study.get("question"), study.get("choices")
    if question is not None and not (isinstance(question, str) and question.strip()):
        raise DataError(f"{where}: 'question' must be text, got {question!r}")
    if choices is None:
        return
    if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of answers such as [\"yes\", \"no\"], got {choices!r}")
    if len(set(choices)) < len(choices):
        raise DataError(f"{where}: 'choices' lists an answer twice: {choices!r}")


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
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = None
    if train:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = ResumableSampler(dataset, seed=seed, weights=weights, num_replicas=world, rank=rank)
        dataset = SeededItems(dataset)
    elif world > 1:
        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    batch_size = hparams.batch_size if train else (hparams.get("eval_batch_size") or hparams.batch_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                      drop_last=train and len(dataset) > hparams.batch_size, num_workers=hparams.num_workers,
                      persistent_workers=hparams.num_workers > 0, collate_fn=collate_fn,
                      pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator())  # worker seeds from here, not from the process's RNG
