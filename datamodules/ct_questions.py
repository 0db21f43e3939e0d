"""Multiple-choice questions about an abdominal CT volume, answered from its label mask (DeepTumorVQA-style).

Questions follow the four categories of DeepTumorVQA (Chen et al., arXiv:2505.18915), with their subtype
names where one exists: ``measurement`` (organ volume, organ mean HU, largest lesion volume), ``recognition``
(which organ is missing, which organ of a set or of a pair holds a lesion), ``visual_reasoning`` (lesion
counting, left vs right kidney, larger vs smaller organ, largest lesion diameter and location) and
``medical_reasoning`` (lesion attenuation type, splenomegaly).

Inputs: a CT volume in HU and a multi-label mask on the same grid with TotalSegmentator v2 ``total`` label ids
(Wasserthal et al., Radiol AI 2023; ``spleen`` 1, ``kidney_right`` 2, ``kidney_left`` 3, ``gallbladder`` 4,
``liver`` 5, ``stomach`` 6, ``pancreas`` 7, ...). Lesions are other label ids given as ``lesion_labels``
{label id: host organ}: the demo CT data use 201-204 (``datamodules.synthetic.ct.DEMO_LESION_LABELS``);
TotalSegmentator's own kidney cysts are ``{23: "kidney_left", 24: "kidney_right"}``.

Measurements (nibabel/numpy/scipy): an organ's volume is its voxels plus its lesions' voxels times the voxel
volume |det(affine[:3, :3])|, in mL; its mean HU is over its own label (lesions excluded); lesions are the
26-connected components of its lesion labels; a lesion's diameter is the largest distance between two points
of its voxels (maximum Feret diameter, world mm). An organ with no voxel in the mask gets no measurement
question, and an organ cut by the scan's edge is measured as "the visible part" and left out of size
comparisons; both are listed in the notes returned beside the questions.

Each record holds ``qid, image_id, image_path, mask_path, spacing, shape, question, choices`` (4 option texts),
``answer`` (the correct option's text, also the free-form answer; numbers rounded to 2 significant digits),
``answer_letter`` (A-D), ``question_type, question_subtype, answer_type`` (numeric | categorical), ``organ``
(TotalSegmentator name(s), comma-joined, or None), ``lesion`` (whether the question is about lesions) and
``value`` (the measured number, 7 significant digits, for relative-accuracy scoring of numeric questions; None
otherwise). Numeric options are the true value and
three others on a ladder of factor sqrt(2) (x0.35 ... x2.8; HU on a ladder of 15 HU), the true one at a
random rank; the correct letter cycles through shuffled A-D blocks, so letters are balanced.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

from mmclin.errors import ConfigError, DataError

# TotalSegmentator v2 task "total": label id = position + 1 (totalsegmentator/map_to_binary.py, class_map["total"]).
TOTALSEGMENTATOR_V2_CLASSES = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas", "adrenal_gland_right",
    "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
    "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus", "trachea", "thyroid_gland", "small_bowel",
    "duodenum", "colon", "urinary_bladder", "prostate", "kidney_cyst_left", "kidney_cyst_right", "sacrum",
    "vertebrae_S1", *(f"vertebrae_L{i}" for i in range(5, 0, -1)), *(f"vertebrae_T{i}" for i in range(12, 0, -1)),
    *(f"vertebrae_C{i}" for i in range(7, 0, -1)), "heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk",
    "subclavian_artery_right", "subclavian_artery_left", "common_carotid_artery_right", "common_carotid_artery_left",
    "brachiocephalic_vein_left", "brachiocephalic_vein_right", "atrial_appendage_left", "superior_vena_cava",
    "inferior_vena_cava", "portal_vein_and_splenic_vein", "iliac_artery_left", "iliac_artery_right",
    "iliac_vena_left", "iliac_vena_right", "humerus_left", "humerus_right", "scapula_left", "scapula_right",
    "clavicula_left", "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right", "spinal_cord",
    "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left", "gluteus_medius_right",
    "gluteus_minimus_left", "gluteus_minimus_right", "autochthon_left", "autochthon_right", "iliopsoas_left",
    "iliopsoas_right", "brain", "skull", *(f"rib_left_{i}" for i in range(1, 13)),
    *(f"rib_right_{i}" for i in range(1, 13)), "sternum", "costal_cartilages",
)
TOTALSEGMENTATOR_LABELS = {name: i + 1 for i, name in enumerate(TOTALSEGMENTATOR_V2_CLASSES)}
DEFAULT_ORGANS = ("liver", "spleen", "kidney_right", "kidney_left")
QUESTION_TYPES = ("recognition", "measurement", "visual_reasoning", "medical_reasoning")
LETTERS = "ABCD"

# Volumetric splenomegaly thresholds, 1 and 2.5 SD above the healthy mean (Linguraru et al., Acad Radiol 2013,
# doi:10.1016/j.acra.2013.01.011): mild > 314.5 mL, massive > 503.4 mL.
SPLENOMEGALY_ML = (314.5, 503.4)
# Fluid attenuation of a simple cyst: -9 to 20 HU (Bosniak classification v2019, Silverman et al., Radiology
# 2019, doi:10.1148/radiol.2019182646).
FLUID_MAX_HU = 20.0
ATTENUATION_MARGIN_HU = 10.0  # a lesion within +-10 HU of its organ reads as isodense
SIZE_RATIO_BIN = 1.25  # comparisons: "by 25% or more" vs "by less than 25%"
NUMERIC_RATIO = math.sqrt(2.0)  # ladder of numeric options: x0.35, x0.5, x0.71, x1, x1.41, x2, x2.83
HU_STEP = 15.0  # ladder of HU options
LESION_TYPES = ("hypodense with fluid attenuation (cyst-like)", "hypodense with soft-tissue attenuation (solid)",
                "isodense to the organ", "hyperdense (enhancing)")
SPLEEN_GRADES = (f"normal size (below {SPLENOMEGALY_ML[0]:g} mL)",
                 f"mild splenomegaly ({SPLENOMEGALY_ML[0]:g}-{SPLENOMEGALY_ML[1]:g} mL)",
                 f"massive splenomegaly (above {SPLENOMEGALY_ML[1]:g} mL)", "no spleen is visible in the scan")
NONE_OF_THESE = "none of these organs"
_CORNERS = np.array(list(itertools.product((-0.5, 0.5), repeat=3)))


@dataclass(frozen=True)
class Lesion:
    """One connected lesion."""

    organ: str  # host organ (TotalSegmentator name)
    n_voxels: int
    volume_ml: float
    mean_hu: float
    diameter_mm: float  # maximum Feret diameter of its voxels, world mm


@dataclass(frozen=True)
class OrganMeasure:
    """An organ's measurements; `n_voxels` counts its lesions' voxels too."""

    name: str
    n_voxels: int
    volume_ml: float
    mean_hu: float | None  # parenchyma (lesions excluded); None without parenchyma voxels
    truncated: bool  # touches the edge of the scan
    lesions: tuple[Lesion, ...] = field(default=())  # largest first

    @property
    def largest_lesion(self) -> Lesion | None:
        return self.lesions[0] if self.lesions else None


def organ_phrase(name: str) -> str:
    """``kidney_right`` -> ``right kidney``, ``urinary_bladder`` -> ``urinary bladder``."""
    words = name.split("_")
    if words[-1] in ("left", "right"):
        words = [words[-1], *words[:-1]]
    return " ".join(words)


def check_hu(name: str, lo: float, hi: float, override: str = "check_hu=False") -> None:
    """Refuse a volume whose values (`lo`..`hi`) cannot be Hounsfield units: none negative, where a CT in HU has
    air near -1000 and fat near -100 (an 8-bit or 0-based export). Every CT entry point (datamodules, tools)
    gives this one message; `override` names the switch that accepts the values anyway."""
    if lo >= 0:
        raise DataError(
            f"{name}: looks like it is not in Hounsfield units (values {lo:g}..{hi:g}, none negative; a CT "
            f"in HU has air near -1000 and fat near -100). Convert it to HU, or set {override} if the "
            f"values are HU after all")


# Fewest voxels a CT may have along any axis. One voxel is a single image, not a volume: resized or padded to a
# model's grid it would become a made-up volume. Every CT route refuses it (NIfTI, DICOM, datamodules, `mmclin
# predict`, tools); real series start at a few slices (../shared/data has a real 3-slice DICOM series).
MIN_CT_SLICES = 2


def check_volume_shape(name: str, shape: Sequence[int]) -> None:
    """Refuse a CT whose (X, Y, Z) `shape` has fewer than :data:`MIN_CT_SLICES` voxels along an axis."""
    if min(shape) < MIN_CT_SLICES:
        raise DataError(f"{name}: {' x '.join(map(str, shape))} voxels; a CT volume needs at least {MIN_CT_SLICES} "
                        "slices along every axis (a single slice is not a volume)")


def load_ct_and_mask(ct_path: str | os.PathLike, mask_path: str | os.PathLike, hu: bool = True,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a CT (HU, scaling applied) and its label mask; check they share one grid and, with `hu`, that the CT
    is in HU (`check_hu`).

    Returns:
        ``(hu, labels, affine)``: (X, Y, Z) float32 HU, (X, Y, Z) int32 label ids, (4, 4) voxel-to-world (mm).

    Raises:
        DataError: a file is unreadable, not 3-D or thinner than MIN_CT_SLICES, the CT holds NaN or (with `hu`) no
            negative value, the mask holds non-integer or negative labels, or the two differ in shape or affine
            (naming both files).
    """
    images = []
    for path in (ct_path, mask_path):
        try:
            image = nib.load(path)
        except Exception as err:  # nibabel raises several types for unreadable files
            raise DataError(f"{path}: not a readable NIfTI file ({err})") from err
        if len(image.shape) == 4 and image.shape[3] == 1:
            image = image.slicer[..., 0]
        if len(image.shape) != 3:
            raise DataError(f"{path}: expected a 3-D volume, got shape {image.shape}")
        check_volume_shape(str(path), image.shape)
        images.append(image)
    ct, mask = images
    if ct.shape != mask.shape or not np.allclose(ct.affine, mask.affine, atol=1e-3):
        raise DataError(f"mask {mask_path} is not on the grid of CT {ct_path}: shape {mask.shape} vs {ct.shape}, "
                        f"affine\n{np.round(mask.affine, 4)}\nvs\n{np.round(ct.affine, 4)}")
    labels = np.asanyarray(mask.dataobj)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.array_equal(labels, np.round(labels)):
            raise DataError(f"{mask_path}: label mask holds non-integer values")
    if labels.min() < 0:
        raise DataError(f"{mask_path}: label mask holds negative values")
    values = ct.get_fdata(dtype=np.float32)
    if not np.isfinite(values).all():
        raise DataError(f"{ct_path}: {int((~np.isfinite(values)).sum())} voxel(s) are NaN or infinite")
    if hu:
        check_hu(str(ct_path), float(values.min()), float(values.max()), override="--no-check-hu (hu=False)")
    return values, labels.astype(np.int32), ct.affine


