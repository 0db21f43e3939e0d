"""CT volumes: checked loading (NIfTI, DICOM series), HU windowing to a fixed grid, an on-disk cache, VQA tables.

Preprocessing follows Merlin (Blankemeier et al., 2024) and CT-CLIP (Hamamci et al., 2024): MONAI's
Orientation, Spacing, HU window -1000..1000 clipped to [0, 1]; as M3D (Bai et al., 2024) the body is
cropped (on HU, before the window) and resized (or padded/cropped, as Merlin) to one grid. Every setting lives
in :class:`CTPreprocessing`, whose ``settings()`` go into configs, checkpoints and the cache key, so "was HU
clipped?" always has an answer.

Volumes come out as float32 ``(1, D, H, W)`` with D, H, W the patient axes of ``orientation`` in reverse
(RAS: D runs inferior -> superior, H posterior -> anterior, W left -> right); the tensor's affine says so.

Input is checked before anything is cached: a DICOM directory must hold one series without missing slices, a
volume must be readable and look like Hounsfield units, a mask must share its CT's voxel grid. Failures raise
:class:`~mmclin.errors.DataError` naming the file or directory; nothing is ever replaced by made-up data.

VQA tables: :func:`read_deeptumorvqa` (Chen et al., arXiv:2505.18915) and :func:`read_m3d_vqa` (M3D-VQA,
Bai et al., arXiv:2404.00578) return one normalised table.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import monai
import numpy as np
import pandas as pd
import pydicom
import torch
from monai.data import NibabelReader, PersistentDataset, PydicomReader
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImage,
    MapTransform,
    Orientationd,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    Spacingd,
)
from pydicom.errors import InvalidDicomError

from datamodules.ct_questions import MIN_CT_SLICES, check_hu, check_volume_shape
from mmclin.errors import ConfigError, DataError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
CACHE_FORMAT = 1  # bump when the cached item layout changes
_AXIS_LETTERS = ("LR", "PA", "IS")  # x, y, z in patient space
_NIBABEL_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # axis codes name RAS+ world directions, as nibabel's


def _axcodes_ok(code: str) -> bool:
    return len(code) == 3 and all(c in pair for c, pair in zip(code.upper(), _AXIS_LETTERS))


@dataclass(frozen=True)
class CTPreprocessing:
    """How a CT volume becomes a model input; every field is in ``settings()``, hence in the cache key."""

    orientation: str = "RAS"  # patient directions of x, y, z (nibabel axis codes); output axes are z, y, x
    spacing: tuple[float, float, float] | None = (3.0, 1.5, 1.5)  # (z, y, x) mm before cropping; None keeps it
    hu_window: tuple[float, float] | None = (-1000.0, 1000.0)  # HU mapped to [0, 1], clipped; None keeps values
    grid: tuple[int, int, int] = (32, 256, 256)  # output (D, H, W) voxels (M3D's 32 x 256 x 256)
    resize_mode: Literal["resize", "pad_crop"] = "resize"  # resize the body crop (M3D) or pad/crop (Merlin)
    foreground_hu: float | None = -500.0  # crop to voxels above this HU (body, not air); None: no crop
    check_hu: bool = True  # refuse volumes that do not look like HU when a window is set

    def __post_init__(self):
        # jsonargparse and JSON hand lists; keep tuples so instances hash and compare by value
        for name in ("spacing", "hu_window", "grid"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "orientation", str(self.orientation).upper())
        if not _axcodes_ok(self.orientation):
            raise ConfigError(f"orientation {self.orientation!r}: expected one letter of L/R, P/A, I/S for x, y, z "
                             "in that order, e.g. 'RAS' or 'LPS'")
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ConfigError(f"spacing {self.spacing}: expected three positive (z, y, x) values in mm, or None")
        if self.hu_window is not None and (len(self.hu_window) != 2 or self.hu_window[0] >= self.hu_window[1]):
            raise ConfigError(f"hu_window {self.hu_window}: expected (low, high) HU with low < high, or None")
        if len(self.grid) != 3 or min(self.grid) < 1:
            raise ConfigError(f"grid {self.grid}: expected three positive (D, H, W) sizes")
        if self.resize_mode not in ("resize", "pad_crop"):
            raise ConfigError(f"resize_mode {self.resize_mode!r}: expected 'resize' or 'pad_crop'")

    def settings(self) -> dict:
        """JSON-able settings (lists for tuples), as stored in configs, checkpoints and cache keys."""
        return json.loads(json.dumps(asdict(self)))

    def cache_key(self) -> str:
        """16 hex digits of the settings, the MONAI version and the cache format."""
        text = json.dumps({"settings": self.settings(), "monai": monai.__version__, "format": CACHE_FORMAT},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def cache_dir(self, base: str | os.PathLike) -> Path:
        """``base/ct-<cache_key>``, with a ``settings.json`` that says what is in it."""
        path = Path(base) / f"ct-{self.cache_key()}"
        path.mkdir(parents=True, exist_ok=True)
        info = path / "settings.json"
        if not info.exists():
            tmp = path / f".settings.json.{os.getpid()}"
            tmp.write_text(json.dumps({"settings": self.settings(), "monai": monai.__version__,
                                       "format": CACHE_FORMAT}, indent=2))
            os.replace(tmp, info)
        return path

    def transforms(self, keys: Sequence[str] = ("image",), mask_key: str | None = None) -> Compose:
        """MONAI dictionary transforms from file path(s) to ``(1, D, H, W)`` tensors.

        Args:
            keys: CT keys of the item (paths: NIfTI file or DICOM series directory); windowed, trilinear.
            mask_key: optional label mask on the grid of ``keys[0]``; nearest-neighbour, not windowed, int64.
        """
        keys = list(keys)
        every = keys + ([mask_key] if mask_key else [])
        nearest = [k == mask_key for k in every]
        steps: list = [
            LoadCTd(every),
            EnsureChannelFirstd(every),
            CheckCTd(keys, mask_key, hu_window=self.hu_window if self.check_hu else None,
                     foreground_hu=self.foreground_hu),
            # Orientation in reverse puts z first: arrays come out (C, z, y, x) = (C, D, H, W), affine included.
            Orientationd(every, axcodes=self.orientation[::-1], labels=_NIBABEL_LABELS),
        ]
        if self.spacing is not None:
            steps.append(Spacingd(every, pixdim=self.spacing,
                                  mode=["nearest" if n else "bilinear" for n in nearest]))
        if self.foreground_hu is not None:  # on HU, before the window, so that any window can go with it
            steps.append(CropForegroundd(every, source_key=keys[0], select_fn=Above(self.foreground_hu),
                                         allow_smaller=True))
        if self.hu_window is not None:
            lo, hi = self.hu_window
            steps.append(ScaleIntensityRanged(keys, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
        if self.resize_mode == "resize":
            steps.append(Resized(every, spatial_size=self.grid, mode=["nearest" if n else "trilinear" for n in nearest],
                                 anti_aliasing=[not n for n in nearest]))
        else:  # pads with 0: air once windowed (-1000 HU with the default window), background for masks
            steps.append(ResizeWithPadOrCropd(every, spatial_size=self.grid))
        steps.append(EnsureTyped(keys, dtype=torch.float32))
        if mask_key:
            steps.append(EnsureTyped(mask_key, dtype=torch.int64))
        return Compose(steps)


@dataclass(frozen=True)
class Above:
    """``select_fn`` of CropForegroundd: voxels above a threshold (a class, so workers can pickle it)."""

    threshold: float

    def __call__(self, image):
        return image > self.threshold


# -- loading and checks ------------------------------------------------------------------------------------
def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


class LoadCTd(MapTransform):
    """Load each key's NIfTI file (nibabel) or DICOM series directory (pydicom) with MONAI ``LoadImage``.

    MONAI's ``LoadImaged`` would do, but it stacks a DICOM directory whatever is in it and lets a truncated
    file fail with a message that does not name it: here the series is checked first
    (:func:`check_dicom_series`) and any read failure becomes a DataError naming the path. The readers are
    pinned rather than chosen by which libraries are installed, so the same file always reads the same way.
    """

    def __init__(self, keys: Sequence[str]):
        super().__init__(keys)
        with warnings.catch_warnings():  # LoadImage builds every MONAI reader, also a GPU decoder never used here
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            self.load = LoadImage(image_only=True, dtype=np.float32)
        self.nifti, self.dicom = NibabelReader(), PydicomReader()

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            path = Path(d[key])
            reader = self.dicom if check_ct_source(path) == "dicom" else self.nifti
            try:
                d[key] = self.load(str(path), reader=reader)
            except Exception as err:
                kind = "DICOM series" if reader is self.dicom else "NIfTI file"
                raise DataError(f"{path}: cannot read this {kind} ({_first_line(err)}); is it truncated or "
                                "corrupt?") from err
        return d


class CheckCTd(MapTransform):
    """After loading: one finite 3D volume per key, at least MIN_CT_SLICES voxels along every axis, HU-like
    values, a foreground, and a mask on the CT's grid."""

    def __init__(self, keys: Sequence[str], mask_key: str | None = None,
                 hu_window: tuple[float, float] | None = None, foreground_hu: float | None = None):
        """
        Args:
            keys: CT keys.
            mask_key: mask that must share the voxel grid (shape and affine) of ``keys[0]``.
            hu_window: when set, a volume without any negative value is refused as not HU.
            foreground_hu: when set, a volume with no voxel above it (nothing to crop to) is refused.
        """
        super().__init__(keys)
        self.mask_key, self.hu_window, self.foreground_hu = mask_key, hu_window, foreground_hu

    def __call__(self, data: dict) -> dict:
        for key in [*self.key_iterator(data), *([self.mask_key] if self.mask_key else [])]:
            image = data[key]
            if image.ndim != 4 or image.shape[0] != 1:
                raise DataError(f"{_source(image)}: expected one 3D volume, got an array of shape "
                                f"{tuple(image.shape[1:]) if image.shape[0] == 1 else tuple(image.shape)}")
            check_volume_shape(_source(image), tuple(image.shape[1:]))
        for key in self.key_iterator(data):
            image = data[key]
            name = _source(image)
            if not torch.isfinite(image).all():
                raise DataError(f"{name}: {int((~torch.isfinite(image)).sum())} voxel(s) are NaN or infinite")
            lo, hi = float(image.min()), float(image.max())
            if self.hu_window is not None:
                check_hu(name, lo, hi, override="check_hu=False (or hu_window=None to use them unwindowed)")
            if self.foreground_hu is not None and hi <= self.foreground_hu:
                raise DataError(f"{name}: no voxel above foreground_hu={self.foreground_hu:g} (values {lo:g}..{hi:g});"
                                " nothing to crop to. Set foreground_hu=None to skip the crop")
        if self.mask_key:
            ct, mask = data[self.first_key(data)], data[self.mask_key]
            same_shape = ct.shape[1:] == mask.shape[1:]
            same_affine = np.allclose(np.asarray(ct.affine), np.asarray(mask.affine), atol=1e-3)
            if not (same_shape and same_affine):
                raise DataError(
                    f"mask {_source(mask)} is not on the grid of CT {_source(ct)}: shape {tuple(mask.shape[1:])} vs "
                    f"{tuple(ct.shape[1:])}, affine {np.round(np.asarray(mask.affine), 3).tolist()} vs "
                    f"{np.round(np.asarray(ct.affine), 3).tolist()}")
        return data


