"""Preference pairs over a question-answering / report datamodule, for :class:`mmclin.models.MMedPO`.

Training batches are pairs built from the base datamodule's training split (:mod:`mmclin.preference.pairs`):
hallucinations written into the reference report, wrong options of closed questions, the supervised model's
own answers with the lesion evidence noised away, and its wrong answers to the unaltered input. Validation and
test are the base datamodule's own splits, so the aligned model is scored on exactly what the supervised one
was.

Pairs are written to ``pairs.jsonl`` in the run directory (study, prompt, chosen, rejected, kind, weight) and can
be given back with ``pairs: FILE`` to train on the same pairs again.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.cli import instantiate_class
from torch.utils.data import DataLoader, Dataset

from datamodules.loaders import split_loader
from mmclin.checkpoints import own_hyperparameters, read_checkpoint
from mmclin.contracts import ClinicalDataModule
from mmclin.errors import ConfigError, DataError
from mmclin.preference.pairs import (
    BY_NAME,
    CONDITIONAL,
    INJECTED,
    KINDS,
    WORDING_WEIGHT,
    Pair,
    clinical_weight,
    inject_fundus_errors,
    noise_record,
    noise_region,
    other_input_study,
    other_study_report,
    wrong_option_pairs,
)
from mmclin.runs import run_dir
from mmclin.tasks.qa import parse_choice
from mmclin.trusted import datamodule_class, trusted_class

log = logging.getLogger(__name__)
MEDIA_KEYS = ("image", "series", "volume")


def study_key(sample: dict) -> str:
    """A sample's study id: its image, sample or record id from ``meta``."""
    meta = sample.get("meta") or {}
    for key in ("image_id", "sample_id", "id", "record"):
        if meta.get(key) is not None:
            return str(meta[key])
    raise DataError(f"a sample without a study id in its meta ({sorted(meta)}); expected image_id, sample_id or id")


class PairDataset(Dataset):
    """Pairs over the base training split: each item is the study's sample with ``chosen``/``rejected``, and for
    a conditional pair ``rejected_media``: the media of its ``rejected_study`` (``other_input``), or the sample's
    media with the lesion region noised by `noised(sample, index, generator)` (``noised_input``), drawn from
    (`seed`, pair index), so every epoch sees the same noise."""

    def __init__(self, base: Dataset, index: dict[str, int], pairs: list[Pair], noised=None, seed: int = 0):
        self.base, self.index, self.pairs, self.noised, self.seed = base, index, pairs, noised, seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        j = self.index[pair.study]
        sample = self.base[j]
        item = {**sample, "question": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected,
                "kind": pair.kind, "weight": pair.weight}
        key = next(k for k in MEDIA_KEYS if k in sample)
        if pair.kind == "other_input":
            item["rejected_media"] = {key: self.base[self.index[pair.rejected_study]][key]}
        elif pair.kind == "noised_input":
            media = self.noised(sample, j, torch.Generator().manual_seed(self.seed * 1_000_003 + i))
            if media is None:
                raise DataError(f"pair {i} ({pair.study}): a noised_input pair for a study with no lesion region")
            item["rejected_media"] = {key: media}
        return item