def _feret_diameter_mm(component: np.ndarray, affine: np.ndarray) -> float:
    """Largest distance (mm) between two points of a boolean component's voxels (as cubes, in world space)."""
    boundary = component & ~ndimage.binary_erosion(component)
    corners = (np.argwhere(boundary)[:, None, :] + _CORNERS[None]).reshape(-1, 3) @ affine[:3, :3].T
    if len(corners) > 64:
        try:
            corners = corners[ConvexHull(corners).vertices]
        except QhullError:  # degenerate hull: fall back to all points
            pass
    return float(pdist(corners).max())


def measure_organs(hu: np.ndarray, labels: np.ndarray, affine: np.ndarray, organs: Sequence[str] = DEFAULT_ORGANS,
                   lesion_labels: Mapping[int, str] | None = None, organ_labels: Mapping[str, int] | None = None,
                   ) -> dict[str, OrganMeasure]:
    """Volume, mean HU and lesions of each organ.

    Args:
        hu: (X, Y, Z) HU.
        labels: (X, Y, Z) label ids on the same grid.
        affine: (4, 4) voxel-to-world, mm.
        organs: organ names (keys of `organ_labels`).
        lesion_labels: {lesion label id: host organ name}.
        organ_labels: {organ name: label id}; default TotalSegmentator v2.
    """
    organ_labels = TOTALSEGMENTATOR_LABELS if organ_labels is None else organ_labels
    lesion_labels = dict(lesion_labels or {})
    unknown = [o for o in organs if o not in organ_labels]
    if unknown:
        raise ConfigError(f"unknown organ(s) {unknown}; known: {sorted(organ_labels)}")
    clash = sorted(set(lesion_labels) & {organ_labels[o] for o in organs})
    if clash:
        raise ConfigError(f"lesion label id(s) {clash} are also organ ids")
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    structure = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity
    out = {}
    for organ in organs:
        own = labels == organ_labels[organ]
        lesion_mask = np.isin(labels, [k for k, host in lesion_labels.items() if host == organ])
        whole = own | lesion_mask
        n = int(whole.sum())
        truncated = n > 0 and any(whole.take(i, axis=a).any() for a in range(3) for i in (0, -1))
        components = ndimage.label(lesion_mask, structure=structure)[0] if lesion_mask.any() else lesion_mask
        lesions = []
        for box_index, box in enumerate(ndimage.find_objects(components) if lesion_mask.any() else [], 1):
            comp = components[box] == box_index
            lesions.append(Lesion(organ, int(comp.sum()), float(comp.sum() * voxel_ml),
                                  float(hu[box][comp].mean(dtype=np.float64)),
                                  _feret_diameter_mm(np.pad(comp, 1), affine)))
        lesions.sort(key=lambda lesion: -lesion.n_voxels)
        out[organ] = OrganMeasure(organ, n, n * voxel_ml, float(hu[own].mean(dtype=np.float64)) if own.any() else None,
                                  bool(truncated), tuple(lesions))
    return out


