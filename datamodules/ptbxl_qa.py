"""Verify questions on every PTB-XL record, from its SCP codes: ECG-QA's single-verify templates at PTB-XL scale.

ECG-QA (Oh et al., NeurIPS 2023) asks "Does this ECG show symptoms of <statement>?" of PTB-XL records; its release
covers only some records with some statements. Here every record of a PTB-XL tree (Wagner et al., Sci Data 2020) is
asked the same questions: one per diagnostic superclass (NORM, MI, STTC, CD, HYP; the PTB-XL benchmark's task,
Strodthoff et al., IEEE JBHI 2021) and one per listed SCP statement, answered "yes" or "no" from the record's
``scp_codes``. So a model's answers give, per question, a balanced accuracy and the AUROC of p("yes"), and over the
superclasses the benchmark's macro AUROC.

Likelihood rule: a statement counts as present when the record lists it with a likelihood of at least
``min_likelihood`` %; PTB-XL gives likelihoods for diagnostic statements only (form and rhythm statements carry 0),
so those count whenever listed. The default 0 counts every listed statement, as PTB-XL's example code and the
benchmark aggregate the superclasses. A superclass is present when any of its present diagnostic statements
belongs to it (``diagnostic_class`` in ``scp_statements.csv``).

Splits are PTB-XL's ``strat_fold``s (default 1-8 train, 9 val, 10 test); ``test_folds: all`` makes every record of
a tree a test record, for a trained model scored on another PTB-XL tree.
"""

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
from datamodules.series_length import WindowedStudies, check_duration_settings, fit_dataset_record
from datamodules.synthetic.cache import demo_cache_dir
from datamodules.synthetic.ecg import generate_ecg_demo
from mmclin.contracts import QADataModule
from mmclin.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# PTB-XL diagnostic superclasses, named as ECG-QA names them (answers_for_each_template.csv, template 3).
SUPERCLASS_NAMES = {"NORM": "normal ecg", "MI": "myocardial infarction", "STTC": "st/t change",
                    "CD": "conduction disturbance", "HYP": "hypertrophy"}
# SCP statements listed in 10 or more of PTB-XL ecg_id 1-500 (and among the most frequent of all of PTB-XL), with
# their description and kind as PTB-XL's scp_statements.csv gives them; a tree whose statements file lacks one (the
# demo writes only the rows it uses) still asks the same questions, so a model is asked the same on any tree.
DEFAULT_STATEMENTS = {
    "SR": ("sinus rhythm", "rhythm"), "NDT": ("non-diagnostic T abnormalities", "diagnostic"),
    "IMI": ("inferior myocardial infarction", "diagnostic"), "LVH": ("left ventricular hypertrophy", "diagnostic"),
    "ASMI": ("anteroseptal myocardial infarction", "diagnostic"),
    "LAFB": ("left anterior fascicular block", "diagnostic"), "SARRH": ("sinus arrhythmia", "rhythm"),
    "ISC_": ("non-specific ischemic", "diagnostic"), "ABQRS": ("abnormal QRS", "form"),
    "STD_": ("non-specific ST depression", "form"), "IRBBB": ("incomplete right bundle branch block", "diagnostic"),
    "NST_": ("non-specific ST changes", "diagnostic"), "PVC": ("ventricular premature complex", "form"),
    "AFIB": ("atrial fibrillation", "rhythm"), "NT_": ("non-specific T-wave changes", "form"),
    "VCLVH": ("voltage criteria (QRS) for left ventricular hypertrophy", "form"),
    "1AVB": ("first degree AV block", "diagnostic"), "LOWT": ("low amplitude T-waves", "form"),
    "QWAVE": ("Q waves present", "form"),
}
CHOICES = ["no", "yes"]


def verify_question(name: str, kind: Literal["superclass", "diagnostic", "form", "rhythm"]) -> str:
    """The ECG-QA single-verify wording for one attribute (its templates: "is this a normal ecg", "does this ecg
    show symptoms of <scp code>", "does this ecg show <rhythm>")."""
    if name == "normal ecg":
        return "Is this a normal ECG?"
    if kind == "rhythm":
        return f"Does this ECG show {name}?"
    return f"Does this ECG show symptoms of {name}?"


