"""Colour fundus photographs: image-report pairs, DR grading tables, YOLO lesion boxes, and a report datamodule.

Readers return one table (pandas) with the columns ``path, report, grade, referral, image_id, split, group,
line`` (``grade`` -1 and ``referral`` "" when unknown; ``line`` is the line in the source file, header =
line 1) so that errors can name the row. Layouts read:

* image-report pairs: CSV ``image, report[, split, grade, referral]`` or a JSON list of such objects;
* APTOS 2019 Blindness Detection (Kaggle): ``train.csv`` ``id_code, diagnosis`` with ``train_images/<id>.png``;
* IDRiD disease grading (Porwal et al., Data 2018): ``Image name, Retinopathy grade, Risk of macular edema``
  (the published header has a trailing space after "edema" and the training CSV empty trailing columns);
* YOLO boxes as in CODRAS (von Csefalvay 2019): ``images/NNNN.txt`` beside ``NNNN.jpg``, lines
  ``class cx cy w h`` normalised to the image, class names in a ``.names`` file.

Grades are on the ICDR scale 0-4 (Wilkinson et al., Ophthalmology 2003), which APTOS and IDRiD both use.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.v2.functional as TF
from monai.transforms.utils import generate_spatial_bounding_box
from PIL import Image, ImageDraw
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import box_convert

from datamodules.images import read_image
from datamodules.synthetic.fundus import ICDR_GRADES, REFERRALS, REPORTS_CSV, fundus_demo_dir, generate_fundus_demo
from datamodules.tables import SPLIT_ALIASES, check_images, split_table
from mmclin.contracts import QADataModule
from mmclin.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_QUESTION = "Describe this fundus photograph: findings, diabetic retinopathy grade and referral."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
TABLE_COLUMNS = ("path", "report", "grade", "referral", "image_id", "split", "group", "line")


# ------------------------------------------------------------------------------------------- images
def load_fundus(path: str | os.PathLike, size: int, crop_border: bool = True, threshold: float = 0.1) -> torch.Tensor:
    """Decode a fundus photograph at reduced scale, crop its black border, resize and centre-crop it.

    JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8; PIL ``draft``) that keeps 1.5 x `size` pixels
    per side, other formats are box-reduced (PIL ``reduce``) to about that, so a 4288x2848 IDRiD photograph
    costs a 536x356 decode. The border crop keeps the bounding box of pixels whose red channel exceeds
    `threshold` (MONAI's foreground box; the fundus is bright in red, the border is black), then the shorter
    side is resized to `size` (antialiased) and the centre square kept.

    Args:
        path: image file (any format PIL reads).
        size: output side in pixels.
        crop_border: crop to the fundus before resizing.
        threshold: red level in [0, 1] separating the fundus from the border.

    Returns:
        (3, size, size) uint8 RGB.

    Raises:
        DataError: the file cannot be decoded, or no pixel is brighter than `threshold` in red.
    """
    im, box = _decode_and_find_fundus(path, size, crop_border, threshold)
    return TF.pil_to_tensor(_to_grid(im.crop(box) if box else im, size))


def _decode_and_find_fundus(path, size: int, crop_border: bool, threshold: float):
    """The photograph decoded at reduced scale (see :func:`load_fundus`) and the (left, top, right, bottom) box of
    the fundus in it (None without `crop_border`)."""
    need = size + size // 2
    im = read_image(path, "RGB", draft_size=need)
    if min(im.size) >= 2 * need:
        im = im.reduce(min(im.size) // need)
    if not crop_border:
        return im, None
    red = np.asarray(im)[None, :, :, 0]  # (1, H, W); numpy, as small torch ops are slow on busy CPUs
    start, end = generate_spatial_bounding_box(red, lambda r: r > threshold * 255)
    if end[0] <= start[0] or end[1] <= start[1]:
        raise DataError(f"'{path}': no fundus found (no pixel with red above {threshold} of full scale)")
    return im, (int(start[1]), int(start[0]), int(end[1]), int(end[0]))


def _to_grid(im: Image.Image, size: int, resample=None) -> Image.Image:
    # torchvision's functional transforms run PIL's kernels on PIL images (antialiased resize)
    resized = TF.resize(im, [size], antialias=True) if resample is None else TF.resize(im, [size], resample)
    return TF.center_crop(resized, [size, size])


def fundus_lesion_mask(path: str | os.PathLike, boxes: pd.DataFrame, size: int, crop_border: bool = True,
                       threshold: float = 0.1) -> torch.Tensor:
    """Where the lesion `boxes` of a photograph lie on the grid :func:`load_fundus` gives it: (size, size) bool.

    Args:
        boxes: :func:`read_yolo_boxes` rows (``cx, cy, w, h`` normalised to the photograph), lesions only.
    """
    im, box = _decode_and_find_fundus(path, size, crop_border, threshold)
    mask = Image.new("L", im.size)
    draw = ImageDraw.Draw(mask)
    for cx, cy, w, h in boxes[["cx", "cy", "w", "h"]].itertuples(index=False):
        draw.rectangle([(cx - w / 2) * im.width, (cy - h / 2) * im.height, (cx + w / 2) * im.width,
                        (cy + h / 2) * im.height], fill=255)
    mask = _to_grid(mask.crop(box) if box else mask, size, TF.InterpolationMode.NEAREST)
    return torch.from_numpy(np.asarray(mask) > 127)


def normalise_fundus(image: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """(3, H, W) uint8 -> float32 ``(x / 255 - mean) / std``."""
    return TF.normalize(image.float() / 255.0, list(mean), list(std))


def preprocess_fundus(path: str | os.PathLike, size: int, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                      crop_border: bool = True, threshold: float = 0.1) -> torch.Tensor:
    """A model-ready (3, size, size) float32 tensor: :func:`load_fundus` then :func:`normalise_fundus`."""
    return normalise_fundus(load_fundus(path, size, crop_border, threshold), mean, std)


# ------------------------------------------------------------------------------------------- tables
def _csv_records(path: Path, required: list[str]) -> pd.DataFrame:
    """All CSV rows as strings, headers stripped of spaces, with each record's (last) line number in ``line``."""
    if not path.is_file():
        raise DataError(f"{path}: CSV file not found")
    rows, lines = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; the file has {header}")
        named = [(i, h) for i, h in enumerate(header) if h]  # IDRiD's training CSV has unnamed empty columns
        for row in reader:
            if any(v.strip() for v in row):  # blank lines and rows of bare commas hold no record
                rows.append({h: row[i] if i < len(row) else "" for i, h in named})
                lines.append(reader.line_num)
    frame = pd.DataFrame(rows, columns=[h for _, h in named], dtype=str)
    frame["line"] = lines
    return frame


def _json_records(path: Path, required: list[str]) -> pd.DataFrame:
    """A JSON list of objects as a table, with the line each object starts on in ``line``."""
    if not path.is_file():
        raise DataError(f"{path}: JSON file not found")
    text = path.read_text(encoding="utf-8-sig")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of objects, got a {type(records).__name__}")
    # json keeps no positions: walk the list once more, decoding element by element, to find each start
    decoder, pos, line, lines = json.JSONDecoder(), text.index("[") + 1, 1 + text.count("\n", 0, text.index("[")), []
    for record in records:
        start = pos
        while text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", start, pos)
        lines.append(line)
        _, end = decoder.raw_decode(text, pos)
        line, pos = line + text.count("\n", pos, end), end
        if not isinstance(record, dict):
            raise DataError(f"{path} line {lines[-1]}: expected an object with {required}, got {record!r:.60}")
        missing = [k for k in required if k not in record]
        if missing:
            raise DataError(f"{path} line {lines[-1]}: missing key(s) {missing}")
    frame = pd.DataFrame([{k: "" if v is None else str(v) for k, v in r.items()} for r in records]).fillna("")
    frame["line"] = lines
    return frame


def _grades(values: pd.Series, lines: pd.Series, source: Path, column: str, top: int = 4) -> np.ndarray:
    """Integer grades 0..`top`; empty means unknown (-1)."""
    out = np.full(len(values), -1, dtype=np.int64)
    for i, (value, line) in enumerate(zip(values, lines)):
        value = value.strip()
        if not value:
            continue
        try:
            grade = float(value)
        except ValueError:
            grade = float("nan")
        if not grade.is_integer() or not 0 <= grade <= top:
            raise DataError(f"{source} line {line}: {column} '{value}' is not an integer grade 0-{top}")
        out[i] = int(grade)
    return out


def _splits(values: pd.Series, lines: pd.Series, source: Path) -> pd.Series:
    """Split names (aliases mapped to train/val/test): all given, or none (a seeded split is drawn later)."""
    values = values.str.strip().str.lower()
    given = values.ne("")
    if given.any() and not given.all():
        raise DataError(f"{source} line {lines[~given].iloc[0]}: split is empty while other rows give one; "
                        "give every row a split or none")
    unknown = given & ~values.isin(SPLIT_ALIASES)
    if unknown.any():
        raise DataError(f"{source} line {lines[unknown].iloc[0]}: split '{values[unknown].iloc[0]}' is not one of "
                        f"{sorted(SPLIT_ALIASES)}")
    return values.map(lambda s: SPLIT_ALIASES.get(s, ""))


def grade_report(grade: int) -> str:
    """The report a grading-only dataset can give: ``Impression: <ICDR grade>, <referral>.``"""
    return f"Impression: {ICDR_GRADES[grade]}, {REFERRALS[grade]}."


def _table(frame: pd.DataFrame, paths: list[str], reports, grades: np.ndarray, referrals, splits) -> pd.DataFrame:
    return pd.DataFrame({"path": paths, "report": list(reports), "grade": grades, "referral": list(referrals),
                         "image_id": [Path(p).stem for p in paths], "split": list(splits), "group": "",
                         "line": frame["line"].to_numpy()})


def read_report_pairs(path: str | os.PathLike, root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read image-report pairs: a CSV, or (``.json``) a JSON list of objects.

    Fields: ``image`` (path relative to `root`, default the file's folder), ``report``, and optionally
    ``split`` (train/val/test, given for every row or none), ``grade`` (ICDR 0-4) and ``referral``.
    """
    path = Path(path)
    read = _json_records if path.suffix.lower() == ".json" else _csv_records
    frame = read(path, ["image", "report"])
    for optional in ("split", "grade", "referral"):
        if optional not in frame.columns:
            frame[optional] = ""
    reports = frame["report"].str.strip()
    if reports.eq("").any():
        raise DataError(f"{path} line {frame['line'][reports.eq('')].iloc[0]}: empty report")
    root = Path(root) if root is not None else path.parent
    paths = [str(root / p.strip()) for p in frame["image"]]
    return _table(frame, paths, reports, _grades(frame["grade"], frame["line"], path, "grade"),
                  frame["referral"].str.strip(), _splits(frame["split"], frame["line"], path))


def read_aptos(csv_path: str | os.PathLike, image_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read APTOS 2019 ``train.csv`` (``id_code, diagnosis`` 0-4); images ``<image_dir>/<id_code>.png``.

    `image_dir` defaults to ``train_images`` beside the CSV. Reports are :func:`grade_report`.
    """
    csv_path = Path(csv_path)
    frame = _csv_records(csv_path, ["id_code", "diagnosis"])
    grades = _grades(frame["diagnosis"], frame["line"], csv_path, "diagnosis")
    if (grades < 0).any():
        raise DataError(f"{csv_path} line {frame['line'][grades < 0].iloc[0]}: empty diagnosis")
    image_dir = Path(image_dir) if image_dir is not None else csv_path.parent / "train_images"
    paths = [str(image_dir / f"{i.strip()}.png") for i in frame["id_code"]]
    return _table(frame, paths, map(grade_report, grades), grades, [REFERRALS[g] for g in grades], [""] * len(frame))


def read_idrid_grading(csv_path: str | os.PathLike, image_dir: str | os.PathLike) -> pd.DataFrame:
    """Read an IDRiD disease-grading CSV; images ``<image_dir>/<Image name>.jpg``.

    Adds ``edema_risk`` (0-2) to the table. Reports are :func:`grade_report` (the DR grade only).
    """
    csv_path = Path(csv_path)
    frame = _csv_records(csv_path, ["Image name", "Retinopathy grade", "Risk of macular edema"])
    grades = _grades(frame["Retinopathy grade"], frame["line"], csv_path, "Retinopathy grade")
    edema = _grades(frame["Risk of macular edema"], frame["line"], csv_path, "Risk of macular edema", top=2)
    if (grades < 0).any():
        raise DataError(f"{csv_path} line {frame['line'][grades < 0].iloc[0]}: empty Retinopathy grade")
    names = [n.strip() for n in frame["Image name"]]
    paths = [str(Path(image_dir) / (n if Path(n).suffix.lower() in IMAGE_SUFFIXES else f"{n}.jpg")) for n in names]
    table = _table(frame, paths, map(grade_report, grades), grades, [REFERRALS[g] for g in grades],
                   [""] * len(frame))
    return table.assign(edema_risk=edema)


# ------------------------------------------------------------------------------------------- YOLO boxes
def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names of a YOLO ``.names`` file, one per line in class-id order (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: class names file not found")
    return [n.strip() for n in path.read_text(encoding="utf-8").splitlines() if n.strip()]


def read_yolo_boxes(txt_path: str | os.PathLike, class_names: list[str], image_size: tuple[int, int] | None = None,
                    on_error: Literal["error", "skip"] = "error") -> pd.DataFrame:
    """Read one YOLO label file: lines ``class cx cy w h``, centre and size normalised to the image.

    Ultralytics is not a dependency, and torchvision has no YOLO reader; the format is five numbers a line.

    Args:
        txt_path: the label file.
        class_names: names by class id.
        image_size: (width, height) in pixels; adds ``x0, y0, x1, y1`` pixel corners.
        on_error: a malformed line (field count, class id, value outside [0, 1], empty box): ``error`` raises
            a DataError naming file and line; ``skip`` drops it and counts it in ``attrs["n_skipped_lines"]``.

    Returns:
        One row per box: ``line, class_id, class_name, cx, cy, w, h`` (+ pixel corners).
    """
    txt_path = Path(txt_path)
    rows, skipped = [], 0
    for line_no, text in enumerate(txt_path.read_text(encoding="utf-8").splitlines(), 1):
        fields = text.split()
        if not fields:
            continue
        problem = None
        if len(fields) != 5:
            problem = f"expected 5 fields 'class cx cy w h', got {len(fields)}"
        else:
            try:
                class_id, values = int(fields[0]), [float(v) for v in fields[1:]]
            except ValueError:
                problem = f"fields must be an integer class and four numbers, got {text.strip()!r}"
            else:
                if not 0 <= class_id < len(class_names):
                    problem = f"class {class_id} outside 0-{len(class_names) - 1} ({len(class_names)} names)"
                elif not all(0.0 <= v <= 1.0 for v in values):
                    problem = f"cx cy w h must be normalised to [0, 1], got {values}"
                elif values[2] <= 0 or values[3] <= 0:
                    problem = f"box has no area: w={values[2]}, h={values[3]}"
        if problem:
            if on_error == "error":
                raise DataError(f"{txt_path} line {line_no}: {problem} (set on_error: skip to drop such lines)")
            skipped += 1
            continue
        rows.append({"line": line_no, "class_id": class_id, "class_name": class_names[class_id],
                     "cx": values[0], "cy": values[1], "w": values[2], "h": values[3]})
    if skipped:
        log.warning("%s: skipped %d malformed line(s)", txt_path, skipped)
    table = pd.DataFrame(rows, columns=["line", "class_id", "class_name", "cx", "cy", "w", "h"])
    if image_size is not None:
        cxcywh = torch.tensor(table[["cx", "cy", "w", "h"]].to_numpy(), dtype=torch.float64).reshape(-1, 4)
        corners = box_convert(cxcywh, "cxcywh", "xyxy") * torch.tensor([*image_size, *image_size], dtype=torch.float64)
        table[["x0", "y0", "x1", "y1"]] = corners.numpy()
    table.attrs["n_skipped_lines"] = skipped
    return table


# ------------------------------------------------------------------------------------------- datamodule
class FundusReportDataset(Dataset):
    """Yields ``{"image": [(3, S, S) float32], "question", "answer": report, "choices": [], "meta"}``.

    ``meta`` holds ``image_id`` and, where the source gives them, ``grade`` (ICDR 0-4) and ``referral``.
    Images come from `images` (uint8, preprocessed at setup) or are loaded on access.
    """

    def __init__(self, table: pd.DataFrame, question: str, size: int, mean, std, crop_border: bool,
                 threshold: float, images: torch.Tensor | None = None, source: str = ""):
        self.table = table.reset_index(drop=True)
        self.question, self.size, self.mean, self.std = question, size, mean, std
        self.crop_border, self.threshold = crop_border, threshold
        self.images = images
        self.source = source

    def __len__(self) -> int:
        return len(self.table)

    def load(self, i: int) -> torch.Tensor:
        """Image `i` as (3, S, S) uint8; a DataError names the source line."""
        row = self.table.iloc[i]
        try:
            return load_fundus(row["path"], self.size, self.crop_border, self.threshold)
        except DataError as e:
            raise DataError(f"{self.source} line {row['line']}: {e}") from e

    def __getitem__(self, i: int) -> dict:
        row = self.table.iloc[i]
        image = self.images[i] if self.images is not None else self.load(i)
        meta = {"image_id": row["image_id"]}
        if row["grade"] >= 0:
            meta["grade"] = int(row["grade"])
        if row["referral"]:
            meta["referral"] = row["referral"]
        return {"image": [normalise_fundus(image, self.mean, self.std)], "question": self.question,
                "answer": row["report"], "choices": [], "meta": meta}


class FundusReportDataModule(QADataModule):
    """Fundus photograph -> report generation (findings, ICDR grade, referral) for a multimodal LM.

    With ``root`` unset a seeded demo (images, YOLO lesion boxes, ``reports.csv``) is generated once into the
    cache (``$MMCLIN_CACHE`` or ``~/.cache/mmclin``). Images are decoded at reduced scale, cropped to the
    fundus, resized to `image_size` (see :func:`load_fundus`) and, with `cache_images`, kept in memory as uint8.
    """

    selection_metric = "val/grade_macro_f1"

    def __init__(
        self,
        root: str | None = None,
        format: Literal["pairs-csv", "pairs-json", "aptos", "idrid"] = "pairs-csv",
        pairs: str | None = None,
        image_dir: str | None = None,
        question: str = DEFAULT_QUESTION,
        image_size: int = 224,
        crop_border: bool = True,
        border_threshold: float = 0.1,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        cache_images: bool = True,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        on_missing: Literal["error", "skip"] = "error",
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        demo_images: int = 600,
        demo_image_size: int = 160,
        cache_dir: str | None = None,
        predict: str | None = None,
    ):
        """
        Args:
            root: dataset directory; unset = generate and use the demo (pairs-csv).
            format: ``pairs-csv`` / ``pairs-json`` (image-report pairs), ``aptos`` (APTOS 2019 train.csv) or
                ``idrid`` (IDRiD disease-grading CSV); the grading formats get reports from the grade.
            pairs: the CSV/JSON file relative to `root` (default reports.csv, reports.json, train.csv; required
                for ``idrid``, e.g. ``2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv``).
            image_dir: image folder relative to `root` (``aptos`` default train_images; required for ``idrid``;
                pairs: image paths are relative to `root`).
            question: the prompt each image is asked with.
            image_size: side of the square model input in pixels.
            crop_border: crop the black border around the fundus before resizing.
            border_threshold: red level in [0, 1] that separates the fundus from the border.
            mean: per-channel normalisation mean (default ImageNet's, as timm backbones expect).
            std: per-channel normalisation standard deviation.
            cache_images: preprocess every image once at setup and keep it in memory (uint8).
            val_fraction: fraction of images for validation when the source gives no split.
            test_fraction: fraction of images for test when the source gives no split.
            seed: seed of that split.
            on_missing: a row whose image file is missing: ``error``, or ``skip`` (dropped, counted in `skipped`).
            batch_size: training batch size.
            eval_batch_size: validation/test batch size (default: batch_size).
            num_workers: DataLoader workers.
            demo_images: demo size (photographs).
            demo_image_size: demo JPEG side in pixels.
            cache_dir: demo location (default ``$MMCLIN_CACHE`` or ``~/.cache/mmclin``).
            predict: photographs for ``lightning predict`` instead of the test split: one path, a ``.txt`` of
                paths or a ``.jsonl`` of ``{"input"}`` rows.
        """
        super().__init__()
        if root is None and format != "pairs-csv":
            raise ConfigError(f"format '{format}' needs a root; the demo (root unset) is in pairs-csv format")
        if format == "idrid" and (pairs is None or image_dir is None):
            raise ConfigError("format 'idrid' needs pairs (the grading CSV) and image_dir")
        if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ConfigError(f"val_fraction + test_fraction must be in [0, 1); got {val_fraction} + {test_fraction}")
        self.save_hyperparameters()
        self.demo = root is None
        self.datasets: dict[str, FundusReportDataset] = {}
        self.skipped = pd.DataFrame(columns=["line", "path", "problem"])

    @property
    def root(self) -> Path:
        if self.demo:
            return fundus_demo_dir(self.hparams.cache_dir, self.hparams.demo_images, self.hparams.demo_image_size)
        return Path(self.hparams.root)

    @property
    def source(self) -> Path:
        """The file the samples are listed in."""
        h = self.hparams
        default = {"pairs-csv": REPORTS_CSV, "pairs-json": "reports.json", "aptos": "train.csv"}.get(h.format)
        return self.root / (h.pairs or default)

    def prepare_data(self) -> None:
        if self.demo:
            h = self.hparams
            generate_fundus_demo(h.cache_dir, seed=0, n_images=h.demo_images, size=h.demo_image_size)

    def read_table(self) -> pd.DataFrame:
        """All usable rows with their split (missing images dropped or rejected per `on_missing`)."""
        h = self.hparams
        if h.format == "aptos":
            table = read_aptos(self.source, self.root / (h.image_dir or "train_images"))
        elif h.format == "idrid":
            table = read_idrid_grading(self.source, self.root / h.image_dir)
        else:
            table = read_report_pairs(self.source, self.root)
        table, self.skipped = check_images(table, str(self.source), h.on_missing)
        if table.empty:
            raise DataError(f"{self.source}: no usable rows")
        return split_table(table, h.val_fraction, h.test_fraction, h.seed)

    def study_item(self, path: str | os.PathLike, question: str | None = None,
                   choices: list[str] | None = None) -> dict:
        """One fundus photograph of a user's, preprocessed as the training split (border crop, size,
        normalisation), with the datamodule's report prompt unless `question` is given.

        Raises:
            DataError: the file does not decode as an image.
        """
        h = self.hparams
        image = load_fundus(path, h.image_size, h.crop_border, h.border_threshold)
        return {"image": [normalise_fundus(image, h.mean, h.std)], "question": question or h.question,
                "answer": "", "choices": list(choices or []), "meta": {"input": str(path)}}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets or (stage == "predict" and self.hparams.predict):  # (the listed photographs only)
            return
        h = self.hparams
        self.prepare_data()
        table = self.read_table()
        for split in ("train", "val", "test"):
            dataset = FundusReportDataset(table[table["split"] == split], h.question, h.image_size, h.mean, h.std,
                                          h.crop_border, h.border_threshold, source=str(self.source))
            if h.cache_images and len(dataset):
                with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
                    dataset.images = torch.stack(list(pool.map(dataset.load, range(len(dataset)))))
            self.datasets[split] = dataset
        log.info("%s: %s images (%d skipped: image missing)", self.source,
                 {k: len(v) for k, v in self.datasets.items()}, len(self.skipped))

    def baselines(self, split: str) -> dict[str, float]:
        """Accuracy and macro-F1 on `split` of always stating the training split's most frequent grade."""
        from mmclin.metrics.f1 import macro_f1

        train, other = self.datasets["train"].table, self.datasets[split].table
        train, other = train[train["grade"] >= 0], other[other["grade"] >= 0]
        if train.empty or other.empty:
            return {}
        majority = int(train["grade"].value_counts().idxmax())
        truth = [ICDR_GRADES[g] for g in other["grade"]]
        return {"majority_grade_acc": float((other["grade"] == majority).mean()),
                "majority_grade_macro_f1": macro_f1(truth, [ICDR_GRADES[majority]] * len(truth)),
                "majority_referral_acc": float(np.mean([REFERRALS[g] == REFERRALS[majority] for g in other["grade"]]))}

    def corpus(self, split: str = "train") -> list[str]:
        """The reports and prompt of `split` (after `setup`): what a fitted tokenizer is trained on
        (``MultimodalLM(tokenizer_vocab=...)``)."""
        return [*self.datasets[split].table["report"], self.hparams.question]

    def lesion_masks(self, split: str, lesion_classes: list[str] | None = None) -> list[torch.Tensor]:
        """Per photograph of `split` (after `setup`), where its lesion boxes lie on the model's grid: (S, S) bool.

        Boxes come from a YOLO label file beside each image (``0001.jpg`` -> ``0001.txt``, as the demo and
        CODRAS-style exports ship them), class names from the ``.names`` file in `root`; `lesion_classes` picks
        the classes that count (default all but ``optic_disc``). A photograph without labels gets an empty mask.

        Raises:
            DataError: no ``.names`` file in `root`; a malformed label line (naming file and line).
        """
        names = sorted(self.root.glob("*.names"))
        if not names:
            raise DataError(f"{self.root}: no .names file of box classes (YOLO labels need one)")
        class_names = read_class_names(names[0])
        keep = set(lesion_classes or [c for c in class_names if c != "optic_disc"])
        h, masks = self.hparams, []
        for path in self.datasets[split].table["path"]:
            labels = Path(path).with_suffix(".txt")
            if not labels.is_file():
                masks.append(torch.zeros(h.image_size, h.image_size, dtype=torch.bool))
                continue
            boxes = read_yolo_boxes(labels, class_names)
            masks.append(fundus_lesion_mask(path, boxes[boxes["class_name"].isin(keep)], h.image_size, h.crop_border,
                                            h.border_threshold))
        return masks

    def _loader(self, split: str, train: bool) -> DataLoader:
        return self.model_batches(self.datasets[split], split, train, self.source, "images")