def _source(image) -> str:
    meta = getattr(image, "meta", {})
    return str(meta.get("filename_or_obj", "<in-memory volume>"))


def check_ct_source(path: str | os.PathLike) -> Literal["nifti", "dicom"]:
    """What a CT path is ("nifti" or "dicom"); raises DataError when it is neither or is a broken series."""
    path = Path(path)
    if path.is_dir():
        check_dicom_series(path)
        return "dicom"
    if not path.exists():
        raise DataError(f"{path}: CT volume not found")
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise DataError(f"{path}: unsupported CT file; expected a NIfTI file ({', '.join(NIFTI_SUFFIXES)}) or a "
                        "directory holding one DICOM series")
    return "nifti"


def check_dicom_series(directory: str | os.PathLike, gap_factor: float = 1.5) -> list[Path]:
    """Check that a directory holds one complete CT series; return its files in stacking order.

    MONAI's PydicomReader stacks every readable file of a directory in InstanceNumber order and takes the mean
    slice distance as spacing, so a mixed or gappy directory would load as a wrong volume without complaint.

    Args:
        directory: the series directory.
        gap_factor: a step between neighbouring slices above ``gap_factor`` x the median step is a missing slice.

    Raises:
        DataError: no DICOM files, sub-folders, more than one SeriesInstanceUID, a non-CT modality, missing
            geometry tags, differing orientations, duplicate InstanceNumbers or positions, an InstanceNumber order
            that does not follow the slice positions, or missing slices. The message names the directory.
    """
    directory = Path(directory)
    entries = sorted(directory.iterdir())
    if any(p.is_dir() for p in entries):
        raise DataError(f"{directory}: contains sub-folders; expected a directory holding the files of one series")
    slices = []
    for path in entries:
        try:
            slices.append((path, pydicom.dcmread(path, stop_before_pixels=True)))
        except InvalidDicomError:
            continue  # as MONAI's reader: files without a DICOM preamble are not part of the series
    if not slices:
        raise DataError(f"{directory}: no DICOM files")
    series = Counter(str(ds.get("SeriesInstanceUID", "<none>")) for _, ds in slices)
    if len(series) > 1:
        listed = ", ".join(f"{uid} ({n} files)" for uid, n in series.most_common())
        raise DataError(f"{directory}: mixes {len(series)} series (SeriesInstanceUID {listed}); expected one series "
                        "per directory")
    modalities = {str(ds.get("Modality", "")) for _, ds in slices} - {""}
    if modalities - {"CT"}:
        raise DataError(f"{directory}: Modality {sorted(modalities)}; expected CT")
    for path, ds in slices:
        missing = [t for t in ("InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
                   if ds.get(t) is None]
        if missing:
            raise DataError(f"{path}: DICOM slice lacks {missing}; cannot place it in the volume")
    if len(slices) < MIN_CT_SLICES:
        raise DataError(f"{directory}: {len(slices)} slice(s) ({slices[0][0].name}); a CT volume needs at least "
                        f"{MIN_CT_SLICES} slices (a single slice is not a volume)")
    orientation = np.array(slices[0][1].ImageOrientationPatient, dtype=float)
    for path, ds in slices:
        if not np.allclose(np.array(ds.ImageOrientationPatient, dtype=float), orientation, atol=1e-4):
            raise DataError(f"{directory}: {path.name} has ImageOrientationPatient {list(ds.ImageOrientationPatient)}"
                            f", {slices[0][0].name} {orientation.tolist()}; expected one orientation per series")
    slices.sort(key=lambda s: int(s[1].InstanceNumber))  # MONAI's stacking order
    numbers = [int(ds.InstanceNumber) for _, ds in slices]
    if len(set(numbers)) != len(numbers):
        twice = sorted(n for n, c in Counter(numbers).items() if c > 1)
        raise DataError(f"{directory}: InstanceNumber {twice[:5]} occurs more than once")
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([np.dot(np.array(ds.ImagePositionPatient, dtype=float), normal) for _, ds in slices])
    steps = np.diff(positions)
    if not (np.all(steps > 0) or np.all(steps < 0)):
        i = int(np.flatnonzero(np.sign(steps) != np.sign(np.median(steps)))[0])
        raise DataError(f"{directory}: slice positions do not follow InstanceNumber order ({slices[i][0].name} at "
                        f"{positions[i]:.2f} mm, {slices[i + 1][0].name} at {positions[i + 1]:.2f} mm), or two slices "
                        "share a position")
    steps = np.abs(steps)
    median = float(np.median(steps))
    gaps = np.flatnonzero(steps > gap_factor * median)
    if len(gaps):
        i = int(gaps[0])
        raise DataError(f"{directory}: missing slice(s): a {steps[i]:.2f} mm gap between {slices[i][0].name} and "
                        f"{slices[i + 1][0].name} (positions {positions[i]:.2f} and {positions[i + 1]:.2f} mm) where "
                        f"the median slice step is {median:.2f} mm ({len(gaps)} gap(s) in all)")
    return [path for path, _ in slices]


@contextlib.contextmanager
def data_errors() -> Iterator[None]:
    """Re-raise a DataError that MONAI's ``Compose`` wrapped in RuntimeError("applying transform ...")."""
    found: BaseException | None = None
    try:
        yield
    except RuntimeError as err:
        found = err.__cause__
        while found is not None and not isinstance(found, DataError):
            found = found.__cause__
        if found is None:
            raise
    if found is not None:  # raised outside the handler, so its chain stays as the DataError's own
        raise found


def load_ct(path: str | os.PathLike, preprocessing: CTPreprocessing | None = None,
            mask: str | os.PathLike | None = None) -> dict:
    """One CT (and mask) through `preprocessing`, uncached: ``{"image": (1, D, H, W)[, "mask": ...]}``."""
    preprocessing = preprocessing or CTPreprocessing()
    item = {"image": str(path)} | ({"mask": str(mask)} if mask is not None else {})
    with data_errors():
        return preprocessing.transforms(("image",), "mask" if mask is not None else None)(item)


def source_stamp(path: str | os.PathLike) -> str:
    """Size and modification time of a file, or of every file of a directory: part of the cache key."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: CT volume not found")
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    stats = [p.stat() for p in files]
    return f"{len(files)}:{sum(s.st_size for s in stats)}:{max((s.st_mtime_ns for s in stats), default=0)}"


class CTVolumeDataset(PersistentDataset):
    """CT volumes preprocessed once and kept on disk (MONAI PersistentDataset: atomic writes).

    The cache lives in ``cache_dir/ct-<hash of the preprocessing settings>``: other settings never read a
    stale cache. Within it an item is keyed by its path and the files' size and modification time, so an
    edited or replaced volume is preprocessed again. Items are ``{"image": (1, D, H, W) float32, "mask":
    (1, D, H, W) int64 (if masks are given), "path": str}``.
    """

    def __init__(self, volumes: Sequence[str | os.PathLike], preprocessing: CTPreprocessing,
                 cache_dir: str | os.PathLike | None, masks: Sequence[str | os.PathLike] | None = None):
        """
        Args:
            volumes: NIfTI files or DICOM series directories.
            preprocessing: the settings.
            cache_dir: base directory of the cache; None preprocesses on every access.
            masks: one label mask per volume, on its grid.
        """
        if masks is not None and len(masks) != len(volumes):
            raise ConfigError(f"{len(masks)} masks for {len(volumes)} volumes")
        items = []
        for i, volume in enumerate(volumes):
            item = {"image": str(volume), "path": str(volume), "stamp": source_stamp(volume)}
            if masks is not None:
                item |= {"mask": str(masks[i]), "mask_stamp": source_stamp(masks[i])}
            items.append(item)
        self.preprocessing = preprocessing
        super().__init__(items, transform=preprocessing.transforms(("image",), "mask" if masks is not None else None),
                         cache_dir=preprocessing.cache_dir(cache_dir) if cache_dir is not None else None,
                         track_meta=False)

    def _transform(self, index: int):
        with data_errors():
            return super()._transform(index)


# -- VQA tables --------------------------------------------------------------------------------------------
VQA_COLUMNS = ["image_id", "image_path", "question", "answer", "choices", "answer_letter", "question_type",
               "question_subtype", "value", "split", "record"]
LETTERS = "ABCDEFGHIJ"
# M3D-VQA "Question Type" codes (dataset card): the five topics of its multiple-choice questions.
M3D_QUESTION_TYPES = {1: "plane", 2: "phase", 3: "organ", 4: "abnormality", 5: "location"}
M3D_COLUMNS = ["Image Path", "Question Type", "Question", "Answer"]
_PLAIN_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)")


def _normalise_type(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return re.sub(r"[\s-]+", "_", str(value).strip().lower())


def split_options(text: str) -> tuple[str, list[str]]:
    """Split "stem A: x B: y ..." (also "A." / "A)" / "(A)") into the stem and the options, in letter order."""
    starts, pos = [], 0
    for letter in LETTERS:
        match = re.compile(rf"(?:^|(?<=\s))\(?{letter}[:.)]\s*").search(text, pos)
        if match is None:
            break
        starts.append(match)
        pos = match.end()
    if len(starts) < 2:
        return text.strip(), []
    ends = [m.start() for m in starts[1:]] + [len(text)]
    return text[:starts[0].start()].strip(), [text[m.end():e].strip().rstrip(",;") for m, e in zip(starts, ends)]


def _numeric_value(where: str, value, answer: str) -> float | None:
    """The true number of a numeric question: the record's ``value``, else an answer that is a plain number."""
    if value is not None and value != "":
        try:
            return float(value)
        except (TypeError, ValueError) as err:
            raise DataError(f"{where}: value {value!r} is not a number") from err
    return float(answer) if _PLAIN_NUMBER.fullmatch(str(answer).strip()) else None


def _choices_and_letter(where: str, choices, letter, answer: str) -> tuple[list[str], str | None]:
    """Check a question's options against its letter (derived from the answer when absent)."""
    choices = [str(c) for c in choices]
    letter = None if letter is None or (isinstance(letter, float) and math.isnan(letter)) else str(letter).strip()
    letter = letter.upper().strip("().:") if letter else None
    if not choices:
        return [], letter
    if letter is None:
        matches = [i for i, c in enumerate(choices) if c.strip().lower() == str(answer).strip().lower()]
        letter = LETTERS[matches[0]] if len(matches) == 1 else None
    elif len(letter) != 1 or LETTERS.find(letter) not in range(len(choices)):
        raise DataError(f"{where}: correct option {letter!r} is not one of the {len(choices)} options "
                        f"{list(LETTERS[:len(choices)])}")
    return choices, letter


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: questions file not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return pd.read_csv(path, keep_default_na=False).to_dict("records")
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path} line {line_no}: not valid JSON ({err})") from err
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err
    records = data.get("questions") if isinstance(data, dict) else data  # test_qa.json nests them under "questions"
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of question records or an object with a 'questions' list")
    return records


