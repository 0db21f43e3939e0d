"""Radiology reports with synthetic errors as a LightningDataModule, for error checkers and multimodal LMs.

Reports come from an IU-Xray CSV pair (``indiana_reports.csv`` + ``indiana_projections.csv``; the CXR demo when
no root is given) or from an ``errors.jsonl`` already made by error injection. Errors are injected at run time
with :func:`mmclin.reports.injection.inject_corpus`, seeded per split, after the studies are split: a study
(IU ``uid``) and all its images belong to one split, so no report is seen in training with one error and tested
with another.

``mode="text"`` gives batches for :class:`mmclin.models.report_checker.ReportChecker`: the model owns the
tokenizer and the label set, so the loaders batch with the model's ``collator`` (as the QA datamodules do).
``mode="qa"`` gives question-answer samples over the study's frontal image for
:class:`mmclin.models.mllm.MultimodalLM`: ``{"image": [(1, H, W)], "question": "<report>\\nIs there an error in
this report? If so, which type?", "answer": "error: yes; type: laterality_swap" | "error: no", "choices",
"meta"}``; with ``mesh_classes``, also ``"image_targets": [(C,) float]``, the study's findings from its IU-Xray
MeSH terms, for ``MultimodalLM(aux_classes=..., aux_level="medium")``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.loaders import read_studies
from datamodules.reports import content_key, duplicate_groups, split_studies
from datamodules.synthetic.cxr import REPORTS_CSV, generate_cxr_demo
from mmclin.contracts import QADataModule
from mmclin.errors import ConfigError, DataError
from mmclin.reports.qa import NO_ERROR_ANSWER, QUESTION, error_answer, load_radiograph
from mmclin.reports.sections import parse_sections

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_SEED_OFFSET = {"train": 0, "val": 1, "test": 2}  # each split draws its errors from its own stream
_RECORD_KEYS = ("id", "original", "modified", "has_error", "fine_type")


def read_error_records(path: Path) -> list[dict]:
    """Records of an errors.jsonl (one ``inject_corpus`` record per line)."""
    records = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_no}: not a JSON object ({err.msg})") from err
        missing = [k for k in _RECORD_KEYS if not isinstance(record, dict) or k not in record]
        if missing:
            raise DataError(f"{path}:{line_no}: record lacks {missing}; expected the fields of inject_corpus")
        if record["has_error"] and not record["fine_type"]:
            raise DataError(f"{path}:{line_no}: record {record['id']} has an error but no fine_type")
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records")
    return records


class ReportErrorDataset(Dataset):
    """Samples of one split from injected-error records; see the module docstring for both modes."""

    def __init__(self, records: list[dict], mode: Literal["text", "qa"], with_images: bool, choices: list[str],
                 image_size: int | None = None, mesh_classes: dict[str, re.Pattern] | None = None):
        self.records = records
        self.mesh_classes = mesh_classes or {}
        self.mode = mode
        self.with_images = with_images
        self.choices = choices
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.records)

    def image(self, record: dict) -> torch.Tensor:
        """The study's first frontal image as (1, H, W) float32 in [0, 1]."""
        return load_radiograph(record, self.image_size)

    def targets(self, record: dict) -> torch.Tensor:
        """(C,) float: 1 for each class whose pattern matches one of the study's MeSH terms."""
        if "mesh" not in record:
            raise DataError(f"report {record['id']}: mesh_classes needs the study's MeSH terms, and this record has "
                            "none (records injected from an IU-Xray CSV carry them; or leave mesh_classes unset)")
        return torch.tensor([float(any(p.search(t) for t in record["mesh"])) for p in self.mesh_classes.values()])

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        meta = {"id": r["id"], "has_error": bool(r["has_error"]), "fine_type": r["fine_type"],
                "coarse_type": r.get("coarse_type"), "span": r.get("span")}
        if self.mode == "qa":
            targets = {"image_targets": [self.targets(r)]} if self.mesh_classes else {}
            return targets | {"image": [self.image(r)], "question": f"{r['modified']}\n{QUESTION}",
                    "answer": error_answer(r["fine_type"] if r["has_error"] else None),
                    "choices": list(self.choices), "meta": meta}
        sample = {"text": r["modified"], "has_error": bool(r["has_error"]), "fine_type": r["fine_type"],
                  "meta": meta}
        if self.with_images:
            sample["image"] = self.image(r)
        return sample