def ptbxl_attributes(statements_csv: str | Path, codes: list[str]) -> pd.DataFrame:
    """The attributes asked about: the five superclasses, then `codes`; columns ``code``, ``name``, ``kind``
    (superclass|diagnostic|form|rhythm), ``group`` (superclass|statement), ``question``.

    Raises:
        DataError: a code absent from ``scp_statements.csv``.
    """
    statements = pd.read_csv(statements_csv, index_col=0)
    unknown = [c for c in codes if c not in statements.index and c not in DEFAULT_STATEMENTS]
    if unknown:
        raise DataError(f"{statements_csv}: SCP code(s) {unknown} not listed; statements asked about must be PTB-XL "
                        "SCP codes")
    rows = [(code, name, "superclass", "superclass") for code, name in SUPERCLASS_NAMES.items()]
    for code in codes:
        if code in statements.index:
            row = statements.loc[code]
            kind = "rhythm" if row.get("rhythm") == 1 else "diagnostic" if row.get("diagnostic") == 1 else "form"
            description = str(row["description"])
        else:
            description, kind = DEFAULT_STATEMENTS[code]
        rows.append((code, description.lower().replace("digitalis-effect", "digitalis effect"), kind, "statement"))
    table = pd.DataFrame(rows, columns=["code", "name", "kind", "group"])
    table["question"] = [verify_question(n, k) for n, k in zip(table["name"], table["kind"])]
    return table


def present_labels(database: pd.DataFrame, statements_csv: str | Path, attributes: pd.DataFrame,
                   min_likelihood: float = 0.0) -> np.ndarray:
    """(records, attributes) 0/1 matrix: which attributes each record of `database` shows, by the likelihood rule
    of this module's docstring."""
    statements = pd.read_csv(statements_csv, index_col=0)
    diagnostic = statements["diagnostic"] == 1
    superclass = statements.loc[diagnostic, "diagnostic_class"].to_dict()
    labels = np.zeros((len(database), len(attributes)), dtype=np.float32)
    column = {(g, c): j for j, (g, c) in enumerate(zip(attributes["group"], attributes["code"]))}
    for i, codes in enumerate(database["scp_codes"]):
        present = {c for c, likelihood in codes.items()
                   if not diagnostic.get(c, False) or float(likelihood) >= min_likelihood}
        for code in present:
            if ("statement", code) in column:
                labels[i, column["statement", code]] = 1
            if code in superclass and ("superclass", superclass[code]) in column:
                labels[i, column["superclass", superclass[code]]] = 1
    return labels


class PTBXLQADataset(Dataset):
    """One record and one question per item: ``{"series": [(12, L) mV], "series_targets": [(A,)], "question",
    "answer", "choices", "meta"}``; the targets are every attribute of the record (the encoder's auxiliary
    supervision, in ``aux_classes`` order)."""

    def __init__(self, table: pd.DataFrame, signals: dict[int, np.ndarray], labels: dict[int, np.ndarray]):
        self.table = table.reset_index(drop=True)
        self.signals, self.labels = signals, labels

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict:
        row = self.table.iloc[i]
        ecg_id = int(row["ecg_id"])
        return {"series": [torch.from_numpy(self.signals[ecg_id])],
                "series_targets": [torch.from_numpy(self.labels[ecg_id])],
                "question": row["question"], "answer": row["answer"], "choices": list(row["choices"]),
                "meta": {"ecg_id": ecg_id, "attribute": row["attribute"], "group": row["group"],
                         "source": row["source"]}}