def read_deeptumorvqa(path: str | os.PathLike) -> pd.DataFrame:
    """Read DeepTumorVQA question records (JSON list, ``{"questions": [...]}`` as test_qa.json, JSONL or CSV).

    Record fields (release schema): ``image_id``, ``question``, ``answer``, and optionally ``qid``, ``spacing``,
    ``shape``, ``mc_question`` (the question with its options, "... A: x B: y ..."), ``correct_option``
    (letter), ``organ``, ``lesion``, ``question_type`` ("medical reasoning" ...), ``question_subtype``. Also
    accepted: ``choices`` (list of options) with ``answer_letter``, ``image_path``, ``split``.

    Returns:
        Columns ``image_id, image_path, question, answer, choices`` (list, empty for open questions),
        ``answer_letter`` (or None), ``question_type`` (lower case, underscores: ``medical_reasoning``),
        ``question_subtype``, ``value`` (the true number of a numeric question: the record's ``value``, else an
        answer that is a plain number; or None), ``split, record`` (``file:index``), plus ``qid, organ, lesion,
        answer_type, spacing, shape, mask_path`` when present.

    Raises:
        DataError: unreadable file, a record missing image_id/question/answer, a correct option outside the
            options. Messages name the file and record.
    """
    path = Path(path)
    rows, extras = [], ("qid", "organ", "lesion", "answer_type", "spacing", "shape", "mask_path")
    for i, rec in enumerate(_read_records(path)):
        where = f"{path} record {i}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object with fields image_id, question, answer")
        missing = [k for k in ("image_id", "question", "answer") if rec.get(k) in (None, "")]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing}; the record has {sorted(rec)}")
        choices = rec.get("choices") or []
        if isinstance(choices, str):  # a list stored in a CSV cell
            try:
                choices = ast.literal_eval(choices)
            except (ValueError, SyntaxError) as err:
                raise DataError(f"{where}: choices {choices!r} is not a list literal") from err
        if not choices and rec.get("mc_question"):
            choices = split_options(str(rec["mc_question"]))[1]
        letter = rec.get("answer_letter", rec.get("correct_option"))
        choices, letter = _choices_and_letter(where, choices, letter or None, rec["answer"])
        rows.append({"image_id": str(rec["image_id"]), "image_path": rec.get("image_path") or None,
                     "question": str(rec["question"]), "answer": str(rec["answer"]), "choices": choices,
                     "answer_letter": letter, "question_type": _normalise_type(rec.get("question_type")),
                     "question_subtype": rec.get("question_subtype") or None,
                     "value": _numeric_value(where, rec.get("value"), rec["answer"]), "split": rec.get("split") or None,
                     "record": f"{path}:{i}"} | {k: rec[k] for k in extras if k in rec})
    present = [k for k in extras if any(k in r for r in rows)]
    return pd.DataFrame(rows, columns=VQA_COLUMNS + present, dtype=object)  # object: None stays None