class ReportErrorDataModule(QADataModule):
    """Report error checking (SIMPLE: is there an error; COMPLEX: which type) on IU-Xray-layout reports.

    With ``root`` unset the CXR demo (:func:`datamodules.synthetic.cxr.generate_cxr_demo`) is generated once into
    the cache (``$MMCLIN_CACHE`` or ``~/.cache/mmclin``). Studies are split train / val / test by a seeded
    permutation of their ids (or by the records' own ``split`` where every one has it). Validation and test
    errors are fixed by `seed`; training errors are drawn afresh every epoch when the trainer reloads loaders
    every epoch (``reload_dataloaders_every_n_epochs: 1``), which shows the model many more erroneous variants
    of the same reports.
    """

    def __init__(
        self,
        root: str | None = None,
        mode: Literal["text", "qa"] = "text",
        with_images: bool | None = None,
        error_rate: float = 0.5,
        error_types: list[str] | None = None,
        max_errors_per_report: int = 1,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        image_root: str | None = None,
        image_size: int | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        demo_studies: int = 600,
        demo_image_size: int = 128,
        mesh_classes: dict[str, str] | None = None,
        cache_dir: str | None = None,
        predict: str | None = None,
    ):
        """
        Args:
            root: an IU-Xray directory (``indiana_reports.csv``, ``indiana_projections.csv``, ``images/``) or an
                ``errors.jsonl`` of injected records (then not injected again); unset = the CXR demo.
            mode: ``text`` (batches for ReportChecker) or ``qa`` (image + question samples for MultimodalLM).
            with_images: add the study's frontal image to every sample; default True for ``qa``, False for
                ``text`` (``qa`` needs images).
            error_rate: share of the reports of each split given one error.
            error_types: fine types to inject (default all of ``mmclin.reports.injection.FINE_TYPES``).
            max_errors_per_report: a report given errors gets 1 to this many, of different types (ReXErr: 3); its
                label is the first one's type.
            seed: seed of the split and of the injected errors.
            val_fraction: share of the studies in validation.
            test_fraction: share of the studies in test.
            image_root: folder of the IU PNGs (default ``<root>/images/images_normalized`` where it exists, as in
                the Kaggle release, else ``<root>/images``); read only when images are asked for.
            image_size: resize images to this square side (default: as stored).
            on_error: a bad IU report row raises ``DataError`` (``raise``) or is left out and logged (``skip``).
            batch_size: training batch size.
            eval_batch_size: validation/test batch size (default: batch_size).
            num_workers: DataLoader workers.
            demo_studies: demo size (studies).
            demo_image_size: demo image side in pixels.
            mesh_classes: in ``qa`` mode, also yield the study's findings as targets for the image encoder:
                class name -> regular expression searched in each IU-Xray MeSH term (case-insensitive), e.g.
                ``{effusion_right: "^Pleural Effusion/right"}``; a class is 1 when any term matches.
            cache_dir: demo location (default ``$MMCLIN_CACHE`` or ``~/.cache/mmclin``).
            predict: reports for ``lightning predict`` instead of the test split: a folder of ``.txt`` reports, one
                report file, or a ``.jsonl`` of ``{"input": report file}`` (``qa`` mode: with ``"image"``, the
                study's frontal radiograph); each is checked as written.
        """
        super().__init__()
        if mode not in ("text", "qa"):
            raise ConfigError(f"mode must be 'text' or 'qa', got {mode!r}")
        if mode == "qa" and with_images is False:
            raise ConfigError("mode='qa' samples carry the study image for the multimodal LM; with_images cannot be "
                             "False")
        if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
            raise ConfigError(f"need val_fraction, test_fraction >= 0 with a sum < 1; got {val_fraction}, "
                             f"{test_fraction}")
        self.save_hyperparameters()
        if mesh_classes and mode != "qa":
            raise ConfigError("mesh_classes are image targets of the qa mode; the text checker has no image encoder")
        try:
            self.mesh_classes = {str(k): re.compile(v, re.IGNORECASE) for k, v in (mesh_classes or {}).items()}
        except re.error as err:
            raise ConfigError(f"mesh_classes: {err.pattern!r} is not a regular expression: {err}") from err
        self.with_images = (mode == "qa") if with_images is None else with_images
        self.reports: dict[str, list] = {}  # split -> Report (empty when root is an errors.jsonl)
        self.records: dict[str, list[dict]] = {}  # split -> injected records (val/test fixed; train of epoch 0)
        self._train_epoch = 0

    @property
    def root(self) -> Path:
        h = self.hparams
        if h.root is None:
            return generate_cxr_demo(h.cache_dir, seed=0, n_studies=h.demo_studies, size=h.demo_image_size)
        return Path(h.root)

    @property
    def selection_metric(self) -> str:
        """Accuracy of the is-there-an-error verdict: the checker's (``text``) or the multimodal LM's ranked answer
        (``qa``)."""
        return "val/simple_acc" if self.hparams.mode == "text" else "val/acc_likelihood"

    @property
    def aux_classes(self) -> list[str]:
        """Names of the image targets (``mesh_classes``), for ``MultimodalLM(aux_classes=...)``."""
        return list(self.mesh_classes)

    @property
    def error_types(self) -> list[str]:
        from mmclin.reports.injection import FINE_TYPES

        return list(self.hparams.error_types or FINE_TYPES)

    @property
    def choices(self) -> list[str]:
        """Every QA answer: no error, or an error of each type."""
        return [NO_ERROR_ANSWER] + [error_answer(t) for t in self.error_types]

    def prepare_data(self) -> None:
        if self.hparams.root is None:
            generate_cxr_demo(self.hparams.cache_dir, seed=0, n_studies=self.hparams.demo_studies,
                              size=self.hparams.demo_image_size)

    def setup(self, stage: str | None = None) -> None:
        if self.records or (stage == "predict" and self.hparams.predict):  # the listed reports only
            return
        h = self.hparams
        root = self.root
        if root.is_file():
            records = read_error_records(root)
            split_of = self._split_of([str(r["id"]) for r in records], [r.get("split") for r in records],
                                      [content_key(parse_sections(r["original"])) for r in records])
            for split in SPLITS:
                self.records[split] = [r for r in records if split_of[str(r["id"])] == split]
        else:
            from datamodules.reports import read_iu_xray

            reports = read_iu_xray(root / REPORTS_CSV, image_root=self._image_root(root) if self.with_images else None,
                                   on_error=h.on_error, skip_hint="--data.init_args.on_error skip").reports
            split_of = self._split_of([r.id for r in reports], [r.split for r in reports],
                                      [content_key(r.sections) for r in reports])
            for split in SPLITS:
                self.reports[split] = [r for r in reports if split_of[r.id] == split]
                self.records[split] = self._inject(split, epoch=0)
        for split in SPLITS:
            if not self.records[split]:
                raise DataError(f"{root}: the '{split}' split has no reports (val_fraction={h.val_fraction}, "
                                f"test_fraction={h.test_fraction})")
        log.info("report errors %s: %s reports (train/val/test)", root,
                 "/".join(str(len(self.records[s])) for s in SPLITS))

    def _image_root(self, root: Path) -> Path:
        if self.hparams.image_root is not None:
            return Path(self.hparams.image_root)
        kaggle = root / "images" / "images_normalized"
        return kaggle if kaggle.is_dir() else root / "images"

    def _split_of(self, ids: list[str], given: list[str | None], keys: list[str]) -> dict[str, str]:
        """The records' own splits where every one has one; else a seeded split that keeps reports with the same
        findings + impression (`keys`) on one side, so templated reports do not leak from train to test."""
        if all(s in SPLITS for s in given):
            return dict(zip(ids, given))
        dup = duplicate_groups(keys)
        log.info("report errors: %d groups of identical reports (%d reports) each kept on one side of the split",
                 dup["n_groups"], dup["n_reports"])
        return split_studies(ids, self.hparams.val_fraction, self.hparams.test_fraction, self.hparams.seed,
                             groups=keys)

    def _inject(self, split: str, epoch: int) -> list[dict]:
        from mmclin.reports.injection import inject_corpus

        h = self.hparams
        # One stream per (split, epoch): epoch 0 of training, validation and test never share errors.
        seed = int(np.random.SeedSequence([h.seed, _SPLIT_SEED_OFFSET[split], epoch]).generate_state(1)[0])
        return inject_corpus(self.reports[split], error_rate=h.error_rate, seed=seed, types=self.error_types,
                             max_errors_per_report=h.max_errors_per_report)

    def corpus(self, split: str = "train") -> list[str]:
        """The error-free report texts of `split` (what a word vocabulary is fitted on)."""
        return [r["original"] for r in self.records[split]]

    def baselines(self, split: str) -> dict[str, float]:
        """On `split`: SIMPLE accuracy of always answering the training set's majority (error / no error), and the
        shortcut audit's bag-of-words classifier fitted on the training reports (:mod:`mmclin.reports.audit`):
        its SIMPLE accuracy and its balanced accuracy on the image-dependent error types."""
        from mmclin.reports.audit import audit

        train_rate = np.mean([bool(r["has_error"]) for r in self.records["train"]])
        truth = np.array([bool(r["has_error"]) for r in self.records[split]])
        out = {"simple_majority_acc": float(np.mean(truth == (train_rate >= 0.5)))}
        bow = audit(self.records[split], self.records["train"], n_boot=0)["bag_of_words"]
        if bow is not None:
            out["simple_bag_of_words_acc"] = bow["simple"]["accuracy"]
            if "image_dependent" in bow["simple"]:
                out["image_dependent_bag_of_words_bacc"] = bow["simple"]["image_dependent"]["balanced_accuracy"]
        return out

    def _records(self, split: str, train: bool) -> list[dict]:
        epoch = self.trainer.current_epoch if (train and self.trainer is not None) else 0
        if train and self.reports and epoch != self._train_epoch:
            self.records["train"], self._train_epoch = self._inject("train", epoch), epoch
        return self.records[split]

    def predict_dataloader(self) -> DataLoader:
        """The reports listed in ``predict``, else the test split."""
        spec = self.hparams.predict
        if not spec:
            return super().predict_dataloader()
        path = Path(spec)
        if path.is_dir():
            studies = [{"input": str(p)} for p in sorted(path.glob("*.txt"))]
            if not studies:
                raise DataError(f"{path}: no .txt reports in the folder")
        else:
            studies = read_studies(path) if path.suffix == ".jsonl" else [{"input": str(path)}]
        return self.study_loader(studies)

    def read_study_items(self, study: dict) -> list[dict]:
        return [self.study_item(study["input"], image=study.get("image"))]

    def study_item(self, path: str | Path, question: str | None = None, choices: list[str] | None = None,
                   image: str | None = None) -> dict:
        """One report of the user's as the checker's sample (``qa`` mode: with its radiograph `image`).

        Raises:
            DataError: the report is unreadable or empty; ``qa`` mode without a readable image.
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: cannot read the report text ({err})") from None
        if not text.strip():
            raise DataError(f"{path}: the report is empty")
        meta = {"id": Path(path).stem, "input": str(path)}
        if self.hparams.mode == "text":
            return {"text": text, "meta": meta}
        if image is None:
            raise DataError(f"{path}: the multimodal checker reads the report with its frontal radiograph; list the "
                            'study as {"input": REPORT, "image": PNG} in a .jsonl')
        record = {"id": meta["id"], "images": [image]}
        return {"image": [load_radiograph(record, self.hparams.image_size)], "question": f"{text}\n{QUESTION}",
                "answer": "", "choices": list(self.choices), "meta": meta}

    def _loader(self, split: str, train: bool) -> DataLoader:
        h = self.hparams
        dataset = ReportErrorDataset(self._records(split, train), h.mode, self.with_images, self.choices,
                                     h.image_size, self.mesh_classes)
        # batched by the model's ReportCollator (text mode) or QACollator (qa mode)
        return self.model_batches(dataset, split, train, self.root, "reports")
