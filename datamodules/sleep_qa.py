"""Sleep staging as question answering: one 30-s PSG epoch (optionally with context) -> its AASM stage.

Reads every ``*-PSG.edf`` / ``*-Hypnogram.edf`` pair of a Sleep-EDF style folder with `datamodules.sleep`, or the
seeded demo (`datamodules.synthetic.sleep`) when ``root`` is unset. Splits are drawn by subject (the ``ss`` of
``SC4ssN``), so no subject's nights are on both sides.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.series_length import DURATION_TOLERANCE, MIN_PAD_SHARE
from datamodules.sleep import AASM_STAGES, pair_sleep_edf_files, read_psg, read_scored_psg
from datamodules.synthetic.cache import demo_cache_dir
from datamodules.synthetic.sleep import generate_sleep_demo
from mmclin.contracts import QADataModule
from mmclin.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_QUESTION = "Which sleep stage is this {epoch_s:g}-second epoch: W, N1, N2, N3 or R?"
CONTEXT_QUESTION = ("This recording spans {window_s:g} seconds. Which sleep stage is its middle {epoch_s:g}-second "
                    "epoch: W, N1, N2, N3 or R?")


@dataclass
class SleepNight:
    """One scored PSG held in memory."""

    signal: np.ndarray  # (C, L) float32, uV as in the EDF, at the datamodule's target_fs
    stages: np.ndarray  # (n_epochs,) int64, index into AASM_STAGES or -1, for the epochs kept in `signal`
    first_epoch: int  # file epoch of stages[0]: only the span of usable epochs (plus context) is kept
    subject: str  # "ss" of SC4ssN
    night: str  # "N" of SC4ssN
    record: str  # PSG file path


def subject_and_night(path: str | os.PathLike) -> tuple[str, str]:
    """``SC4011E0-PSG.edf`` -> ("01", "1"); other names give (first 6 characters, 7th character)."""
    name = Path(path).name
    if len(name) < 7:
        raise DataError(f"{path}: file name too short to hold a subject id (expected e.g. SC4ssNE0-PSG.edf)")
    return (name[3:5], name[5]) if name[:2] in ("SC", "ST") else (name[:6], name[6])


def split_subjects(subjects: Sequence[str], val: float | Sequence[str], test: float | Sequence[str],
                   seed: int) -> dict[str, str]:
    """Subject -> "train" | "val" | "test": explicit id lists, or seeded fractions of the subjects."""
    subjects = sorted(set(subjects))
    assign = dict.fromkeys(subjects, "train")
    order = [subjects[i] for i in np.random.default_rng(seed).permutation(len(subjects))]
    for split, chosen in (("test", test), ("val", val)):
        if isinstance(chosen, float | int):
            if not 0 <= chosen < 1:
                raise ConfigError(f"{split}_subjects as a fraction must be in [0, 1); got {chosen}")
            free = [s for s in order if assign[s] == "train"]
            chosen = free[:max(1, round(chosen * len(subjects))) if chosen > 0 else 0]
        unknown = sorted(set(chosen) - set(subjects))
        if unknown:
            raise DataError(f"{split}_subjects {unknown} not among the subjects found: {subjects}")
        taken = [s for s in chosen if assign[s] != "train"]
        if taken:
            raise ConfigError(f"subject(s) {taken} asked for both val and test")
        assign.update(dict.fromkeys(chosen, split))
    return assign


class SleepEpochQA(Dataset):
    """QA samples ``{"series": [(C, L)], "channels", "fs", "question", "answer", "choices", "label", "meta"}``.

    ``L = (2 * context_epochs + 1) * epoch_s * fs``; context past the recording's ends is zero-padded.
    """

    def __init__(self, nights: Sequence[SleepNight], index: np.ndarray, channels: Sequence[str], fs: float,
                 epoch_s: float, context_epochs: int, question: str):
        """
        Args:
            nights: the recordings.
            index: (N, 2) int rows of (night position in `nights`, epoch index).
            channels: channel names of every series.
            fs: sampling rate, Hz.
            epoch_s: epoch length, s.
            context_epochs: epochs of context on each side.
            question: question text.
        """
        self.nights, self.index = nights, index
        self.channels, self.fs, self.question = list(channels), fs, question
        self.epoch_len = round(epoch_s * fs)
        self.context = context_epochs

    def __len__(self) -> int:
        return len(self.index)

    def labels(self) -> np.ndarray:
        """(N,) stage index of every sample."""
        return np.array([self.nights[n].stages[e] for n, e in self.index], dtype=np.int64)

    def __getitem__(self, i: int) -> dict:
        n, epoch = (int(v) for v in self.index[i])
        night = self.nights[n]
        start, stop = (epoch - self.context) * self.epoch_len, (epoch + self.context + 1) * self.epoch_len
        series = np.zeros((night.signal.shape[0], stop - start), np.float32)
        lo, hi = max(start, 0), min(stop, night.signal.shape[1])
        series[:, lo - start:hi - start] = night.signal[:, lo:hi]
        label = int(night.stages[epoch])  # -1: unscored (a night to stage)
        return {
            "series": [torch.from_numpy(series)],
            "channels": self.channels,
            "fs": self.fs,
            "question": self.question,
            "answer": AASM_STAGES[label] if label >= 0 else "",
            "choices": list(AASM_STAGES),
            "label": label,
            "meta": {"subject": night.subject, "night": night.night, "epoch": night.first_epoch + epoch,
                     "record": night.record},
        }


class SleepQADataModule(QADataModule):
    """Sleep-stage QA over Sleep-EDF style PSG: every scored epoch asks for its AASM stage.

    Signals stay in the EDF's physical unit (uV for EEG/EOG): z-normalisation is the encoder's job
    (`PatchTransformerEncoder(normalize=True)`). Unscored ("Sleep stage ?"), movement and uncovered epochs are
    skipped and counted in `skipped` (or raise with ``on_unscored="error"``). Batches are made by the model's
    ``collator`` (`mmclin.tasks.qa.QACollator`).
    """

    selection_metric = "val/macro_f1_likelihood"

    def __init__(
        self,
        root: str | None = None,
        channels: Sequence[str] = ("EEG Fpz-Cz", "EEG Pz-Oz", "EOG horizontal"),
        target_fs: float = 100,
        epoch_s: float = 30,
        context_epochs: int = 0,
        val_subjects: float | list[str] = 0.2,
        test_subjects: float | list[str] = 0.2,
        seed: int = 0,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        on_unscored: Literal["skip", "error"] = "skip",
        duration_policy: Literal["window", "pad", "refuse"] = "window",
        trim_wake_min: float | None = 30.0,
        question: str | None = None,
        balance_train: bool = False,
        demo_subjects: int = 10,
        demo_hours: float = 2.0,
        cache_dir: str | None = None,
        predict: str | None = None,
    ):
        """
        Args:
            root: folder with ``*-PSG.edf`` / ``*-Hypnogram.edf`` pairs (searched recursively); unset = demo.
            channels: EDF channel labels read, in this order (case-insensitive).
            target_fs: every channel is resampled to this rate, Hz.
            epoch_s: scoring epoch length, s.
            context_epochs: neighbouring epochs on each side included in the series (the answer is the middle one).
            val_subjects: subject ids (``ss``) for validation, or a fraction of the subjects (seeded).
            test_subjects: subject ids for test, or a fraction of the subjects (seeded).
            seed: seed of the subject split.
            batch_size: training batch size per process.
            eval_batch_size: validation/test batch size (default: batch_size).
            num_workers: DataLoader worker processes.
            on_unscored: ``skip`` drops and counts unscored/movement epochs; ``error`` raises naming the file.
            duration_policy: a night to stage (:meth:`study_items`) is cut into `epoch_s` epochs from its start; its
                last part shorter than an epoch is, under ``window``, left unstaged (its length logged and in every
                row's ``meta.unstaged_s``), under ``pad`` zero-padded into a last epoch when it holds at least half
                of one (that row's ``meta.padded_s``), under ``refuse`` a DataError naming the file and its
                duration.
            trim_wake_min: keep only wake within this many minutes of the first/last sleep epoch (Sleep-EDF
                Sleep Cassette files span ~20 h, mostly wake; 30 min is the usual choice); None keeps all wake.
            question: question text; default asks for W, N1, N2, N3 or R (``{epoch_s}``/``{window_s}`` fill in).
            balance_train: draw training samples with inverse stage-frequency weights (with replacement).
            demo_subjects: demo size in subjects (one night each).
            demo_hours: demo night length, h.
            cache_dir: where the demo is generated (default ``$MMCLIN_CACHE`` or ``~/.cache/mmclin``).
            predict: nights for ``lightning predict`` instead of the test split: one EDF PSG, a ``.txt`` of paths or
                a ``.jsonl`` of ``{"input", "question"}``; every 30-s epoch of each night is staged
                (:meth:`study_items`; no hypnogram needed), its file under the row's ``meta.input``.
        """
        super().__init__()
        if isinstance(channels, str) or not channels:
            raise ConfigError(f"channels must be a non-empty list of EDF labels, got {channels!r}")
        if not isinstance(target_fs, (int, float)) or target_fs <= 0:  # samples of one epoch = epoch_s * target_fs
            raise ConfigError(f"target_fs={target_fs!r}: the datamodule resamples every channel to one rate, so it "
                              "needs a rate in Hz > 0 (e.g. 100, Sleep-EDF's EEG rate)")
        if epoch_s <= 0 or context_epochs < 0:
            raise ConfigError(f"need epoch_s > 0, context_epochs >= 0; got {epoch_s}, {context_epochs}")
        if on_unscored not in ("skip", "error"):
            raise ConfigError(f"on_unscored must be 'skip' or 'error', got {on_unscored!r}")
        if duration_policy not in ("window", "pad", "refuse"):
            raise ConfigError(f"duration_policy={duration_policy!r}: expected 'window', 'pad' or 'refuse'")
        self.save_hyperparameters()
        self.demo = root is None
        self.nights: list[SleepNight] = []
        self.skipped: Counter[str] = Counter()  # unscored / movement / gap / trimmed_wake -> epochs
        self.splits: dict[str, str] = {}  # subject -> split
        self.datasets: dict[str, SleepEpochQA] = {}

    @property
    def root(self) -> Path:
        if self.demo:
            h = self.hparams
            return demo_cache_dir(h.cache_dir) / f"sleep-edf-demo-v1-n{h.demo_subjects}-h{h.demo_hours:g}"
        return Path(self.hparams.root)

    @property
    def classnames(self) -> list[str]:
        """The answer choices, AASM stages in label order."""
        return list(AASM_STAGES)

    choices = classnames

    @property
    def question(self) -> str:
        h = self.hparams
        window_s = (2 * h.context_epochs + 1) * h.epoch_s
        template = h.question or (CONTEXT_QUESTION if h.context_epochs else DEFAULT_QUESTION)
        return template.format(epoch_s=h.epoch_s, window_s=window_s)

    def prepare_data(self) -> None:
        if self.demo:
            generate_sleep_demo(self.root, self.hparams.demo_subjects, hours=self.hparams.demo_hours, seed=0)

    def _read(self) -> None:
        h = self.hparams
        pairs, unpaired = pair_sleep_edf_files(self.root)
        if unpaired:
            log.warning("%s: %d file(s) without a PSG/hypnogram partner skipped: %s", self.root, len(unpaired),
                        [p.name for p in unpaired])
        if not pairs:
            raise DataError(f"{self.root}: no *-PSG.edf / *-Hypnogram.edf pairs found")
        self.nights, self.skipped = [], Counter()
        for psg_path, hyp_path in pairs:
            record, stages, summary = read_scored_psg(psg_path, hyp_path, h.channels, h.target_fs, h.epoch_s)
            bad = {"unscored": summary.n_unscored, "movement": summary.n_movement, "gap": summary.n_gap}
            if h.on_unscored == "error" and any(bad.values()):
                raise DataError(f"{hyp_path}: {bad} epochs without an AASM stage (set on_unscored: skip)")
            self.skipped.update(bad)
            stages = stages.copy()
            sleep = np.flatnonzero(stages > 0)
            if h.trim_wake_min is not None and len(sleep):
                margin = round(h.trim_wake_min * 60 / h.epoch_s)
                outside = np.ones(len(stages), bool)
                outside[max(sleep[0] - margin, 0):sleep[-1] + margin + 1] = False
                self.skipped["trimmed_wake"] += int((outside & (stages == 0)).sum())
                stages[outside] = -1
            kept = np.flatnonzero(stages >= 0)
            if not len(kept):
                log.warning("%s: no scored epochs; night skipped", hyp_path)
                continue
            # hold only the usable span in memory (Sleep Cassette nights are ~20 h, mostly trimmed wake)
            lo, hi = max(kept[0] - h.context_epochs, 0), min(kept[-1] + h.context_epochs + 1, len(stages))
            epoch_len = round(h.epoch_s * h.target_fs)
            signal = np.ascontiguousarray(record.signal[:, lo * epoch_len:hi * epoch_len])
            subject, night = subject_and_night(psg_path)
            self.nights.append(SleepNight(signal, stages[lo:hi], int(lo), subject, night, str(psg_path)))
        if not self.nights:
            raise DataError(f"{self.root}: no night has a scored epoch")

    def setup(self, stage: str | None = None) -> None:
        if self.datasets or (stage == "predict" and self.hparams.predict):  # the listed nights only
            return
        h = self.hparams
        if self.demo:
            self.prepare_data()
        self._read()
        self.splits = split_subjects([n.subject for n in self.nights], h.val_subjects, h.test_subjects, h.seed)
        for split in ("train", "val", "test"):
            index = np.array([(i, e) for i, n in enumerate(self.nights) if self.splits[n.subject] == split
                              for e in np.flatnonzero(n.stages >= 0)], dtype=np.int64).reshape(-1, 2)
            self.datasets[split] = SleepEpochQA(self.nights, index, h.channels, float(h.target_fs), h.epoch_s,
                                                h.context_epochs, self.question)
        log.info("%s: epochs per split %s; skipped %s", self.root, {k: len(v) for k, v in self.datasets.items()},
                 dict(self.skipped))

    def baselines(self, split: str) -> dict[str, float]:
        """Accuracy and macro-F1 on `split` of always answering the training split's most frequent stage."""
        from mmclin.metrics.f1 import macro_f1

        train = self.stage_counts("train")
        majority = max(train, key=train.get)
        truth = [AASM_STAGES[i] for i in self.datasets[split].labels()]
        return {"majority_stage_acc": sum(t == majority for t in truth) / len(truth),
                "majority_stage_macro_f1": macro_f1(truth, [majority] * len(truth))}

    def stage_counts(self, split: str) -> dict[str, int]:
        """Epochs per AASM stage in a split (after `setup`)."""
        counts = np.bincount(self.datasets[split].labels(), minlength=len(AASM_STAGES))
        return dict(zip(AASM_STAGES, counts.tolist()))

    def study_items(self, path: str | os.PathLike, question: str | None = None,
                    choices: list[str] | None = None) -> list[dict]:
        """A whole night of a user's (an EDF PSG, no hypnogram needed) as one QA sample per 30-s epoch, with the
        model's channels resampled to its rate and its context: predicting them stages the night. Its last part
        shorter than an epoch follows `duration_policy`.

        Raises:
            DataError: the file is unreadable, lacks one of the model's channels, or is shorter than an epoch (under
                ``pad``, than half of one), or (``refuse``) is not a whole number of epochs.
        """
        h = self.hparams
        try:
            record = read_psg(path, h.channels, h.target_fs)
        except DataError as err:
            raise DataError(f"{err}; the model takes the channels {list(h.channels)} at {h.target_fs} Hz") from None
        signal, unstaged_s, padded_s = self._whole_epochs(record.signal, path)
        n = signal.shape[1] // round(h.epoch_s * h.target_fs)
        night = SleepNight(signal, np.full(n, -1, np.int64), 0, Path(path).stem, "", str(path))
        epochs = SleepEpochQA([night], np.array([(0, e) for e in range(n)], dtype=np.int64), h.channels,
                              float(h.target_fs), h.epoch_s, h.context_epochs, question or self.question)
        items = [epochs[i] for i in range(n)]
        for item in items:
            item["meta"] |= {"input": str(path), "unstaged_s": unstaged_s}
        if padded_s:
            items[-1]["meta"]["padded_s"] = padded_s
        return items

    def _whole_epochs(self, signal: np.ndarray, path) -> tuple[np.ndarray, float, float]:
        """`signal` (C, L) cut (or, under ``pad``, padded) to whole epochs; the seconds left unstaged and padded."""
        h = self.hparams
        epoch_len = round(h.epoch_s * h.target_fs)
        n, tail = divmod(signal.shape[1], epoch_len)
        if tail <= DURATION_TOLERANCE * epoch_len:  # a sample or two of rounding: not a part of an epoch
            tail = 0
        duration = f"{path}: {signal.shape[1] / h.target_fs:.1f} s"
        if tail and h.duration_policy == "refuse":
            raise DataError(f"{duration}, not a whole number of {h.epoch_s:g}-s epochs ({tail / h.target_fs:.1f} s "
                            "over; duration_policy 'window' leaves that part unstaged, 'pad' pads it)")
        if tail and h.duration_policy == "pad" and tail >= MIN_PAD_SHARE * epoch_len:
            return np.pad(signal, [(0, 0), (0, epoch_len - tail)]), 0.0, (epoch_len - tail) / h.target_fs
        if n == 0:
            raise DataError(f"{duration}, shorter than one {h.epoch_s:g}-s epoch"
                            + (" (duration_policy 'pad' pads half an epoch or more)" if h.duration_policy == "pad"
                               else ""))
        if tail:
            log.warning("%s: its last %.1f s, shorter than one %g-s epoch, are not staged", path, tail / h.target_fs,
                        h.epoch_s)
        return signal[:, :n * epoch_len], tail / h.target_fs, 0.0

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = self.datasets.get(split)
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        weights = None
        if train and self.hparams.balance_train:
            labels = dataset.labels()
            weights = 1.0 / np.bincount(labels, minlength=len(AASM_STAGES))[labels]
        return self.model_batches(dataset, split, train, self.root, "scored epochs", weights)
