"""Dermatology image-text data: generic CSV, Derm1M and ISIC 2019 / HAM10000 layouts.

Every reader returns one table (pandas) with the columns ``path, caption, label, group, split, line``
(``line`` is the 1-based line in the source CSV, header = line 1) so that errors can name the row.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader, Dataset

from datamodules.images import read_image
from datamodules.loaders import split_loader
from datamodules.synthetic.cache import demo_cache_dir
from datamodules.synthetic.derm import CLASS_NAMES as DEMO_CLASS_NAMES
from datamodules.synthetic.derm import DEMO_CSV, generate_derm_demo
from datamodules.tables import check_images, split_table
from mmclin.contracts import ClinicalDataModule
from mmclin.errors import ConfigError, DataError
from mmclin.tasks.zero_shot import DERM_TEMPLATES

log = logging.getLogger(__name__)

# ISIC 2019 ground-truth columns -> class names (Codella et al. 2018; Combalia et al. 2019).
ISIC_CLASS_NAMES = {
    "MEL": "melanoma",
    "NV": "melanocytic nevus",
    "BCC": "basal cell carcinoma",
    "AK": "actinic keratosis",
    "BKL": "benign keratosis",
    "DF": "dermatofibroma",
    "VASC": "vascular lesion",
    "SCC": "squamous cell carcinoma",
    "UNK": "unknown",
}
# HAM10000 `dx` codes -> class names (Tschandl et al., Sci Data 2018).
HAM_DX_NAMES = {
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "bcc": "basal cell carcinoma",
    "akiec": "actinic keratosis",
    "bkl": "benign keratosis",
    "df": "dermatofibroma",
    "vasc": "vascular lesion",
}
# HAM10000 `dx_type`: how the diagnosis was established (Tschandl et al. 2018), as a caption phrase.
HAM_DX_TYPE_PHRASES = {
    "histo": "confirmed by histopathology",
    "follow_up": "stable on digital dermoscopic follow-up",
    "consensus": "diagnosed by expert consensus",
    "confocal": "confirmed by reflectance confocal microscopy",
}


def _read_csv(csv_path: Path, required: Sequence[str], separator: str = ",") -> pd.DataFrame:
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: CSV file not found")
    frame = pd.read_csv(csv_path, sep=separator, dtype=str, keep_default_na=False)
    _require_columns(frame, required, csv_path)
    return frame


def _require_columns(frame: pd.DataFrame, required: Sequence[str], csv_path: Path) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {missing}; the file has {list(frame.columns)}")


def _resolve(root: Path, image_dir: str, name: str, suffix: str = "") -> str:
    path = Path(name + suffix)
    return str(path if path.is_absolute() else root / image_dir / path)


def read_image_text_csv(
    csv_path: str | os.PathLike,
    root: str | os.PathLike,
    image_key: str = "filepath",
    caption_key: str = "title",
    label_key: str | None = None,
    group_key: str | None = None,
    split_key: str | None = None,
    image_dir: str = "",
    separator: str = ",",
) -> pd.DataFrame:
    """Read an image-text CSV (open_clip_train's ``--csv-img-key/--csv-caption-key`` convention).

    Args:
        csv_path: the CSV file.
        root: directory that relative image paths are resolved against (``root/image_dir/<image>``).
        image_key: column holding the image path.
        caption_key: column holding the caption.
        label_key: optional column holding a class name (for zero-shot evaluation).
        group_key: optional column (lesion or patient id) that seeded splits keep together.
        split_key: optional column holding train/val/test.
        image_dir: sub-directory of `root` holding the images.
        separator: CSV field separator.
    """
    csv_path = Path(csv_path)
    keys = [k for k in (image_key, caption_key, label_key, group_key, split_key) if k]
    frame = _read_csv(csv_path, keys, separator)
    lines = np.arange(len(frame)) + 2
    captions = frame[caption_key].str.strip()
    empty = np.flatnonzero(captions.eq("").to_numpy())
    if len(empty):
        raise DataError(
            f"{csv_path}: empty caption in column '{caption_key}' at line(s) {lines[empty][:10].tolist()}"
            + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        )
    root = Path(root)
    table = pd.DataFrame(
        {
            "path": [_resolve(root, image_dir, p) for p in frame[image_key]],
            "caption": captions,
            "label": frame[label_key].str.strip() if label_key else "",
            "group": frame[group_key] if group_key else "",
            "split": frame[split_key].str.strip().str.lower() if split_key else "",
            "line": lines,
        }
    )
    return table


def read_derm1m(csv_path: str | os.PathLike, root: str | os.PathLike, caption_key: str = "truncated_caption",
                label_key: str = "disease_label", group_key: str | None = None) -> pd.DataFrame:
    """Read a Derm1M CSV (``filename, caption, truncated_caption, disease_label, ...``; Yan et al. 2025).

    DermLIP trains on ``truncated_caption``; images are ``root/<filename>``.
    """
    return read_image_text_csv(csv_path, root, "filename", caption_key, label_key, group_key)


def read_isic(
    csv_path: str | os.PathLike,
    root: str | os.PathLike,
    image_dir: str = "ISIC_2019_Training_Input",
    metadata_csv: str | os.PathLike | None = None,
    templates: Sequence[str] = DERM_TEMPLATES,
    seed: int = 0,
) -> pd.DataFrame:
    """Read ISIC 2019 ground truth (``image, MEL, NV, ...`` one-hot) or HAM10000 metadata (``image_id, dx``).

    Captions are built from the class name and a template drawn with `seed`. The lesion id (HAM10000
    ``lesion_id`` or the ISIC metadata CSV's) becomes the split group; images without one form their own group.
    """
    csv_path = Path(csv_path)
    frame = _read_csv(csv_path, [])
    if "dx" in frame.columns:  # HAM10000_metadata.csv
        _require_columns(frame, ["image_id"], csv_path)
        images = frame["image_id"]
        unknown = ~frame["dx"].isin(HAM_DX_NAMES)
        if unknown.any():
            i = int(np.flatnonzero(unknown.to_numpy())[0])
            raise DataError(f"{csv_path} line {i + 2}: dx '{frame['dx'].iloc[i]}' is not one of {list(HAM_DX_NAMES)}")
        labels = frame["dx"].map(HAM_DX_NAMES)
        groups = frame.get("lesion_id", pd.Series([""] * len(frame)))
    else:  # ISIC_2019_Training_GroundTruth.csv
        codes = [c for c in ISIC_CLASS_NAMES if c in frame.columns]
        _require_columns(frame, ["image", *codes[:1]] if codes else ["image", "MEL"], csv_path)
        onehot = frame[codes].astype(float).to_numpy()
        bad = np.flatnonzero(onehot.sum(axis=1) != 1)
        if len(bad):
            raise DataError(f"{csv_path} line {bad[0] + 2}: expected exactly one 1.0 among {codes}")
        images = frame["image"]
        labels = pd.Series([ISIC_CLASS_NAMES[codes[k]] for k in onehot.argmax(axis=1)])
        groups = pd.Series([""] * len(frame))
        if metadata_csv is not None:
            meta = _read_csv(Path(root) / metadata_csv, ["image", "lesion_id"]).set_index("image")["lesion_id"]
            groups = images.map(meta).fillna("")
    rng = np.random.default_rng(seed)
    if "dx" in frame.columns:
        captions = [ham_caption(row, label, templates, rng) for (_, row), label in zip(frame.iterrows(), labels)]
    else:
        captions = [templates[int(rng.integers(len(templates)))].format(name) for name in labels]
    root = Path(root)
    return pd.DataFrame(
        {
            "path": [_resolve(root, image_dir, name, "" if Path(name).suffix else ".jpg") for name in images],
            "caption": captions,
            "label": labels.to_numpy(),
            "group": groups.to_numpy(),
            "split": "",
            "line": np.arange(len(frame)) + 2,
        }
    )


def ham_caption(row: pd.Series, classname: str, templates: Sequence[str], rng: np.random.Generator,
                keep: float = 0.6) -> str:
    """A caption for one HAM10000 row as DermLIP builds them from the diagnosis and the metadata (Yan et al. 2025).

    A template names the diagnosis; each known metadata field (site, age and sex, how the diagnosis was made) is
    added with probability `keep`, in a varied phrasing, so that captions differ in length and content while the
    class name stays the part every caption shares. Unknown values (``unknown``, empty, ``nan``) are left out.
    E.g. "dermoscopy of melanoma. located on the back. male, aged 55. confirmed by histopathology."
    """
    parts = [templates[int(rng.integers(len(templates)))].format(classname)]
    site = str(row.get("localization", "")).strip()
    if site and site not in ("unknown", "nan") and rng.random() < keep:
        parts.append(f"located on the {site}." if rng.random() < 0.5 else f"site: {site}.")
    age, sex = str(row.get("age", "")).strip(), str(row.get("sex", "")).strip()
    known_age = age not in ("", "nan", "unknown")
    known_sex = sex not in ("", "nan", "unknown")
    if (known_age or known_sex) and rng.random() < keep:
        if rng.random() < 0.5:
            who = " ".join(p for p in (f"{int(float(age))}-year-old" if known_age else "", sex if known_sex else "")
                           if p)
            parts.append(f"patient: {who}.")
        else:
            parts.append(", ".join(p for p in (sex if known_sex else "patient",
                                               f"aged {int(float(age))}" if known_age else "") if p) + ".")
    dx_type = HAM_DX_TYPE_PHRASES.get(str(row.get("dx_type", "")).strip())
    if dx_type and rng.random() < keep:
        parts.append(dx_type + ".")
    return " ".join(parts)


class ImageTextDataset(Dataset):
    """Yields ``{"image": (3, H, W), "text": (context_length,) token ids, "caption", "label", "path"}``."""

    def __init__(self, table: pd.DataFrame, classnames: Sequence[str], transform: Callable,
                 tokenizer: Callable | None, source: str = ""):
        self.table = table.reset_index(drop=True)
        self.class_index = {c: i for i, c in enumerate(classnames)}
        self.transform = transform
        self.tokenizer = tokenizer
        self.source = source

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict:
        row = self.table.iloc[i]
        try:
            image = read_image(row["path"])
        except DataError as e:
            raise DataError(f"{self.source} line {row['line']}: {e}") from e
        item = {
            "image": self.transform(image),
            "caption": row["caption"],
            "label": self.class_index.get(row["label"], -1),
            "path": row["path"],
        }
        if self.tokenizer is not None:
            item["text"] = self.tokenizer([row["caption"]])[0]
        return item


class DermDataModule(ClinicalDataModule):
    """Image-caption pairs for CLIP training and zero-shot evaluation in dermatology.

    With ``root`` unset the seeded demo dataset (Derm1M layout) is generated once into the cache
    directory (``$MMCLIN_CACHE`` or ``~/.cache/mmclin``) and read with the Derm1M reader.
    Image transforms and the tokenizer come from the model (:meth:`connect`), as open_clip pairs them with its
    weights; without a model, open_clip's default transform at `image_size` is used.
    """

    selection_metric = "val/zs_bacc"

    def __init__(
        self,
        root: str | None = None,
        format: Literal["csv", "derm1m", "isic"] = "derm1m",
        csv: str | None = None,
        image_dir: str = "",
        metadata_csv: str | None = None,
        image_key: str = "filepath",
        caption_key: str | None = None,
        label_key: str | None = None,
        group_key: str | None = None,
        split_key: str | None = None,
        separator: str = ",",
        classes: list[str] | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        on_missing: Literal["error", "skip"] = "error",
        verify_images: bool = False,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        image_size: int = 224,
        demo_lesions_per_class: int = 90,
        demo_image_size: int = 128,
        cache_dir: str | None = None,
        predict: str | None = None,
        sampling: Literal["shuffle", "balanced", "sqrt"] = "shuffle",
    ):
        """
        Args:
            root: dataset directory; unset = generate and use the demo dataset.
            format: ``csv`` (generic image-text CSV), ``derm1m`` or ``isic`` (ISIC 2019 / HAM10000).
            csv: CSV path relative to `root` (default per format: Derm1M_v2_pretrain.csv,
                ISIC_2019_Training_GroundTruth.csv; required for ``csv``).
            image_dir: sub-directory of `root` with the images (ISIC: ISIC_2019_Training_Input).
            metadata_csv: ISIC metadata CSV (relative to root) providing ``lesion_id`` groups.
            image_key: image column (``csv`` format).
            caption_key: caption column (``csv``: required; ``derm1m``: default truncated_caption).
            label_key: class-name column (``derm1m`` default disease_label); enables zero-shot evaluation.
            group_key: lesion/patient id column kept on one side of a seeded split.
            split_key: column with train/val/test; if unset, a seeded group split is drawn.
            separator: CSV separator.
            classes: class names in order; default: demo classes, else the sorted labels found.
            val_fraction: fraction of groups for validation in a seeded split.
            test_fraction: fraction of groups for test in a seeded split.
            seed: seed of the split (and of ISIC caption templates).
            on_missing: ``error`` stops at the first row whose image is missing; ``skip`` drops and counts them.
            verify_images: also decode-check every image at setup (slow on large sets).
            batch_size: training batch size per process.
            eval_batch_size: validation/test batch size (default: batch_size).
            num_workers: DataLoader worker processes.
            image_size: image side for the fallback transform when no model provides one.
            demo_lesions_per_class: demo size (two images per lesion).
            demo_image_size: demo JPEG side in pixels.
            cache_dir: where the demo is generated (default ``$MMCLIN_CACHE`` or ``~/.cache/mmclin``).
            predict: studies for ``lightning predict`` instead of the test split: a JSONL of ``{"input", "question",
                "choices"}`` rows (question and choices for QA models), a text file of paths, or one path.
            sampling: how training images are drawn: ``shuffle`` (each once per epoch), ``balanced`` (with
                replacement, each class equally often) or ``sqrt`` (class frequency to the power 1/2, between the
                two). Balanced draws raise the recall of rare classes (balanced accuracy) at some cost in
                overall accuracy; docs/benchmarks.md measures them on HAM10000.
        """
        super().__init__()
        if sampling not in ("shuffle", "balanced", "sqrt"):
            raise ConfigError(f"sampling must be 'shuffle', 'balanced' or 'sqrt', got {sampling!r}")
        if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ConfigError(f"val_fraction + test_fraction must be in [0, 1); got {val_fraction} + {test_fraction}")
        if format == "csv" and (root is None or csv is None or caption_key is None):
            raise ConfigError("format 'csv' needs root, csv and caption_key")
        self.save_hyperparameters()
        self.demo = root is None
        self._table: pd.DataFrame | None = None
        self.skipped = pd.DataFrame(columns=["line", "path", "problem"])  # rows dropped by on_missing: skip
        self.datasets: dict[str, ImageTextDataset] = {}

    # -- where the data is -------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        if self.demo:
            h = self.hparams
            return demo_cache_dir(h.cache_dir) / f"derm-demo-v1-n{h.demo_lesions_per_class}-s{h.demo_image_size}"
        return Path(self.hparams.root)

    @property
    def csv_path(self) -> Path:
        default = {"derm1m": DEMO_CSV, "isic": "ISIC_2019_Training_GroundTruth.csv"}.get(self.hparams.format)
        return self.root / (self.hparams.csv or default)

    def prepare_data(self) -> None:
        if self.demo:
            h = self.hparams
            generate_derm_demo(self.root, h.demo_lesions_per_class, image_size=h.demo_image_size, seed=0)

    def read_table(self) -> pd.DataFrame:
        """The whole dataset as one table with splits assigned (read once, then cached)."""
        if self._table is not None:
            return self._table
        h = self.hparams
        if self.demo:
            self.prepare_data()
        if h.format == "derm1m":
            group_key = h.group_key or ("lesion_id" if self.demo else None)
            table = read_derm1m(self.csv_path, self.root, h.caption_key or "truncated_caption",
                                h.label_key or "disease_label", group_key)
        elif h.format == "isic":
            table = read_isic(self.csv_path, self.root, h.image_dir or "ISIC_2019_Training_Input", h.metadata_csv,
                              seed=h.seed)
        else:
            table = read_image_text_csv(self.csv_path, self.root, h.image_key, h.caption_key, h.label_key,
                                        h.group_key, h.split_key, h.image_dir, h.separator)
        if h.classes:
            labelled = table["label"].ne("")
            unknown = labelled & ~table["label"].isin(h.classes)
            if unknown.any():
                row = table[unknown].iloc[0]
                raise DataError(f"{self.csv_path} line {row['line']}: label '{row['label']}' is not in classes "
                                f"{list(h.classes)}")
        table, self.skipped = check_images(table, str(self.csv_path), h.on_missing, h.verify_images)
        if table.empty:
            raise DataError(f"{self.csv_path}: no usable rows")
        self._table = split_table(table, h.val_fraction, h.test_fraction, h.seed)
        return self._table

    @property
    def classnames(self) -> list[str]:
        """Class names in label order (linked into the model for zero-shot evaluation)."""
        if self.hparams.classes:
            return list(self.hparams.classes)
        if self.demo:
            return list(DEMO_CLASS_NAMES)
        labels = self.read_table()["label"]
        return sorted(set(labels[labels.ne("")]))

    # -- datasets and loaders ------------------------------------------------------------------------
    def _preprocess(self) -> tuple[Callable, Callable, Callable | None]:
        """(train transform, eval transform, tokenizer): the connected model's, else open_clip's default transforms
        at `image_size` and no tokenizer."""
        if self.transforms is not None:
            return (*self.transforms, self.tokenizer)
        from open_clip import image_transform

        size = self.hparams.image_size
        return image_transform(size, is_train=True), image_transform(size, is_train=False), None

    def connect(self, collator: Callable | None = None, transforms: tuple[Callable, Callable] | None = None,
                tokenizer: Callable | None = None, answerer: Callable | None = None) -> None:
        """The model's (train, eval) `transforms` and `tokenizer`, as open_clip pairs them with its weights; the
        splits already set up take them."""
        super().connect(collator, transforms, tokenizer, answerer)
        train_tf, eval_tf, tokenizer = self._preprocess()
        for split, dataset in self.datasets.items():
            dataset.transform, dataset.tokenizer = (train_tf if split == "train" else eval_tf), tokenizer

    def study_item(self, path: str | os.PathLike, question: str | None = None,
                   choices: list[str] | None = None) -> dict:
        """One photograph (JPEG/PNG) of a user's, as the evaluation split gives it: ``{"image", "label": -1,
        "input"}`` (`question` and `choices` are not used: zero-shot classification asks the class names).

        Raises:
            DataError: the file does not decode as an image, or is too small (see :func:`read_image`).
        """
        return {"image": self._preprocess()[1](read_image(path)), "label": -1, "input": str(path)}

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.hparams.predict:  # the listed files only
            return
        table = self.read_table()
        train_tf, eval_tf, tokenizer = self._preprocess()
        for split in ("train", "val", "test"):
            part = table[table["split"] == split]
            tf = train_tf if split == "train" else eval_tf
            self.datasets[split] = ImageTextDataset(part, self.classnames, tf, tokenizer, str(self.csv_path))
        sizes = {k: len(v) for k, v in self.datasets.items()}
        log.info("%s: %s images (%d skipped)", self.csv_path, sizes, len(self.skipped))

    def eval_dataset(self, split: str) -> ImageTextDataset:
        """The images of `split` under the evaluation transform (no augmentation), e.g. for a linear probe."""
        return ImageTextDataset(self.datasets[split].table, self.classnames, self._preprocess()[1], None,
                                str(self.csv_path))

    def sampling_weights(self, split: str = "train") -> np.ndarray | None:
        """Per-image draw weights of `split` for the ``sampling`` setting (None: each image once per epoch)."""
        if self.hparams.sampling == "shuffle":
            return None
        labels = self.datasets[split].table["label"]
        counts = labels.map(labels.value_counts()).to_numpy(dtype=float)
        return counts ** (-1.0 if self.hparams.sampling == "balanced" else -0.5)

    def baselines(self, split: str) -> dict[str, float]:
        """What answering without looking scores on `split`: always the most frequent training class (its accuracy;
        balanced accuracy 1/K over the K classes present, macro AUROC 0.5)."""
        train = self.datasets["train"].table["label"]
        truth = self.datasets[split].table["label"]
        truth = truth[truth.ne("")]
        if truth.empty or train.empty:
            return {}
        majority = train.value_counts().index[0]
        return {"majority_acc": float((truth == majority).mean()), "majority_bacc": 1.0 / truth.nunique()}

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = self.datasets[split]
        if len(dataset) == 0:
            raise DataError(f"{self.csv_path}: the '{split}' split is empty")
        return split_loader(dataset, train, self.trainer, self.hparams, self.sampling_weights(split) if train else None)