# ----------------------------------------------------------------------------------------------- options
def _format_number(x: float, unit: str) -> str:
    text = f"{float(f'{x:.2g}'):g}" if abs(x) >= 0.01 else f"{x:.2g}"
    return f"{text} {unit}".strip()


def _numeric_options(value: float, unit: str, rng: np.random.Generator, additive: float | None = None,
                     integer: bool = False) -> tuple[str, list[str]]:
    """The true value's text and three distractors: a 4-step ladder with the true value at a random rank."""
    below = int(rng.integers(0, min(4, int(value) + 1) if integer else 4))
    if integer:
        ladder = [str(int(value) + k - below) for k in range(4)]
    elif additive is not None:
        ladder = [f"{round(value + additive * (k - below)):d} {unit}" for k in range(4)]
    else:
        ladder = [_format_number(value * NUMERIC_RATIO ** (k - below), unit) for k in range(4)]
    return ladder[below], ladder[:below] + ladder[below + 1:]


def _ratio_bin(a: str, va: float, b: str, vb: float) -> tuple[str, list[str]]:
    """Which of two organs is larger, binned at SIZE_RATIO_BIN: (correct text, other three)."""
    options = [f"the {a}, by {SIZE_RATIO_BIN - 1:.0%} or more", f"the {a}, by less than {SIZE_RATIO_BIN - 1:.0%}",
               f"the {b}, by less than {SIZE_RATIO_BIN - 1:.0%}", f"the {b}, by {SIZE_RATIO_BIN - 1:.0%} or more"]
    ratio = va / vb
    index = 0 if ratio >= SIZE_RATIO_BIN else 1 if ratio >= 1 else 2 if ratio > 1 / SIZE_RATIO_BIN else 3
    return options[index], options[:index] + options[index + 1:]


