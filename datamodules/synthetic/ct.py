"""Seeded generator of small synthetic abdominal CT volumes with label masks and DeepTumorVQA-style questions.

Each volume is an axial abdominal CT in HU: air (-1000) outside an elliptic body, a subcutaneous fat ring
(~-100 HU), the muscular wall (~45 HU), intra-abdominal fat with a few bowel loops (~30 HU), a vertebra
(~350 HU) with paraspinal muscles and the aorta (~40 HU), the liver (45-75 HU) on the patient's right, the
spleen (40-55 HU) on the left and both kidneys (28-40 HU). Organ sizes vary strongly between volumes (linear
scale 0.6-1.6 for the spleen, 0.8-1.25 for the liver, 0.7-1.35 for each kidney, drawn independently), so
volume and size questions can be learnt from the image; about one volume in five lacks the spleen or a kidney
(splenectomy / nephrectomy). Zero to five lesions of known size sit in the liver, spleen or kidneys: cyst-like
(0-10 HU), solid hypodense (25-35 HU below liver or spleen) or hyperdense (90-120 HU).

Layout written under ``demo_cache_dir(cache_dir) / "ct-vqa-demo-v3-..."``::

    volumes/<image_id>.nii.gz   int16 HU, (X, Y, Z) = (right-left, anterior-posterior, superior-inferior) axes
    masks/<image_id>.nii.gz     uint8 labels on the same grid: TotalSegmentator v2 ids (spleen 1, kidney_right 2,
                                kidney_left 3, liver 5) and lesions under DEMO_LESION_LABELS (201-204)
    labels.json                 {label id: name} of the masks
    train.jsonl, val.jsonl, test.jsonl   questions (datamodules.ct_questions), split by volume (70/15/15)

Orientation: the affine is diagonal with positive spacings, i.e. RAS+ (nibabel's ``aff2axcodes`` gives
``("R", "A", "S")``): voxel index x grows towards the patient's right, y towards anterior, z towards superior,
and world x > 0 is the patient's right half. Readers that reorient to RAS (MONAI ``Orientation("RAS")``) leave the
arrays unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from datamodules.ct_questions import DEFAULT_ORGANS, TOTALSEGMENTATOR_LABELS, generate_questions
from datamodules.synthetic.cache import build_once, demo_cache_dir
from mmclin.errors import ConfigError

# Lesion label ids of the demo masks, above TotalSegmentator's 1-117 so they never clash: {label id: host organ}.
DEMO_LESION_LABELS = {201: "liver", 202: "spleen", 203: "kidney_right", 204: "kidney_left"}
SPLITS = (("train", 0.70), ("val", 0.15), ("test", 0.15))
_LESION_WEIGHTS = {"liver": 0.3, "spleen": 0.25, "kidney_right": 0.225, "kidney_left": 0.225}
_NOISE_HU = 8.0


def _ellipsoid(grid: Sequence[np.ndarray], centre, semi_axes, angle_deg: float = 0.0) -> np.ndarray:
    """Boolean ellipsoid on world-coordinate `grid` (3 arrays, mm), rotated by `angle_deg` about the z axis."""
    a = np.deg2rad(angle_deg)
    dx, dy, dz = (g - c for g, c in zip(grid, centre))
    u, v = dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)
    return (u / semi_axes[0]) ** 2 + (v / semi_axes[1]) ** 2 + (dz / semi_axes[2]) ** 2 <= 1.0


def _organ_masks(grid, inside: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Liver (right + left lobe), spleen and kidneys within the abdominal cavity `inside`, on world `grid` (mm);
    one in five volumes lacks the spleen or a kidney. Kidneys take voxels shared with the spleen or liver, the
    spleen those shared with the liver."""
    def jitter(scale: float = 8.0) -> np.ndarray:
        return rng.uniform(-scale, scale, 3)

    s = rng.uniform(0.8, 1.25)
    liver = (_ellipsoid(grid, np.array([70, 5, 45]) + jitter(), np.array([80, 72, 62]) * s, rng.uniform(-10, 10))
             | _ellipsoid(grid, np.array([10, 30, 60]) + jitter(), np.array([50, 38, 28]) * s, rng.uniform(-15, 5)))
    s = rng.uniform(0.6, 1.6)
    spleen = _ellipsoid(grid, np.array([-85, -35, 45]) + jitter(), np.array([26, 52, 42]) * s, rng.uniform(20, 45))
    masks = {"liver": liver, "spleen": spleen}
    for name, x, z, turn in (("kidney_right", 68, -35, -20), ("kidney_left", -68, -22, 20)):
        s = rng.uniform(0.7, 1.35)
        masks[name] = _ellipsoid(grid, np.array([x, -48, z]) + jitter(6), np.array([28, 24, 52]) * s,
                                 turn + rng.uniform(-10, 10))
    if rng.random() < 0.2:  # splenectomy or nephrectomy
        del masks[str(rng.choice(["spleen", "kidney_right", "kidney_left"]))]
    taken = np.zeros_like(inside)
    for name in ("kidney_right", "kidney_left", "spleen", "liver"):
        if name in masks:
            masks[name] = masks[name] & inside & ~taken
            taken |= masks[name]
    return masks