def read_m3d_vqa(path: str | os.PathLike) -> pd.DataFrame:
    """Read an M3D-VQA CSV (``M3D_VQA_{train,val,test,test5k}.csv``).

    Columns of the release: ``Image Path, Text, Question Type`` (1-5: plane, phase, organ, abnormality,
    location), ``Question, Choice A, Choice B, Choice C, Choice D, Answer, Answer Choice`` (letter); the test
    file adds ``Note``. The released volumes are preprocessed ``.npy`` arrays (already in [0, 1], no HU, no
    geometry): pair these questions with the source NIfTI/DICOM volumes to use the CT pipeline.

    Returns:
        The table of :func:`read_deeptumorvqa` (``image_id`` is the image path without its suffix; ``split``
        from the file name), plus ``text``.

    Raises:
        DataError: missing columns (naming the file and them), a correct option outside the options.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: M3D-VQA CSV not found")
    table = pd.read_csv(path, keep_default_na=False)
    missing = [c for c in M3D_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the file has {list(table.columns)}")
    choice_columns = [f"Choice {x}" for x in LETTERS if f"Choice {x}" in table.columns]
    match = re.search(r"_(train|val|test)\w*\.csv$", path.name, re.IGNORECASE)
    split = match.group(1).lower() if match else None
    rows = []
    for i, row in enumerate(table.to_dict("records")):
        where = f"{path} line {i + 2}"
        qtype = row["Question Type"]
        qtype = M3D_QUESTION_TYPES.get(int(qtype)) if str(qtype).strip().isdigit() else _normalise_type(qtype)
        choices = [str(row[c]) for c in choice_columns if str(row[c]).strip()]
        choices, letter = _choices_and_letter(where, choices, row.get("Answer Choice") or None, row["Answer"])
        image_path = str(row["Image Path"])
        rows.append({"image_id": re.sub(r"(\.nii)?\.[A-Za-z0-9]+$", "", image_path), "image_path": image_path,
                     "question": str(row["Question"]), "answer": str(row["Answer"]), "choices": choices,
                     "answer_letter": letter, "question_type": qtype, "question_subtype": None,
                     "value": _numeric_value(where, None, row["Answer"]), "split": split,
                     "record": f"{path}:{i + 2}", "text": row.get("Text")})
    return pd.DataFrame(rows, columns=VQA_COLUMNS + ["text"], dtype=object)