def lesion_type(lesion: Lesion, organ_hu: float) -> str:
    """Attenuation class of a lesion relative to its organ's parenchyma (one of LESION_TYPES)."""
    if lesion.mean_hu <= organ_hu - ATTENUATION_MARGIN_HU:
        return LESION_TYPES[0] if lesion.mean_hu <= FLUID_MAX_HU else LESION_TYPES[1]
    return LESION_TYPES[3] if lesion.mean_hu >= organ_hu + ATTENUATION_MARGIN_HU else LESION_TYPES[2]


def spleen_grade(volume_ml: float | None) -> str:
    """One of SPLEEN_GRADES; None = no spleen in the scan."""
    if volume_ml is None:
        return SPLEEN_GRADES[3]
    return SPLEEN_GRADES[0] if volume_ml <= SPLENOMEGALY_ML[0] else (
        SPLEEN_GRADES[1] if volume_ml <= SPLENOMEGALY_ML[1] else SPLEEN_GRADES[2])


# ----------------------------------------------------------------------------------------------- questions
def _draft(qtype: str, subtype: str, question: str, answer: str, distractors: Sequence[str], organ: str | None,
           lesion: bool, value: float | None = None) -> dict:
    if len(set(distractors) | {answer}) != 4:
        raise AssertionError(f"options of {question!r} are not 4 distinct texts: {answer!r}, {distractors}")
    return {"question": question, "answer": answer, "distractors": list(distractors), "question_type": qtype,
            "question_subtype": subtype, "answer_type": "numeric" if value is not None else "categorical",
            "organ": organ, "lesion": lesion, "value": None if value is None else float(f"{value:.7g}")}