class PreferenceDataModule(ClinicalDataModule):
    """Preference pairs from `base`'s training split; `base`'s validation and test splits as they are."""

    def __init__(
        self,
        base: dict[str, Any] | None = None,
        init_from: str | None = None,
        pairs: str | None = None,
        kinds: list[str] | None = None,
        pairs_per_study: int = 2,
        noise_sigma: float = 1.0,
        lesion_classes: list[str] | None = None,
        on_bad_pair: Literal["raise", "skip"] = "raise",
        seed: int = 0,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
    ):
        """
        Args:
            base: the supervised run's datamodule as ``{"class_path": "datamodules...", "init_args": {...}}`` (the
                same settings, so the same preprocessing and splits). Default: the one the `init_from` checkpoint
                records, with the settings of a `base` given without ``class_path`` (``{"init_args": {"root":
                ...}}``) on top.
            init_from: the supervised checkpoint the model starts from (``mmclin fit`` passes on the model's).
            pairs: a ``pairs.jsonl`` to train on instead of building pairs.
            kinds: pair kinds to build (:data:`mmclin.preference.pairs.KINDS`); default every answer kind that
                applies: the injected report errors, ``other_study`` and ``lesion_noise`` for reports,
                ``wrong_option`` and ``lesion_noise`` for closed questions. The supervised model's own wrong
                generations (``own_answer``) and the conditional kinds (one pair per study: its answer given its own
                input over the same answer given the noised input, ``noised_input``, or another study's,
                ``other_input``) are asked for by name.
            pairs_per_study: most pairs per training study (drawn among its kinds).
            noise_sigma: SD of the noise put inside the lesion region (the images are normalised; a record's
                noise is this times each channel's SD).
            lesion_classes: the classes that count as lesions: fundus box classes (default all but
                ``optic_disc``), CT mask classes (default those named ``*lesion*``).
            on_bad_pair: in a `pairs` file, a study not in the training split, an empty rejected answer,
                chosen == rejected or a weight that is not a finite number > 0 ``raise`` a DataError naming the
                line, or are ``skip``-ped and counted.
            seed: seed of the injected errors, the pair draw and the noise.
            batch_size: pairs per training batch.
            eval_batch_size: validation/test batch size (default: batch_size).
            num_workers: DataLoader workers.
        """
        super().__init__()
        unknown = sorted(set(kinds or ()) - set(KINDS))
        if unknown:
            raise ConfigError(f"kinds: unknown pair kinds {unknown}; known: {list(KINDS)}")
        if on_bad_pair not in ("raise", "skip"):
            raise ConfigError(f"on_bad_pair must be 'raise' or 'skip', got {on_bad_pair!r}")
        self.save_hyperparameters()
        if base is not None and not isinstance(base, dict):
            raise ConfigError(f"base: a datamodule of this project as {{class_path, init_args}}, got {base!r}")
        if not (base or {}).get("class_path"):
            # the checkpoint's data, recorded as the base: the run's own checkpoints then name it
            self.hparams.base = base = self._recorded_base(init_from, base or {})
        trusted_class(base.get("class_path"), ClinicalDataModule, "base.class_path", ConfigError)
        self._base: ClinicalDataModule | None = None
        self._masks: list[torch.Tensor] | None = None
        self._pairs: list[Pair] = []
        self.skipped: Counter[str] = Counter()

    @staticmethod
    def _recorded_base(init_from: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
        """``{class_path, init_args}`` of the datamodule the supervised checkpoint `init_from` was trained on, its
        settings updated by `overrides` (a ``base`` without ``class_path``); the classes it names are checked before
        anything is built (:func:`mmclin.trusted.datamodule_class`)."""
        if not init_from:
            raise ConfigError("base: the supervised run's datamodule, or init_from: its checkpoint, which records it "
                              "(e.g. --model.init_args.init_from runs/fundus-report/.../checkpoints/last.ckpt)")
        where = f"{init_from}: datamodule_hyper_parameters"
        recorded = dict(read_checkpoint(init_from).get("datamodule_hyper_parameters") or {})
        cls = datamodule_class(recorded, where)
        if issubclass(cls, PreferenceDataModule):
            raise ConfigError(f"init_from: {init_from} is a checkpoint of preference data ({where}); start from the "
                              "supervised run's checkpoint")
        # `--data.init_args.base.init_args.X v` on the command line arrives as overrides["X"], beside init_args
        changed = {**(overrides.get("init_args") or {}), **{k: v for k, v in overrides.items() if k != "init_args"}}
        init_args = {k: v for k, v in recorded.items() if not k.startswith("_")} | changed
        datamodule_class({"_class_path": recorded["_class_path"], **init_args}, f"{where} with base.init_args")
        return {"class_path": recorded["_class_path"], "init_args": init_args}

    @property
    def base(self) -> ClinicalDataModule:
        """The base datamodule, built on first use with its own settings and defaults (see
        :func:`mmclin.checkpoints.own_hyperparameters`)."""
        if self._base is None:
            spec = dict(self.hparams.base)
            # `--data.init_args.base.init_args.X v` on the command line arrives as base["X"], beside init_args
            init_args = {**(spec.pop("init_args", None) or {}),
                         **{k: v for k, v in spec.items() if k != "class_path"}}
            with own_hyperparameters():
                self._base = instantiate_class((), {"class_path": spec["class_path"], "init_args": init_args})
        return self._base

    @property
    def classnames(self) -> list[str] | None:
        return self.base.classnames

    @property
    def selection_metric(self) -> str | None:
        return self.base.selection_metric

    def connect(self, collator: Callable | None = None, transforms: tuple[Callable, Callable] | None = None,
                tokenizer: Callable | None = None, answerer: Callable | None = None) -> None:
        """As :meth:`ClinicalDataModule.connect`, for the base too: `answerer` (the supervised model's
        ``reference_answers``) makes the ``lesion_noise`` and ``own_answer`` pairs."""
        super().connect(collator, transforms, tokenizer, answerer)
        self.base.connect(collator, transforms, tokenizer)

    def study_item(self, path: str | os.PathLike, question: str | None = None,
                   choices: list[str] | None = None) -> dict:
        """A study of a user's, read by the base."""
        return self.base.study_item(path, question, choices)

    def study_items(self, path: str | os.PathLike, question: str | None = None,
                    choices: list[str] | None = None) -> list[dict]:
        """A study of a user's, read by the base (several samples where the base splits it)."""
        return self.base.study_items(path, question, choices)

    def prepare_data(self) -> None:
        self.base.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.base.trainer = self.trainer
        self.base.setup("fit" if stage in (None, "fit") else stage)
        if stage in (None, "fit"):
            train = self.base.datasets["train"]
            self.index = {study_key(train[i]): i for i in range(len(train))}
            if self.hparams.pairs and not self._pairs:  # a pair file is checked before anything trains
                self._pairs = self._read_pairs(Path(self.hparams.pairs))

    @property
    def train_pairs(self) -> list[Pair]:
        """The training pairs, built (or read from ``pairs``) on first use: after the model's ``setup`` connected
        its answers, which some kinds need; written to the run's ``pairs.jsonl``."""
        if self._pairs:
            return self._pairs
        train = self.base.datasets["train"]
        if self.hparams.pairs:
            self._pairs = self._read_pairs(Path(self.hparams.pairs))
        else:
            self._pairs = self.build_pairs(train)
            if self.trainer is not None and self.trainer.is_global_zero:
                path = Path(run_dir(self.trainer)) / "pairs.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("".join(json.dumps(p.to_json()) + "\n" for p in self._pairs), encoding="utf-8")
                log.info("wrote %d pairs to %s", len(self._pairs), path)
        counts = Counter(p.kind for p in self._pairs)
        log.info("preference pairs by kind: %s; skipped: %s", dict(counts), dict(self.skipped))
        if not self._pairs:
            raise DataError("no preference pairs: no kind applies to the training split (kinds: "
                            f"{self.hparams.kinds or 'all'}; skipped: {dict(self.skipped)})")
        return self._pairs

    # -- building ------------------------------------------------------------------------------------------
    def build_pairs(self, train: Dataset) -> list[Pair]:
        """Pairs for every training study (see the module docstring); lesion-noise and own-answer pairs need the
        model."""
        h = self.hparams
        rng = np.random.default_rng(h.seed)
        kinds = set(h.kinds or set(KINDS) - set(BY_NAME))
        pairs = []
        samples = [train[i] for i in range(len(train))]
        reports = [s["answer"] for s in samples if not s.get("choices")]
        by_question: dict[str, list[tuple[str, str]]] = {}  # the same question -> (study, its answer)
        for sample in samples:
            by_question.setdefault(sample["question"].strip().lower(), []).append((study_key(sample), sample["answer"]))
        for i, sample in enumerate(samples):
            study, answer, choices = study_key(sample), sample["answer"], list(sample.get("choices") or [])
            candidates = []
            if choices and "wrong_option" in kinds:
                candidates += [("wrong_option", r) for r in wrong_option_pairs(answer, choices, rng, h.pairs_per_study)]
            elif not choices:
                candidates += inject_fundus_errors(answer, rng, [k for k in INJECTED if k in kinds])
                other = other_study_report(answer, reports, rng) if "other_study" in kinds else None
                if other is not None:
                    candidates.append(("other_study", other))
            if len(candidates) > h.pairs_per_study:
                candidates = [candidates[j] for j in rng.choice(len(candidates), h.pairs_per_study, replace=False)]
            pairs += [Pair(study, sample["question"], answer, rejected, kind,
                           clinical_weight(answer, rejected, choices or None)) for kind, rejected in candidates]
            if "noised_input" in kinds:
                if not self.has_lesion_region(sample, i):
                    self.skipped["noised_input_no_lesion"] += 1
                else:
                    pairs.append(Pair(study, sample["question"], answer, answer, "noised_input", 1.0))
            if "other_input" in kinds:
                other = other_input_study(answer, by_question[sample["question"].strip().lower()], rng,
                                          choices or None)
                if other is None:
                    self.skipped["other_input_none_different"] += 1
                else:
                    pairs.append(Pair(study, sample["question"], answer, answer, "other_input", other[1], other[0]))
        for kind in ("lesion_noise", "own_answer"):
            if kind in kinds:
                pairs += self._model_answer_pairs(samples, kind)
        return pairs

    def _model_answer_pairs(self, train: list[dict], kind: str) -> list[Pair]:
        """The supervised model's answers where they differ clinically from the reference (else skipped:
        ``<kind>_same_content``, or ``<kind>_empty`` for an empty answer).

        ``lesion_noise``: with the evidence noised away, its report of a photograph with noise inside the lesion
        boxes (the base's ``lesion_masks``), or for records the data localises nothing in (ECG) its answer about
        the record with noise over the whole of it; a closed question's answer is the choice it ranks first, an
        open one's its generation. ``own_answer``: its generation given the unaltered input, kept for a closed
        question when it does not state the right choice (a wrong one, or none of them)."""
        if self.answerer is None:
            self.skipped[f"{kind}_unavailable"] += len(train)
            return []
        samples = train
        if kind == "lesion_noise":
            generator = torch.Generator().manual_seed(self.hparams.seed)
            samples = []
            for i, sample in enumerate(train):  # the split's samples, already read by build_pairs
                noised = self.noised(sample, i, generator)
                if noised is None:
                    self.skipped["lesion_noise_no_lesion"] += 1
                    continue
                samples.append({**sample, next(k for k in MEDIA_KEYS if k in sample): noised})
        pairs = []
        for start in range(0, len(samples), 32):
            chunk = samples[start:start + 32]
            for sample, answered in zip(chunk, self.answerer(chunk, generate=kind == "own_answer")):
                answered = (answered or "").strip()
                if not answered:  # nothing to prefer the reference to (a pair file refuses an empty side)
                    self.skipped[f"{kind}_empty"] += 1
                    continue
                choices = list(sample.get("choices") or []) or None
                weight = clinical_weight(sample["answer"], answered, choices)
                if answered.lower() == sample["answer"].strip().lower() \
                        or (choices is None and weight <= WORDING_WEIGHT) \
                        or (choices is not None and parse_choice(answered, choices) == sample["answer"]):
                    self.skipped[f"{kind}_same_content"] += 1
                    continue
                pairs.append(Pair(study_key(sample), sample["question"], sample["answer"], answered, kind, weight))
        return pairs

    def _lesion_mask(self, index: int) -> torch.Tensor | None:
        """Training sample `index`'s lesion mask (the base's ``lesion_masks``, read once), or None where the base
        localises no lesions."""
        if self._masks is None:
            self._masks = self.base.lesion_masks("train", self.hparams.lesion_classes)
        return None if self._masks is None else self._masks[index]

    def has_lesion_region(self, sample: dict, index: int) -> bool:
        """Whether :meth:`noised` has a region to noise in training sample `index`."""
        mask = self._lesion_mask(index)
        return bool(mask.any()) if mask is not None else "series" in sample

    def noised(self, sample: dict, index: int, generator: torch.Generator) -> list[torch.Tensor] | None:
        """The media of training sample `index` with the evidence noised: Gaussian noise inside its lesion boxes
        (the base's ``lesion_masks``), or over the whole of each record where the data localises none (ECG);
        None when there is no region (no lesion in the photograph, or an image without lesion localisation)."""
        if not self.has_lesion_region(sample, index):
            return None
        key = next(k for k in MEDIA_KEYS if k in sample)
        mask, sigma = self._lesion_mask(index), self.hparams.noise_sigma
        if mask is not None:
            return [noise_region(sample[key][0], mask, generator, sigma)]
        return [noise_record(x, generator, sigma) for x in sample[key]]

    def _read_pairs(self, path: Path) -> list[Pair]:
        if not path.is_file():
            raise DataError(f"{path}: pair file not found")
        pairs = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pair = Pair(**{k: row[k] for k in ("study", "prompt", "chosen", "rejected", "kind")},
                            weight=float(row.get("weight", 1.0)), rejected_study=row.get("rejected_study"))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise DataError(f"{path} line {number}: not a pair ({err}); expected study, prompt, chosen, rejected, "
                                "kind and weight") from None
            problem = None
            if not (math.isfinite(pair.weight) and pair.weight > 0):  # DPO would push the pair the wrong way, or NaN
                problem = f"the weight is not a finite number > 0 ({row.get('weight')!r})"
            elif str(pair.study) not in self.index:
                problem = f"study {pair.study!r} is not in the data's training split"
            elif not str(pair.rejected).strip():
                problem = "the rejected answer is empty"
            elif pair.kind == "other_input" and str(pair.rejected_study) not in self.index:
                problem = f"rejected_study {pair.rejected_study!r} is not in the data's training split"
            elif str(pair.chosen).strip() == str(pair.rejected).strip() and pair.kind not in CONDITIONAL:
                problem = "chosen and rejected are the same text"
            if problem:
                if self.hparams.on_bad_pair == "raise":
                    raise DataError(f"{path} line {number}: {problem} (on_bad_pair: skip drops such pairs)")
                self.skipped[problem.split(" (")[0].split("'")[0].strip()] += 1
                continue
            pairs.append(pair)
        if self.skipped:
            log.warning("%s: skipped %d pair(s): %s", path, sum(self.skipped.values()), dict(self.skipped))
        return pairs

    # -- loaders ---------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        pairs = self.train_pairs
        dataset = PairDataset(self.base.datasets["train"], self.index, pairs, self.noised, self.hparams.seed)
        return split_loader(dataset, True, self.trainer, self.hparams, collate_fn=self.required_collator())

    def val_dataloader(self) -> DataLoader:
        return self.base.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.base.test_dataloader()

    def baselines(self, split: str) -> dict[str, float]:
        return self.base.baselines(split)
