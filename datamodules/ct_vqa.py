"""CT visual question answering as a LightningDataModule: DeepTumorVQA or M3D-VQA questions over CT volumes."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.ct import (
    LETTERS,
    NIFTI_SUFFIXES,
    CTPreprocessing,
    CTVolumeDataset,
    load_ct,
    read_deeptumorvqa,
    read_m3d_vqa,
)
from datamodules.synthetic.cache import demo_cache_dir
from mmclin.contracts import QADataModule
from mmclin.errors import ConfigError, DataError
from mmclin.tasks.qa import normalise_answer

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Questions files per split, relative to the root, in each release's own naming.
QUESTION_FILES = {
    "deeptumorvqa": {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"},
    "m3d": {"train": "M3D_VQA_train.csv", "val": "M3D_VQA_val.csv", "test": "M3D_VQA_test.csv"},
}
# Where a volume is looked for when a record has no image_path: the demo's volumes/, DeepTumorVQA's
# benchmark ct/<id>/ct.nii.gz and AbdomenAtlas' <id>/ct.nii.gz, or a DICOM series directory.
VOLUME_PATTERNS = ("volumes/{image_id}.nii.gz", "volumes/{image_id}.nii", "volumes/{image_id}",
                   "ct/{image_id}/ct.nii.gz", "{image_id}/ct.nii.gz", "{image_id}.nii.gz", "{image_id}")
# Record fields passed on in a sample's meta when the questions file has them.
META_EXTRAS = ("qid", "organ", "answer_type")


def with_options(question: str, choices: list[str]) -> str:
    """The question followed by its options, one per line: "A. ...", "B. ..."."""
    return "\n".join([question] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices)])


class CTVQADataset(Dataset):
    """Yields ``{"volume": [(1, D, H, W) float32], "question", "answer", "choices", "meta"}``, and with
    `mask_classes` also ``"volume_targets": [(C, D, H, W) bool]``: one channel per class, True where the volume's
    label mask holds one of that class's label ids."""

    def __init__(self, table: pd.DataFrame, volumes: CTVolumeDataset,
                 mask_classes: dict[str, list[int]] | None = None):
        """
        Args:
            table: one row per question with ``prompt``, ``target``, ``choices``, ``volume_index`` and meta columns.
            volumes: the preprocessed volumes (with their masks when `mask_classes` is set), by ``volume_index``.
            mask_classes: class name -> label ids of the masks.
        """
        self.table = table.reset_index(drop=True)
        self.volumes = volumes
        # label id -> its classes, so that one gather builds every class's target
        ids = [i for class_ids in (mask_classes or {}).values() for i in class_ids]
        self.class_table = torch.zeros(max(ids, default=0) + 1, len(mask_classes or {}), dtype=torch.bool)
        for c, class_ids in enumerate((mask_classes or {}).values()):
            self.class_table[class_ids, c] = True

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict:
        row = self.table.iloc[i]
        volume = self.volumes[int(row["volume_index"])]
        targets = {"volume_targets": [self._targets(volume["mask"][0])]} if self.class_table.shape[1] else {}
        return targets | {
            "volume": [volume["image"]],
            "question": row["prompt"],
            "answer": row["target"],
            "choices": list(row["choices"]),
            "meta": {"image_id": row["image_id"], "question_type": row["question_type"],
                     "question_subtype": row["question_subtype"], "answer_letter": row["answer_letter"],
                     "value": None if pd.isna(row["value"]) else float(row["value"]), "record": row["record"],
                     "volume_path": row["volume_path"]} | {k: row[k] for k in META_EXTRAS if k in row.index},
        }

    def _targets(self, mask: torch.Tensor) -> torch.Tensor:
        """(C, D, H, W) bool: where the label `mask` (D, H, W) holds one of each class's ids."""
        labels = mask.long()
        known = (labels >= 0) & (labels < len(self.class_table))  # other ids are in no class
        return self.class_table[labels.clamp(0, len(self.class_table) - 1)].movedim(-1, 0) & known