def _place_lesions(masks: dict[str, np.ndarray], spacing: np.ndarray, rng: np.random.Generator
                   ) -> list[tuple[str, np.ndarray, str]]:
    """(host organ, boolean lesion mask inside it, kind) for 0-5 separated spherical-ish lesions."""
    hosts = [h for h in _LESION_WEIGHTS if masks.get(h) is not None and masks[h].any()]
    n = int(rng.choice([0, 0, 0, 1, 1, 2, 2, 3, 4, 5]))
    depth: dict[str, np.ndarray] = {}
    placed: list[tuple[np.ndarray, float]] = []
    out = []
    weights = np.array([_LESION_WEIGHTS[h] for h in hosts])
    for _ in range(n):
        host = hosts[int(rng.choice(len(hosts), p=weights / weights.sum()))]
        radius = rng.uniform(12, 28) if host == "liver" else rng.uniform(10, 18)
        kinds = ["cyst", "hyperdense"] + (["solid"] if host in ("liver", "spleen") else [])
        kind = str(rng.choice(kinds, p=[0.5, 0.35, 0.15] if len(kinds) == 3 else [0.55, 0.45]))
        if host not in depth:  # distance (mm) to the organ's surface, computed on its bounding box
            box = ndimage.find_objects(masks[host].astype(np.uint8))[0]
            depth[host] = np.zeros(masks[host].shape)
            depth[host][box] = ndimage.distance_transform_edt(np.pad(masks[host][box], 1), sampling=spacing)[
                1:-1, 1:-1, 1:-1]
        candidates = np.flatnonzero(depth[host].ravel() >= 0.6 * radius)
        for _ in range(20):
            if candidates.size == 0:
                break
            centre = np.array(np.unravel_index(int(rng.choice(candidates)), depth[host].shape)) * spacing
            if all(np.linalg.norm(centre - c) >= 1.15 * (radius + r) + 2 * spacing.max() for c, r in placed):
                semi = radius * rng.uniform(0.85, 1.15, 3)
                offsets = [np.arange(size) * sp - c for size, sp, c in zip(masks[host].shape, spacing, centre)]
                grid = np.meshgrid(*offsets, indexing="ij", sparse=True)
                lesion = _ellipsoid(grid, (0, 0, 0), semi) & masks[host]
                if lesion.sum() >= 4:
                    placed.append((centre, radius))
                    out.append((host, lesion, kind))
                break
    return out


def synthesize_ct(shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic abdominal CT.

    Args:
        shape: (X, Y, Z) voxels.
        spacing: (X, Y, Z) mm.
        rng: the volume's generator.

    Returns:
        ``(hu, labels, affine)``: (X, Y, Z) int16 HU, (X, Y, Z) uint8 labels (TotalSegmentator ids and
        DEMO_LESION_LABELS), (4, 4) RAS+ affine centred on the volume.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * spacing
    grid = np.meshgrid(*[affine[a, 3] + np.arange(n) * spacing[a] for a, n in enumerate(shape)], indexing="ij",
                       sparse=True)
    x, y, _ = grid
    habitus = rng.uniform(0.92, 1.08)
    ax, ay = 165 * habitus, 118 * habitus
    fat = rng.uniform(10, 28)
    hu = np.full(shape, -1000.0)
    body = (x / ax) ** 2 + (y / ay) ** 2 <= 1.0
    hu[np.broadcast_to(body, shape)] = rng.uniform(-115, -85)  # subcutaneous fat
    wall = (x / (ax - fat)) ** 2 + (y / (ay - fat)) ** 2 <= 1.0
    hu[np.broadcast_to(wall, shape)] = rng.uniform(40, 55)  # abdominal wall muscle
    inside = (x / (ax - fat - 10)) ** 2 + (y / (ay - fat - 10)) ** 2 <= 1.0
    hu[np.broadcast_to(inside, shape)] = rng.uniform(-105, -80)  # visceral fat
    for _ in range(int(rng.integers(3, 7))):  # bowel loops, anterior and inferior
        centre = (rng.uniform(-90, 90), rng.uniform(0, 0.6 * ay), rng.uniform(-120, 10))
        hu[_ellipsoid(grid, centre, rng.uniform(15, 30, 3)) & np.broadcast_to(inside, shape)] = rng.uniform(20, 40)
    spine_y = -ay + fat + 45
    hu[np.broadcast_to((x / 38) ** 2 + ((y - spine_y + 22) / 22) ** 2 <= 1.0, shape)] = rng.uniform(45, 55)
    hu[np.broadcast_to(x ** 2 + (y - spine_y) ** 2 <= 18 ** 2, shape)] = rng.uniform(300, 400)  # vertebral body
    hu[np.broadcast_to((x + 22) ** 2 + (y - spine_y - 30) ** 2 <= 11 ** 2, shape)] = rng.uniform(35, 45)  # aorta

    labels = np.zeros(shape, dtype=np.uint8)
    masks = _organ_masks(grid, np.broadcast_to(inside, shape), rng)
    organ_hu = {"liver": rng.uniform(45, 75), "spleen": rng.uniform(40, 55), "kidney_right": rng.uniform(28, 40)}
    organ_hu["kidney_left"] = organ_hu["kidney_right"] + rng.uniform(-3, 3)
    for name, mask in masks.items():
        hu[mask] = organ_hu[name]
        labels[mask] = TOTALSEGMENTATOR_LABELS[name]
    lesion_label = {host: label for label, host in DEMO_LESION_LABELS.items()}
    for host, lesion, kind in _place_lesions(masks, spacing, rng):
        hu[lesion] = {"cyst": rng.uniform(0, 10), "hyperdense": rng.uniform(90, 120),
                      "solid": organ_hu[host] - rng.uniform(25, 35)}[kind]
        labels[lesion] = lesion_label[host]
    hu = ndimage.gaussian_filter(hu, 0.3) + rng.normal(0.0, _NOISE_HU, shape)  # partial volume, quantum noise
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16), labels, affine


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)  # scanner-based world coordinates
    image.set_sform(affine, code=1)
    nib.save(image, path)