def _pick(rng: np.random.Generator, items: Sequence, k: int | None = None):
    order = rng.permutation(len(items))
    return items[int(order[0])] if k is None else [items[int(i)] for i in order[:k]]


def _drafts(m: dict[str, OrganMeasure], hosts: list[str], min_voxels: int, rng: np.random.Generator,
            notes: list[str]) -> list[dict]:
    """Questions (correct answer + 3 distractors, unordered) from the measures; appends what was skipped to `notes`."""
    present = [o for o, x in m.items() if x.n_voxels >= min_voxels]
    absent = [o for o, x in m.items() if x.n_voxels == 0]
    whole = [o for o in present if not m[o].truncated]
    notes += [f"{o}: absent from the mask; no measurement question" for o in absent]
    notes += [f"{o}: only {m[o].n_voxels} voxel(s) (< {min_voxels}); not measured"
              for o in m if 0 < m[o].n_voxels < min_voxels]
    notes += [f"{o}: cut by the scan's edge; volume asked as the visible part, left out of size comparisons"
              for o in present if m[o].truncated]
    out = []
    # measurement: every organ's volume, two organs' mean HU, the largest lesion of one organ
    for o in present:
        which = f"the visible part of the {organ_phrase(o)}" if m[o].truncated else f"the {organ_phrase(o)}"
        answer, others = _numeric_options(m[o].volume_ml, "mL", rng)
        out.append(_draft("measurement", "organ volume measurement", f"What is the volume of {which} in mL?",
                          answer, others, o, False, m[o].volume_ml))
    for o in _pick(rng, [o for o in present if m[o].mean_hu is not None], 2):
        answer, others = _numeric_options(m[o].mean_hu, "HU", rng, additive=HU_STEP)
        out.append(_draft("measurement", "organ HU measurement", f"What is the mean attenuation of the "
                          f"{organ_phrase(o)} in Hounsfield units?", answer, others, o, False, m[o].mean_hu))
    with_lesions = [o for o in hosts if m[o].lesions]
    if with_lesions:
        o = _pick(rng, with_lesions)
        lesion = m[o].largest_lesion
        answer, others = _numeric_options(lesion.volume_ml, "mL", rng)
        out.append(_draft("measurement", "lesion volume measurement", f"What is the volume of the largest lesion "
                          f"in the {organ_phrase(o)} in mL?", answer, others, o, True, lesion.volume_ml))
    # recognition: the missing organ; an organ with (or without) a lesion
    if absent and len(present) >= 3:
        o = _pick(rng, absent)
        out.append(_draft("recognition", "organ existence", "Which of these organs is not in the scan?",
                          organ_phrase(o), [organ_phrase(p) for p in _pick(rng, present, 3)], o, False))
    free = [o for o in hosts if not m[o].lesions]
    if len(hosts) >= 3:
        if len(free) >= 2 or not with_lesions:
            answer = organ_phrase(_pick(rng, with_lesions)) if with_lesions else NONE_OF_THESE
            others = [organ_phrase(o) for o in _pick(rng, free, 3 - bool(with_lesions))]
            question = "Which of these organs contains a lesion?"
        else:
            answer = organ_phrase(free[0]) if free else NONE_OF_THESE
            others = [organ_phrase(o) for o in _pick(rng, with_lesions, 3 - bool(free))]
            question = "Which of these organs is free of lesions?"
        out.append(_draft("recognition", "lesion existence", question, answer,
                          [*others, NONE_OF_THESE] if answer != NONE_OF_THESE else others, None, True))
    # recognition: which organ of a pair holds a lesion (the kidneys; liver and spleen), asked of every pair
    for a, b in (("kidney_right", "kidney_left"), ("liver", "spleen")):
        if a in hosts and b in hosts and a in present and b in present:
            both, neither = f"both the {organ_phrase(a)} and the {organ_phrase(b)}", "neither"
            options = {(True, False): organ_phrase(a), (False, True): organ_phrase(b), (True, True): both,
                       (False, False): neither}
            answer = options[(bool(m[a].lesions), bool(m[b].lesions))]
            out.append(_draft("recognition", "lesion existence", f"Which of the {organ_phrase(a)} and the "
                              f"{organ_phrase(b)} contains a lesion?", answer,
                              [o for o in options.values() if o != answer], None, True))
    # visual reasoning: counting, left vs right kidney, two organs' sizes, largest lesion diameter and location
    counted = [o for o in hosts if o in present]
    if counted:  # half of the time an organ with lesions, if any, so that "0" is not the usual answer
        o = _pick(rng, with_lesions if with_lesions and rng.random() < 0.5 else counted)
        answer, others = _numeric_options(len(m[o].lesions), "", rng, integer=True)
        out.append(_draft("visual_reasoning", "lesion counting", f"How many lesions are in the {organ_phrase(o)}?",
                          answer, others, o, True, len(m[o].lesions)))
    kidneys = ("kidney_right", "kidney_left")
    if all(k in whole for k in kidneys):
        answer, others = _ratio_bin("right kidney", m[kidneys[0]].volume_ml, "left kidney", m[kidneys[1]].volume_ml)
        out.append(_draft("visual_reasoning", "kidney volume comparison", "Which kidney is larger?", answer, others,
                          ",".join(kidneys), False))
    pairs = [p for p in itertools.combinations(whole, 2) if set(p) != set(kidneys)]
    # organs within a factor 4 of each other when there are such pairs (the liver against a kidney is no question)
    pairs = [(a, b) for a, b in pairs if 0.25 <= m[a].volume_ml / m[b].volume_ml <= 4] or pairs
    if pairs:
        a, b = _pick(rng, pairs)
        answer, others = _ratio_bin(organ_phrase(a), m[a].volume_ml, organ_phrase(b), m[b].volume_ml)
        out.append(_draft("visual_reasoning", "organ volume comparison", f"Which is larger, the {organ_phrase(a)} "
                          f"or the {organ_phrase(b)}?", answer, others, f"{a},{b}", False))
    if with_lesions:
        o = _pick(rng, with_lesions)
        lesion = m[o].largest_lesion
        answer, others = _numeric_options(lesion.diameter_mm, "mm", rng)
        out.append(_draft("visual_reasoning", "largest lesion diameter", f"What is the longest diameter of the "
                          f"largest lesion in the {organ_phrase(o)} in mm?", answer, others, o, True,
                          lesion.diameter_mm))
        if len(hosts) >= 4:
            top = max(with_lesions, key=lambda h: m[h].largest_lesion.n_voxels)
            out.append(_draft("visual_reasoning", "largest lesion location", "Which organ holds the largest lesion?",
                              organ_phrase(top), [organ_phrase(h) for h in _pick(rng, [h for h in hosts if h != top],
                                                                                  3)], top, True))
    # medical reasoning: attenuation type of an organ's largest lesion; splenomegaly by volume
    typed = [o for o in with_lesions if m[o].mean_hu is not None]
    if typed:
        o = _pick(rng, typed)
        answer = lesion_type(m[o].largest_lesion, m[o].mean_hu)
        out.append(_draft("medical_reasoning", "lesion type classification", f"Judged by its attenuation relative "
                          f"to the surrounding {organ_phrase(o)}, how is the largest {organ_phrase(o)} lesion best "
                          f"described?", answer, [t for t in LESION_TYPES if t != answer], o, True))
    if "spleen" in m and ("spleen" in whole or "spleen" in absent):
        answer = spleen_grade(m["spleen"].volume_ml if "spleen" in whole else None)
        out.append(_draft("medical_reasoning", "splenomegaly grading", "Judged by its volume, how large is the "
                          "spleen?", answer, [g for g in SPLEEN_GRADES if g != answer], "spleen", False))
    elif "spleen" in m:
        notes.append("spleen: not graded (cut by the scan's edge or too small)")
    return out