class CTVQADataModule(QADataModule):
    """Questions about CT volumes: DeepTumorVQA (Chen et al., arXiv:2505.18915) or M3D-VQA (Bai et al.,
    arXiv:2404.00578) tables, volumes as NIfTI files or DICOM series directories.

    With ``root`` unset a demo (NIfTI volumes and DeepTumorVQA-layout JSONL) is generated once into the cache.
    Volumes are preprocessed as the ``CTPreprocessing`` fields below say (they are init arguments so that the
    config and the checkpoint show them) and cached on disk under a key of those settings. Multiple-choice
    questions carry their options in the question text ("A. ...") and in ``choices``, and the answer is the
    correct option's text, so closed questions can be scored by ranking the choices.
    """

    def __init__(
        self,
        root: str | None = None,
        questions_format: Literal["deeptumorvqa", "m3d"] = "deeptumorvqa",
        questions: dict[str, str] | None = None,
        volume_pattern: str | None = None,
        orientation: str = "RAS",
        spacing: tuple[float, float, float] | None = (3.0, 1.5, 1.5),
        hu_window: tuple[float, float] | None = (-1000.0, 1000.0),
        grid: tuple[int, int, int] = (32, 256, 256),
        resize_mode: Literal["resize", "pad_crop"] = "resize",
        foreground_hu: float | None = -500.0,
        check_hu: bool = True,
        question_types: list[str] | None = None,
        balance_types: bool = False,
        mask_classes: dict[str, list[int]] | None = None,
        mask_pattern: str | None = None,
        on_missing: Literal["raise", "skip"] = "raise",
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        cache_dir: str | None = None,
        demo: dict[str, Any] | None = None,
        predict: str | None = None,
    ):
        """
        Args:
            root: dataset directory (questions files and volumes); unset = demo.
            questions_format: ``deeptumorvqa`` (JSON/JSONL/CSV records) or ``m3d`` (M3D-VQA CSV).
            questions: questions file per split, relative to `root` (default: ``train.jsonl``/``val.jsonl``/
                ``test.jsonl``, or ``M3D_VQA_{train,val,test}.csv``).
            volume_pattern: volume path relative to `root` with ``{image_id}``, e.g.
                ``benchmark/ct/{image_id}/ct.nii.gz``; default the record's ``image_path``, else the usual layouts.
            orientation: CTPreprocessing.orientation: patient directions of x, y, z; output axes are z, y, x.
            spacing: CTPreprocessing.spacing: (z, y, x) mm, or None to keep the native spacing.
            hu_window: CTPreprocessing.hu_window: HU mapped to [0, 1] with clipping, or None.
            grid: CTPreprocessing.grid: output (D, H, W).
            resize_mode: CTPreprocessing.resize_mode: ``resize`` the body crop or ``pad_crop`` it.
            foreground_hu: CTPreprocessing.foreground_hu: crop to voxels above this HU; None: no crop.
            check_hu: CTPreprocessing.check_hu: refuse volumes that do not look like HU.
            question_types: keep only these question types (e.g. ``[measurement, recognition]``).
            balance_types: draw training questions so that every question type is seen equally often (a type with
                few questions per volume, e.g. recognition, is otherwise a small share of the training signal);
                an epoch keeps its length.
            mask_classes: also yield per-voxel class targets from each volume's label mask, for a model trained
                with auxiliary targets (``MultimodalLM(aux_classes=...)``): class name -> label ids, e.g.
                ``{liver: [5], lesion: [201, 202, 203, 204]}``. The mask is preprocessed with its volume
                (nearest neighbour) and must share its grid.
            mask_pattern: label mask path relative to `root` with ``{image_id}``; default the record's
                ``mask_path`` (DeepTumorVQA-style records of the demo carry one).
            on_missing: a question whose volume is not found: ``raise`` (DataError) or ``skip`` (counted, logged).
            batch_size: training batch size.
            eval_batch_size: validation/test batch size (default: batch_size).
            num_workers: DataLoader workers.
            cache_dir: demo and preprocessed-volume cache (default ``$MMCLIN_CACHE`` or ``~/.cache/mmclin``).
            demo: keyword arguments of ``datamodules.synthetic.ct.generate_ct_demo`` (demo size and so on).
            predict: studies for ``lightning predict`` instead of the test split: a ``.jsonl`` of ``{"input": CT
                file or DICOM folder, "question", "choices"}`` rows.
        """
        super().__init__()
        self.save_hyperparameters()
        if on_missing not in ("raise", "skip"):
            raise ConfigError(f"on_missing must be 'raise' or 'skip', got {on_missing!r}")
        if questions_format not in QUESTION_FILES:
            raise ConfigError(f"questions_format must be one of {list(QUESTION_FILES)}, got {questions_format!r}")
        self.preprocessing = CTPreprocessing(orientation=orientation, spacing=spacing, hu_window=hu_window, grid=grid,
                                             resize_mode=resize_mode, foreground_hu=foreground_hu, check_hu=check_hu)
        self.demo = root is None
        self._root: Path | None = None if self.demo else Path(root)
        self.datasets: dict[str, CTVQADataset] = {}
        self.volumes: CTVolumeDataset | None = None
        self.n_skipped = 0
        self.mask_classes = {str(k): [int(i) for i in v] for k, v in mask_classes.items()} if mask_classes else None

    @property
    def aux_classes(self) -> list[str]:
        """Names of the per-voxel targets (``mask_classes``), for ``MultimodalLM(aux_classes=...)``."""
        return list(self.mask_classes or {})

    @property
    def root(self) -> Path:
        if self._root is None:
            self.prepare_data()
        return self._root

    def prepare_data(self) -> None:
        if self.demo and self._root is None:
            # Imported here so that reading real data never needs the demo generator.
            from datamodules.synthetic.ct import generate_ct_demo

            self._root = Path(generate_ct_demo(cache_dir=self.hparams.cache_dir, seed=0, **(self.hparams.demo or {})))

    def study_item(self, path: str | os.PathLike, question: str | None = None,
                   choices: list[str] | None = None) -> dict:
        """One CT of a user's (NIfTI file or DICOM series folder) and a question, through the model's CT
        preprocessing (orientation, spacing, HU check and window, grid); closed questions get their options in
        the prompt as in training.

        Raises:
            ConfigError: no question. DataError: unreadable volume, 8-bit or NaN values (the HU check), a 2-D image.
        """
        if not question:
            raise ConfigError("a CT VQA model answers a question about the volume: give one (--question)")
        volume = load_ct(path, self.preprocessing)["image"]
        choices = list(choices or [])
        return {"volume": [volume], "question": with_options(question, choices) if choices else question,
                "answer": "", "choices": choices, "meta": {"input": str(path)}}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets or (stage == "predict" and self.hparams.predict):  # (the listed volumes only)
            return
        h = self.hparams
        files = h.questions or QUESTION_FILES[h.questions_format]
        unknown = sorted(set(files) - set(SPLITS))
        if unknown:
            raise ConfigError(f"questions: unknown split(s) {unknown}; expected keys among {list(SPLITS)}")
        read = read_deeptumorvqa if h.questions_format == "deeptumorvqa" else read_m3d_vqa
        tables = []
        for split, name in files.items():
            table = read(self.root / name)
            tables.append(table.assign(split=split))
        table = pd.concat(tables, ignore_index=True)
        if h.question_types:
            table = table[table["question_type"].isin(h.question_types)]
        table = self._attach_volumes(table)
        self._add_prompts(table)
        paths = sorted(table["volume_path"].unique())
        index = {p: i for i, p in enumerate(paths)}
        table["volume_index"] = table["volume_path"].map(index)
        masks = self._mask_paths(table, paths) if self.mask_classes else None
        self.volumes = CTVolumeDataset(paths, self.preprocessing, demo_cache_dir(h.cache_dir) / "ct-volumes", masks)
        for split in SPLITS:
            self.datasets[split] = CTVQADataset(table[table["split"] == split], self.volumes, self.mask_classes)
        log.info("CT VQA %s: questions per split %s, %d volumes, %d skipped (volume not found); preprocessing %s",
                 self.root, {k: len(v) for k, v in self.datasets.items()}, len(paths), self.n_skipped,
                 self.preprocessing.settings())

    def _attach_volumes(self, table: pd.DataFrame) -> pd.DataFrame:
        """Add ``volume_path``; a question without a volume raises, or is dropped and counted."""
        h = self.hparams
        found: dict[tuple[str, str | None], str | None] = {}
        paths = []
        for row in table.itertuples():
            key = (row.image_id, row.image_path)
            if key not in found:
                if h.volume_pattern:
                    candidates = [h.volume_pattern.format(image_id=row.image_id)]
                elif row.image_path:
                    candidates = [row.image_path]
                else:
                    candidates = [p.format(image_id=row.image_id) for p in VOLUME_PATTERNS]
                hit = next((self.root / c for c in candidates if (self.root / c).exists()), None)
                if hit is not None and hit.is_file() and not hit.name.lower().endswith(NIFTI_SUFFIXES):
                    hint = (" (M3D-VQA's .npy volumes are already preprocessed, without HU or geometry: point "
                            "volume_pattern at the source NIfTI/DICOM volumes)") if hit.suffix == ".npy" else ""
                    raise DataError(f"{row.record}: {hit} is neither a NIfTI file nor a DICOM series directory{hint}")
                found[key] = str(hit) if hit is not None else None
                if hit is None and h.on_missing == "raise":
                    raise DataError(f"{row.record}: no CT volume for image_id {row.image_id!r} under {self.root} "
                                    f"(looked for {candidates}); or pass on_missing='skip'")
            paths.append(found[key])
        table = table.assign(volume_path=paths)
        missing = table["volume_path"].isna()
        self.n_skipped = int(missing.sum())
        if self.n_skipped:
            log.warning("CT VQA %s: skipped %d question(s) whose volume was not found (%d image_ids)", self.root,
                        self.n_skipped, table.loc[missing, "image_id"].nunique())
        return table[~missing].copy()

    def _mask_paths(self, table: pd.DataFrame, paths: list[str]) -> list[str]:
        """The label mask of each volume in `paths`: from `mask_pattern`, else the records' ``mask_path``."""
        masks = {}
        for row in table.drop_duplicates("volume_path").itertuples():
            relative = self.hparams.mask_pattern.format(image_id=row.image_id) if self.hparams.mask_pattern \
                else getattr(row, "mask_path", None)
            if not isinstance(relative, str) or not (self.root / relative).is_file():
                where = f"mask {self.root / relative}" if isinstance(relative, str) else "no mask_path in the record"
                raise DataError(f"{row.record}: mask_classes needs a label mask for image_id {row.image_id!r}: "
                                f"{where} (set mask_pattern, or leave mask_classes unset)")
            masks[row.volume_path] = str(self.root / relative)
        return [masks[p] for p in paths]

    @staticmethod
    def _add_prompts(table: pd.DataFrame) -> None:
        """Add ``prompt`` (question with options) and ``target`` (the correct option's text, else the answer)."""
        prompts, targets = [], []
        for row in table.itertuples():
            choices = list(row.choices)
            if choices and pd.isna(row.answer_letter):
                raise DataError(f"{row.record}: answer {row.answer!r} is not one of the options {choices} and no "
                                "correct option letter is given")
            prompts.append(with_options(row.question, choices) if choices else row.question)
            targets.append(choices[LETTERS.index(row.answer_letter)] if choices else row.answer)
        table["prompt"], table["target"] = prompts, targets

    def lesion_masks(self, split: str, lesion_classes: list[str] | None = None) -> list[torch.Tensor]:
        """Per question of `split` (after `setup`), where the lesions of its volume lie on the model's grid:
        (D, H, W) bool, the union of the `mask_classes` named in `lesion_classes` (default: those whose name
        contains ``lesion``), from the label mask preprocessed with its volume. For lesion-region noising
        (:class:`datamodules.preference.PreferenceDataModule`).

        Raises:
            ConfigError: no `mask_classes`, or a lesion class that is not one of them.
        """
        names = list(self.mask_classes or {})
        keep = list(lesion_classes or [n for n in names if "lesion" in n])
        if not names or not keep or set(keep) - set(names):
            raise ConfigError(f"lesion masks need mask_classes with the lesion classes {keep or ['*lesion*']}; "
                              f"mask_classes: {names}")
        dataset, channels, by_volume, masks = self.datasets[split], [names.index(k) for k in keep], {}, []
        for volume_index in dataset.table["volume_index"]:
            if volume_index not in by_volume:
                label = self.volumes[int(volume_index)]["mask"][0]
                by_volume[volume_index] = dataset._targets(label)[channels].any(0)
            masks.append(by_volume[volume_index])
        return masks

    def corpus(self, split: str = "train") -> list[str]:
        """The split's prompts (questions with their options) and answers: what a tokenizer is fitted on."""
        table = self.datasets[split].table
        return [*table["prompt"], *table["target"].astype(str)]

    def baselines(self, split: str) -> dict[str, float]:
        """Accuracy on `split` of trivial answerers, overall and per question type (``.../<type>``).

        ``majority_answer_acc``: always the training split's most frequent answer for the question's subtype
        (its type when the subtype is not in training). ``random_choice_acc``: the mean of 1 / number of options
        over multiple-choice questions (what picking an option at random scores).
        """
        train, other = self.datasets["train"].table, self.datasets[split].table
        if other.empty:
            return {}

        def key(row) -> tuple:
            return (row["question_type"], row["question_subtype"])

        votes: dict[tuple, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for _, row in train.iterrows():
            answer = normalise_answer(row["target"])
            votes[key(row)][answer] += 1
            votes[(row["question_type"], "*")][answer] += 1
        top = {k: max(v, key=v.get) for k, v in votes.items()}
        hit = [top.get(key(row), top.get((row["question_type"], "*"))) == normalise_answer(row["target"])
               for _, row in other.iterrows()]
        chance = [1 / len(c) if len(c) else float("nan") for c in other["choices"]]
        frame = pd.DataFrame({"type": other["question_type"].fillna("none").to_numpy(), "hit": hit, "chance": chance})
        out = {"majority_answer_acc": float(frame["hit"].mean())}
        if frame["chance"].notna().any():
            out["random_choice_acc"] = float(frame["chance"].mean())
        for qtype, group in frame.groupby("type"):
            out[f"majority_answer_acc/{qtype}"] = float(group["hit"].mean())
            if group["chance"].notna().any():
                out[f"random_choice_acc/{qtype}"] = float(group["chance"].mean())
        return out

    def state_dict(self) -> dict:
        """Saved in checkpoints: the preprocessing a model was trained with."""
        return {"ct_preprocessing": self.preprocessing.settings()}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("ct_preprocessing")
        if saved is not None and saved != self.preprocessing.settings():
            raise ConfigError(f"the checkpoint was made with CT preprocessing {saved}, this datamodule has "
                             f"{self.preprocessing.settings()}; set the same data arguments to resume or evaluate")

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = self.datasets[split]
        weights = None
        if train and self.hparams.balance_types and len(dataset):
            types = dataset.table["question_type"].fillna("none")
            weights = 1.0 / types.map(types.value_counts()).to_numpy(dtype=float)
        return self.model_batches(dataset, split, train, self.root, "questions", weights)
