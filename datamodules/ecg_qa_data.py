"""ECG-QA over PTB-XL as a LightningDataModule: questions from ECG-QA JSON, signals from the PTB-XL tree."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.ecg import STANDARD_LEADS, ptbxl_record_path, read_ptbxl_database, read_wfdb_record
from datamodules.ecg_qa import read_ecg_qa
from datamodules.series_length import WindowedStudies, check_duration_settings, fit_dataset_record, fit_duration
from datamodules.synthetic.cache import demo_cache_dir
from datamodules.synthetic.ecg import generate_ecg_demo
from mmclin.contracts import QADataModule
from mmclin.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class ECGQADataset(Dataset):
    """Yields QA samples ``{"series": [(12, L) mV per ECG], "question", "answer", "choices", "meta"}``."""

    def __init__(self, table: pd.DataFrame, signals: dict[int, np.ndarray]):
        self.table = table.reset_index(drop=True)
        self.signals = signals

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict:
        row = self.table.iloc[i]
        answers = list(row["answer"])
        return {
            "series": [torch.from_numpy(self.signals[e]) for e in row["ecg_ids"]],
            "question": row["question"],
            # Multi-answer questions are scored as the sorted, comma-joined answer set.
            "answer": answers[0] if len(answers) == 1 else ", ".join(sorted(answers)),
            "choices": list(row["choices"] or []),
            "meta": {"sample_id": int(row["sample_id"]), "template_id": int(row["template_id"]),
                     "question_type": row["question_type"], "ecg_ids": [int(e) for e in row["ecg_ids"]]},
        }


class ECGQADataModule(WindowedStudies, QADataModule):
    """ECG-QA (Oh et al., NeurIPS 2023) questions on PTB-XL (Wagner et al., Sci Data 2020) ECGs.

    With ``root`` unset a demo PTB-XL tree with ECG-QA-layout questions is generated once into the cache
    (``$MMCLIN_CACHE`` or ``~/.cache/mmclin``). Splits are ECG-QA's (train / valid / test, i.e. PTB-XL folds
    1-8 / 9 / 10). Signals are read once with wfdb, in mV, in the order of `leads`, and kept in memory. Every
    record, of the dataset or to predict, meets ``duration_s`` through ``duration_policy``
    (:mod:`datamodules.series_length`).
    """

    def __init__(
        self,
        root: str | None = None,
        ptbxl_root: str | None = None,
        qa_dir: str = "ecgqa/ptbxl",
        version: Literal["paraphrased", "template"] = "paraphrased",
        sampling_rate: Literal[100, 500] = 100,
        leads: list[str] | None = None,
        duration_s: float | None = 10.0,
        duration_policy: Literal["refuse", "crop", "window", "pad"] = "refuse",
        crop_at: Literal["start", "centre"] = "start",
        question_types: list[str] | None = None,
        on_missing: Literal["error", "skip"] = "error",
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        demo_records: int = 600,
        cache_dir: str | None = None,
        predict: str | None = None,
    ):
        """
        Args:
            root: directory holding ``qa_dir`` (and, unless `ptbxl_root` is given, the PTB-XL tree); unset = demo.
            ptbxl_root: PTB-XL directory (``ptbxl_database.csv``, ``scp_statements.csv``, ``records100/500``).
            qa_dir: ECG-QA folder relative to `root`.
            version: ECG-QA question wording: ``paraphrased`` or ``template``.
            sampling_rate: PTB-XL record set: 100 Hz (``records100``) or 500 Hz (``records500``).
            leads: lead names in model order (default the 12 standard leads).
            duration_s: duration of the records the model takes, s (PTB-XL's 10 s); None takes any duration.
            duration_policy: a record of another duration: ``refuse`` (DataError), ``crop`` a longer one to
                `duration_s`, ``window`` a longer study to predict into `duration_s` windows (one prediction each),
                ``pad`` a shorter one (of at least half `duration_s`) with zeros; see :mod:`datamodules.series_length`.
            crop_at: where ``crop`` takes its window: the ``start`` or the ``centre`` of the record.
            question_types: keep only these ECG-QA question types (e.g. ``[single-verify]``).
            on_missing: a question whose ECG is not in the database: ``error`` or ``skip`` (counted).
            batch_size: training batch size.
            eval_batch_size: validation/test batch size (default: batch_size).
            num_workers: DataLoader workers.
            demo_records: demo size (ECGs).
            cache_dir: demo location (default ``$MMCLIN_CACHE`` or ``~/.cache/mmclin``).
            predict: studies for ``lightning predict`` instead of the test split: a JSONL of ``{"input", "question",
                "choices"}`` rows (question and choices for QA models), a text file of paths, or one path.
        """
        super().__init__()
        check_duration_settings(duration_s, duration_policy, crop_at)
        self.save_hyperparameters()
        self.demo = root is None
        self.datasets: dict[str, ECGQADataset] = {}
        self.n_skipped = 0

    @property
    def root(self) -> Path:
        if self.demo:
            return demo_cache_dir(self.hparams.cache_dir) / f"ecg-demo-v1-n{self.hparams.demo_records}"
        return Path(self.hparams.root)

    @property
    def ptbxl_root(self) -> Path:
        return Path(self.hparams.ptbxl_root) if self.hparams.ptbxl_root else self.root

    def prepare_data(self) -> None:
        if self.demo:
            generate_ecg_demo(self.root, n_records=self.hparams.demo_records, seed=0)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets or (stage == "predict" and self.hparams.predict):  # (the listed records only)
            return
        h = self.hparams
        self.prepare_data()
        database = read_ptbxl_database(self.ptbxl_root / "ptbxl_database.csv", self.ptbxl_root / "scp_statements.csv")
        table = read_ecg_qa(self.root / h.qa_dir, database, version=h.version, on_missing=h.on_missing)
        self.n_skipped = int(table.attrs.get("n_skipped_missing_ecg", 0))
        if h.question_types:
            table = table[table["question_type"].isin(h.question_types)]
        if table.empty:
            raise DataError(f"{self.root / h.qa_dir}: no questions left (question_types={h.question_types})")
        leads = h.leads or list(STANDARD_LEADS)
        signals = {}
        for ecg_id in sorted({e for ids in table["ecg_ids"] for e in ids}):
            path = ptbxl_record_path(self.ptbxl_root, ecg_id, database.loc[ecg_id], fs=h.sampling_rate)
            signal = read_wfdb_record(path, leads=leads, target_fs=h.sampling_rate).signal
            signals[ecg_id] = fit_dataset_record(signal, h.sampling_rate, h.duration_s, h.duration_policy, str(path),
                                                 h.crop_at)
        for split in ("train", "val", "test"):
            self.datasets[split] = ECGQADataset(table[table["split"] == split], signals)
        log.info("ECG-QA %s: %s questions, %d ECGs, %d skipped (ECG not in the database)", self.root,
                 {k: len(v) for k, v in self.datasets.items()}, len(signals), self.n_skipped)

    def study_items(self, path: str | os.PathLike, question: str | None = None,
                    choices: list[str] | None = None) -> list[dict]:
        """One WFDB record of a user's (``path`` without extension, or its ``.hea``) and a question, as the model
        was trained to take it: the model's leads in its order, resampled to its `sampling_rate`, fitted to its
        `duration_s` by `duration_policy`. One sample, or under ``window`` one per window of a longer record
        (``meta.window`` of ``meta.n_windows``); each names the stretch of the record it holds, ``meta.span_s`` =
        [start, end] in s, and under ``pad`` the zeros after it, ``meta.padded_s``.

        Raises:
            DataError: the record is unreadable, lacks one of the model's leads, holds NaN, or has another
                duration than the policy takes.
        """
        if not question:
            raise ConfigError("an ECG-QA model answers a question about the record: give one (--question)")
        h = self.hparams
        record = str(path)[:-4] if str(path).endswith((".hea", ".dat")) else str(path)
        leads = h.leads or list(STANDARD_LEADS)
        try:
            signal = read_wfdb_record(record, leads=leads, target_fs=h.sampling_rate).signal
        except DataError as err:
            raise DataError(f"{err}; the model takes the leads {leads}, resampled to {h.sampling_rate} Hz") from None
        windows = fit_duration(signal, h.sampling_rate, h.duration_s, h.duration_policy, record, h.crop_at)
        duration = signal.shape[-1] / h.sampling_rate
        items = []
        for k, (start, part) in enumerate(windows):
            end = min(start + part.shape[-1] / h.sampling_rate, duration)
            meta = {"record": record, "input": str(path), "span_s": [start, end]}
            if len(windows) > 1:
                meta |= {"window": k, "n_windows": len(windows)}
            if end - start < part.shape[-1] / h.sampling_rate:  # `pad`: zeros after the record's end
                meta["padded_s"] = part.shape[-1] / h.sampling_rate - (end - start)
            items.append({"series": [torch.from_numpy(part)], "question": question, "answer": "",
                          "choices": list(choices or []), "meta": meta})
        return items

    def baselines(self, split: str) -> dict[str, float]:
        """Accuracy on `split` of always giving each template's most frequent training answer."""
        train, other = self.datasets["train"].table, self.datasets[split].table
        key = train["answer"].map(lambda a: ", ".join(sorted(a)))
        top = key.groupby(train["template_id"]).agg(lambda s: s.value_counts().index[0])
        truth = other["answer"].map(lambda a: ", ".join(sorted(a)))
        return {"majority_answer_acc": float((other["template_id"].map(top) == truth).mean())}

    def _loader(self, split: str, train: bool) -> DataLoader:
        return self.model_batches(self.datasets[split], split, train, self.root, "questions")