def generate_ct_demo(cache_dir: str | os.PathLike | None = None, seed: int = 0, n_volumes: int = 200,
                     shape: Sequence[int] = (64, 48, 48), spacing: Sequence[float] = (6.0, 6.0, 6.0)) -> Path:
    """Write the demo CT volumes, masks and questions once into the demo cache and return their folder.

    Args:
        cache_dir: cache root (default ``$MMCLIN_CACHE`` or ``~/.cache/mmclin``); the demo goes into a folder
            named after the settings below it.
        seed: generator seed; the same settings give the same files.
        n_volumes: number of volumes (at least 3: one per split).
        shape: (X, Y, Z) voxels; the default covers 384 x 288 x 288 mm.
        spacing: (X, Y, Z) voxel size, mm (4-8 mm keeps organs and lesions resolvable in the default field of view).

    Raises:
        ValueError: fewer than 3 volumes, or a field of view smaller than the anatomy (330 x 240 x 250 mm).
    """
    shape, spacing = [int(s) for s in shape], [float(s) for s in spacing]
    if n_volumes < len(SPLITS):
        raise ConfigError(f"n_volumes={n_volumes}: need at least {len(SPLITS)}, one volume per split")
    if len(shape) != 3 or len(spacing) != 3 or any(n * sp < fov for n, sp, fov in zip(shape, spacing, (340, 250, 260))):
        raise ConfigError(f"shape {shape} x spacing {spacing} mm must cover at least 340 x 250 x 260 mm (X, Y, Z)")
    settings = {"version": 1, "seed": seed, "n_volumes": n_volumes, "shape": shape, "spacing": spacing}
    name = f"ct-vqa-demo-v3-n{n_volumes}-{'x'.join(map(str, shape))}-{'x'.join(f'{s:g}' for s in spacing)}mm-s{seed}"
    return build_once(demo_cache_dir(cache_dir) / name, settings,
                      lambda tmp: _write_demo(tmp, seed, n_volumes, shape, spacing))


def _write_demo(tmp: Path, seed: int, n_volumes: int, shape: list[int], spacing: list[float]) -> None:
    rng = np.random.default_rng(seed)
    (tmp / "volumes").mkdir()
    (tmp / "masks").mkdir()
    order = rng.permutation(n_volumes)
    n_val, n_test = (max(1, round(fraction * n_volumes)) for _, fraction in SPLITS[1:])
    split_of = {int(v): "test" if k < n_test else "val" if k < n_test + n_val else "train" for k, v in
                enumerate(order)}
    records: dict[str, list[dict]] = {split: [] for split, _ in SPLITS}
    for i in range(n_volumes):
        volume_rng = np.random.default_rng(rng.integers(2**63))
        hu, labels, affine = synthesize_ct(shape, spacing, volume_rng)
        image_id = f"ctdemo_{i:04d}"
        _save(hu, affine, tmp / "volumes" / f"{image_id}.nii.gz")
        _save(labels, affine, tmp / "masks" / f"{image_id}.nii.gz")
        found, _ = generate_questions(hu.astype(np.float32), labels, affine, image_id, f"volumes/{image_id}.nii.gz",
                                      f"masks/{image_id}.nii.gz", organs=DEFAULT_ORGANS,
                                      lesion_labels=DEMO_LESION_LABELS, seed=volume_rng)
        records[split_of[i]] += found
    for split, rows in records.items():
        with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    names = {0: "background", **{TOTALSEGMENTATOR_LABELS[o]: o for o in DEFAULT_ORGANS},
             **{label: f"{host}_lesion" for label, host in DEMO_LESION_LABELS.items()}}
    (tmp / "labels.json").write_text(json.dumps({str(k): v for k, v in sorted(names.items())}, indent=1))