class PTBXLQADataModule(WindowedStudies, QADataModule):
    """Yes/no questions on the superclasses and frequent statements of every record of a PTB-XL tree.

    With ``root`` unset the demo PTB-XL tree (``datamodules.synthetic.ecg``) is generated once into the cache.
    """

    selection_metric = "val/superclass_macro_auroc"

    def __init__(
        self,
        root: str | None = None,
        sampling_rate: Literal[100, 500] = 100,
        leads: list[str] | None = None,
        duration_s: float | None = 10.0,
        duration_policy: Literal["refuse", "crop", "window", "pad"] = "refuse",
        crop_at: Literal["start", "centre"] = "start",
        statements: list[str] | None = None,
        min_likelihood: float = 0.0,
        train_folds: list[int] | None = None,
        val_folds: list[int] | None = None,
        test_folds: list[int] | Literal["all"] | None = None,
        ecgqa: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        demo_records: int = 600,
        cache_dir: str | None = None,
        predict: str | None = None,
    ):
        """
        Args:
            root: a PTB-XL tree (``ptbxl_database.csv``, ``scp_statements.csv``, ``records100/``/``records500/``);
                unset = the generated demo tree.
            sampling_rate: the model's rate, 100 or 500 Hz: the record set read (at 100 Hz, a tree with only 500 Hz
                records is read from those, resampled).
            leads: lead names in model order (default the 12 standard leads).
            duration_s: duration of the records the model takes, s (PTB-XL's 10 s); None takes any duration.
            duration_policy: a record of another duration: ``refuse``, ``crop``, ``window`` (studies to predict) or
                ``pad`` (see ``ECGQADataModule`` and :mod:`datamodules.series_length`).
            crop_at: where ``crop`` takes its window: the ``start`` or the ``centre`` of the record.
            statements: SCP codes asked about besides the five superclasses (default :data:`DEFAULT_STATEMENTS`).
                Their names are the model's ``aux_classes`` after the superclasses' (see the config).
            min_likelihood: a diagnostic statement counts when listed with at least this likelihood (%).
            train_folds: ``strat_fold`` values of the training records (default 1-8).
            val_folds: of the validation records (default 9).
            test_folds: of the test records (default 10); ``all``: every record of the tree is a test record and
                none trains (``lightning test`` of a trained model on another tree).
            ecgqa: an ECG-QA folder (``ecgqa/ptbxl``-style, e.g. ``.../ecgqa_ptbxl_1-500/ecgqa/ptbxl``) whose
                single-ECG questions on records of this tree are added, each in its record's split (comparison
                questions on two records are left out and counted).
            batch_size: training batch size.
            eval_batch_size: validation/test batch size (default: batch_size).
            num_workers: DataLoader workers.
            demo_records: demo size (ECGs).
            cache_dir: demo location (default ``$MMCLIN_CACHE`` or ``~/.cache/mmclin``).
            predict: studies for ``lightning predict`` instead of the test split (see ``ECGQADataModule``).
        """
        super().__init__()
        check_duration_settings(duration_s, duration_policy, crop_at)
        if sampling_rate not in (100, 500):
            raise ConfigError(f"sampling_rate: PTB-XL ships 100 and 500 Hz records, got {sampling_rate}")
        if not 0 <= min_likelihood <= 100:
            raise ConfigError(f"min_likelihood is a percentage in [0, 100], got {min_likelihood}")
        folds = [train_folds, val_folds] + ([] if test_folds == "all" else [test_folds])
        if any(f is not None and (not f or any(not 1 <= int(x) <= 10 for x in f)) for f in folds):
            raise ConfigError(f"folds are lists of PTB-XL strat_fold values 1-10 (or test_folds: all); got train "
                              f"{train_folds}, val {val_folds}, test {test_folds}")
        self.save_hyperparameters()
        self.demo = root is None
        self.datasets: dict[str, PTBXLQADataset] = {}
        self.n_skipped_ecgqa = 0
        self._attributes: pd.DataFrame | None = None

    @property
    def root(self) -> Path:
        if self.demo:
            return demo_cache_dir(self.hparams.cache_dir) / f"ecg-demo-v1-n{self.hparams.demo_records}"
        return Path(self.hparams.root)

    def prepare_data(self) -> None:
        if self.demo:
            generate_ecg_demo(self.root, n_records=self.hparams.demo_records, seed=0)

    @property
    def attributes(self) -> pd.DataFrame:
        """The attributes asked about (:func:`ptbxl_attributes`)."""
        if self._attributes is None:
            self.prepare_data()
            codes = list(DEFAULT_STATEMENTS) if self.hparams.statements is None else list(self.hparams.statements)
            self._attributes = ptbxl_attributes(self.root / "scp_statements.csv", codes)
        return self._attributes

    @property
    def aux_classes(self) -> list[str]:
        """The attribute names, in target order: the encoder's auxiliary classes (``MultimodalLM.aux_classes``)."""
        return list(self.attributes["name"])

    @property
    def choices(self) -> list[str]:
        return list(CHOICES)

    def _split_of(self, folds: pd.Series) -> pd.Series:
        h = self.hparams
        if h.test_folds == "all":
            return pd.Series("test", index=folds.index)
        split = pd.Series("", index=folds.index)
        for name, chosen in (("train", h.train_folds or range(1, 9)), ("val", h.val_folds or [9]),
                             ("test", h.test_folds or [10])):
            split[folds.isin([int(f) for f in chosen])] = name
        return split

    def setup(self, stage: str | None = None) -> None:
        if self.datasets or (stage == "predict" and self.hparams.predict):
            return
        h = self.hparams
        self.prepare_data()
        database = read_ptbxl_database(self.root / "ptbxl_database.csv", self.root / "scp_statements.csv")
        database = database.assign(split=self._split_of(database["strat_fold"]))
        database = database[database["split"] != ""]
        attributes = self.attributes
        labels = present_labels(database, self.root / "scp_statements.csv", attributes, h.min_likelihood)
        leads = h.leads or list(STANDARD_LEADS)
        signals, targets = {}, {}
        for (ecg_id, row), label in zip(database.iterrows(), labels):
            try:
                path = ptbxl_record_path(self.root, ecg_id, row, fs=h.sampling_rate)
            except DataError:
                if h.sampling_rate != 100:
                    raise
                # a tree with 500 Hz records only (e.g. CinC 2021's HR*.mat): read those, resampled to 100 Hz
                path = ptbxl_record_path(self.root, ecg_id, row, fs=500)
            signal = read_wfdb_record(path, leads=leads, target_fs=h.sampling_rate).signal
            signals[ecg_id] = fit_dataset_record(signal, h.sampling_rate, h.duration_s, h.duration_policy, str(path),
                                                 h.crop_at)
            targets[ecg_id] = label
        questions = [{"ecg_id": ecg_id, "split": split, "question": a.question, "attribute": a.name,
                      "group": a.group, "answer": CHOICES[int(label[j])], "choices": CHOICES, "source": "ptbxl"}
                     for (ecg_id, split), label in zip(database["split"].items(), labels)
                     for j, a in enumerate(attributes.itertuples())]
        table = pd.concat([pd.DataFrame(questions), self._ecgqa_questions(database)], ignore_index=True)
        for split in ("train", "val", "test"):
            self.datasets[split] = PTBXLQADataset(table[table["split"] == split], signals, targets)
        log.info("PTB-XL QA %s: %d records, %s questions (%d ECG-QA questions on two records left out)", self.root,
                 len(database), {k: len(v) for k, v in self.datasets.items()}, self.n_skipped_ecgqa)

    def _ecgqa_questions(self, database: pd.DataFrame) -> pd.DataFrame:
        """The single-ECG questions of the ``ecgqa`` folder on records of `database`, in their record's split."""
        columns = ["ecg_id", "split", "question", "attribute", "group", "answer", "choices", "source"]
        if not self.hparams.ecgqa:
            return pd.DataFrame(columns=columns)
        table = read_ecg_qa(self.hparams.ecgqa, database, version="template", on_missing="skip")
        single = table["ecg_ids"].map(len) == 1
        self.n_skipped_ecgqa = int((~single).sum())
        table = table[single]
        return pd.DataFrame({
            "ecg_id": table["ecg_ids"].map(lambda ids: ids[0]),
            "split": table["ecg_ids"].map(lambda ids: database.loc[ids[0], "split"]),
            "question": table["question"],
            "attribute": table["attribute"].map(lambda a: ", ".join(a) if isinstance(a, list) else str(a)),
            "group": "ecgqa", "answer": table["answer"].map(lambda a: ", ".join(sorted(a))),
            "choices": table["choices"], "source": "ecgqa"}, columns=columns)

    def baselines(self, split: str) -> dict[str, float]:
        """Accuracy on `split` of always giving each question's most frequent training answer ("no" without
        training data); a model blind to the ECG scores AUROC 0.5 on every attribute."""
        other = self.datasets[split].table
        if other.empty:
            return {}
        train = self.datasets["train"].table
        top = train.groupby("question")["answer"].agg(lambda s: s.value_counts().index[0]) if len(train) else {}
        guess = other["question"].map(top).fillna("no")
        return {"majority_answer_acc": float((guess == other["answer"]).mean())}

    def _reader(self):
        from datamodules.ecg_qa_data import ECGQADataModule

        h = self.hparams
        return ECGQADataModule(sampling_rate=h.sampling_rate, leads=h.leads, duration_s=h.duration_s,
                               duration_policy=h.duration_policy, crop_at=h.crop_at)

    def study_items(self, path: str | os.PathLike, question: str | None = None,
                    choices: list[str] | None = None) -> list[dict]:
        """One WFDB record of a user's and a question, read as the training records are (one sample per window
        under ``duration_policy: window``); choices default to yes/no."""
        return self._reader().study_items(path, question, choices or CHOICES)

    def _loader(self, split: str, train: bool) -> DataLoader:
        return self.model_batches(self.datasets[split], split, train, self.root, "questions")