def generate_questions(hu: np.ndarray, labels: np.ndarray, affine: np.ndarray, image_id: str, image_path: str,
                       mask_path: str | None = None, organs: Sequence[str] = DEFAULT_ORGANS,
                       lesion_labels: Mapping[int, str] | None = None, organ_labels: Mapping[str, int] | None = None,
                       min_voxels: int = 10, seed: int | np.random.Generator = 0) -> tuple[list[dict], list[str]]:
    """Multiple-choice question records for one CT volume and its mask.

    Args:
        hu: (X, Y, Z) HU.
        labels: (X, Y, Z) label ids on the grid of `hu`.
        affine: (4, 4) voxel-to-world, mm.
        image_id: the volume's id in the records.
        image_path: the CT's path as the records should give it (relative to the JSONL file's folder).
        mask_path: the mask's path, likewise.
        organs: organs to ask about (TotalSegmentator names).
        lesion_labels: {lesion label id: host organ}; lesion questions are asked about these hosts only.
        organ_labels: {organ name: label id}; default TotalSegmentator v2.
        min_voxels: fewer voxels than this (but more than 0) and an organ is neither measured nor called absent.
        seed: seed or generator for option ladders, picks and letters.

    Returns:
        ``(records, notes)``: the question dicts (see the module docstring) and one line per organ that was not
        measured or compared, with the reason.
    """
    if hu.shape != labels.shape:
        raise DataError(f"{image_id}: CT shape {hu.shape} differs from mask shape {labels.shape}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    measures = measure_organs(hu, labels, affine, organs, lesion_labels, organ_labels)
    hosts = [o for o in organs if o in set((lesion_labels or {}).values())]
    notes = [f"lesion label {k}: host {host!r} is not among the organs asked about; ignored"
             for k, host in (lesion_labels or {}).items() if host not in organs]
    drafts = _drafts(measures, hosts, min_voxels, rng, notes)
    if not hosts:
        notes.append("no lesion labels given: no lesion questions")
    positions = np.concatenate([rng.permutation(4) for _ in range(len(drafts) // 4 + 1)])
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    records = []
    for i, (draft, position) in enumerate(zip(drafts, positions)):
        others = _pick(rng, draft.pop("distractors"), 3)
        choices = [*others[:position], draft["answer"], *others[position:]]
        records.append({"qid": f"{image_id}-{i:02d}", "image_id": image_id, "image_path": image_path,
                        "mask_path": mask_path, "spacing": [round(float(z), 4) for z in zooms],
                        "shape": [int(s) for s in hu.shape], "question": draft.pop("question"), "choices": choices,
                        "answer": draft.pop("answer"), "answer_letter": LETTERS[int(position)], **draft})
    return records, notes


def questions_from_files(ct_path: str | os.PathLike, mask_path: str | os.PathLike, relative_to: str | os.PathLike
                         | None = None, **kwargs) -> tuple[list[dict], list[str]]:
    """`generate_questions` for a CT and mask file; the image id is the CT's file name without ``.nii[.gz]``.

    Paths in the records are relative to `relative_to` for files below it, absolute otherwise (and as given
    without `relative_to`). Keyword arguments are ``check_hu`` (default True: refuse a CT not in HU) and those of
    `generate_questions` after ``mask_path``.
    """
    hu, labels, affine = load_ct_and_mask(ct_path, mask_path, hu=kwargs.pop("check_hu", True))
    image_id = Path(ct_path).name.removesuffix(".gz").removesuffix(".nii")

    def shown(path) -> str:
        if relative_to is None:
            return str(path)
        path, base = Path(path).resolve(), Path(relative_to).resolve()
        return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)

    return generate_questions(hu, labels, affine, image_id, shown(ct_path), shown(mask_path), **kwargs)
