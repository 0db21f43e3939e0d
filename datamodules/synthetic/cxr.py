"""Seeded generator of frontal chest radiograph-like images with radiology reports in the IU-Xray CSV layout.

Each study is one frontal (PA/AP) grey image and a templated report whose statements are drawn into the
image where the report puts them (radiological convention: the patient's right is on the viewer's left):

* pleural effusion (small / moderate / large) fills the costophrenic angle of its side with fluid density,
  its upper surface rising towards the lateral chest wall (meniscus) and blunting the angle;
* cardiomegaly (mild / moderate / severe) widens the heart shadow: cardiothoracic ratio (CTR, widest heart
  width over the widest inner thoracic width) >= 0.53 against 0.40-0.48 for a normal heart;
* pneumothorax (small / moderate / large) is a lucent apical-lateral rim without lung markings, bounded by a
  thin visceral pleural line;
* a pulmonary nodule in a lobe (right upper / middle / lower lobe, left upper lobe / lingula / lower lobe) is a
  round opacity drawn to scale (``pixel_spacing_mm``) from the reported size in mm or cm;
* devices follow their course: an endotracheal tube down the trachea to a stated distance above the carina,
  a right or left PICC from the arm through the subclavian and brachiocephalic veins to its tip (SVC,
  cavoatrial junction or right atrium), a nasogastric tube down the oesophagus to the stomach (or, malpositioned,
  the distal oesophagus).

Reports state every organ system (devices, heart, mediastinum, lungs, pleura, bones) with negations for normal
ones, laterality, severity, measurements with units and, when there is a prior study, interval change (new /
unchanged / stable / increased / decreased / improved). So every error type of :mod:`mmclin.reports.injection` has
sites. The IMPRESSION repeats every abnormal finding: in full in half of the studies, so that an error in one
section contradicts the other and the text alone can show it; by name only in the other half ("Pleural effusion.",
"Pneumothorax.", "Support devices as described."), so that a swapped side, a changed severity, size, lobe or
device position is consistent within the report and can only be caught by looking at the image.

The output is what an IU-Xray download (Demner-Fushman et al., JAMIA 2016; the Kaggle "Chest X-rays (Indiana
University)" CSV release) looks like to our reader: ``indiana_reports.csv`` with columns ``uid, MeSH, Problems,
image, indication, comparison, findings, impression`` (MeSH terms as ``Pleural Effusion/right/small``, ``normal``
when none; de-identified dates as ``XXXX``), ``indiana_projections.csv`` (``uid, filename, projection``; one
``Frontal`` view per study, named like ``1_IM-0001-1001.dcm.png``) and the PNG images under ``images/``.
``findings.jsonl`` adds the ground truth per uid (sides, severities, sizes, device paths in pixels), which the
real dataset does not have.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from datamodules.synthetic.cache import build_once, demo_cache_dir
from mmclin.errors import ConfigError

DEMO_NAME = "cxr-report-demo-v2"
REPORTS_CSV = "indiana_reports.csv"
PROJECTIONS_CSV = "indiana_projections.csv"
FINDINGS_JSONL = "findings.jsonl"
REPORT_COLUMNS = ("uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression")
PROJECTION_COLUMNS = ("uid", "filename", "projection")
DEFAULTS = {"seed": 0, "n_studies": 600, "size": 128}

# ---------------------------------------------------------------------------------------------- anatomy
# Normalised coordinates: u across (0 = viewer's left = patient's right), v down (0 = top); t = |u - 0.5|.
BRIEF_IMPRESSION_RATE = 0.5  # share of reports whose impression names the findings without their details
FIELD_OF_VIEW_MM = 375.0  # image width: an adult's ~300 mm inner thoracic width spans 80% of it
THORAX_HALF_WIDTH = 0.40  # t of the lateral lung edge at its widest (inner rib margin)
MEDIASTINUM_HALF_WIDTH = 0.065
APEX_V = 0.10  # lung apices
CARINA_V = 0.30
COSTOPHRENIC_V = {"right": 0.80, "left": 0.82}  # the right hemidiaphragm sits higher (liver)
DOME_HEIGHT, DOME_PEAK_T = 0.10, 0.22  # hemidiaphragm dome: rise above the costophrenic angle, and where
HILUM = (0.10, 0.42)  # (t, v) of each hilum
HEART_CENTRE_V = 0.60  # the heart rests on the diaphragm, which hides its lower border
AORTIC_KNOB = (0.07, 0.29, 0.028)  # (t, v, radius) of the aortic arch, on the patient's left
ZONE_V = {"upper": 0.25, "middle": 0.42, "lower": 0.57}  # nodule centre height per lung zone
LOBE = {("right", "upper"): "right upper lobe", ("right", "middle"): "right middle lobe",
        ("right", "lower"): "right lower lobe", ("left", "upper"): "left upper lobe",
        ("left", "middle"): "lingula", ("left", "lower"): "left lower lobe"}

# Grey levels in [0, 1] (higher = more attenuating, as a radiograph is displayed).
AIR, SOFT_TISSUE, LUNG, MEDIASTINUM, HEART, ABDOMEN, FLUID, DEVICE = 0.03, 0.46, 0.17, 0.78, 0.84, 0.60, 0.62, 0.97
PNEUMOTHORAX = 0.07

SEVERITIES = ("small", "moderate", "large")
EFFUSION_HEIGHT = {"small": 0.08, "moderate": 0.16, "large": 0.28}  # fluid height at the chest wall
PNEUMOTHORAX_RIM = {"small": 0.04, "moderate": 0.08, "large": 0.13}  # rim width at mid-lung
CARDIOMEGALY_CTR = {"mild": (0.53, 0.56), "moderate": (0.57, 0.61), "severe": (0.62, 0.66)}
NORMAL_CTR = (0.40, 0.48)
NODULE_SIZES_MM = (6, 8, 9, 10, 12, 14, 15, 18, 20, 22, 25, 28)
ETT_ABOVE_CARINA_CM = (2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0)
PICC_TIP_V = {"svc": 0.30, "cavoatrial junction": 0.40, "right atrium": 0.47}
NG_TIP = {"stomach": (0.64, 0.88), "distal esophagus": (0.52, 0.66)}


def lung_lateral_t(v: np.ndarray | float) -> np.ndarray:
    """t of the lateral lung edge at height `v` (both sides): 0 at the apex, widening to the thoracic width."""
    return THORAX_HALF_WIDTH * np.clip((np.asarray(v) - APEX_V) / 0.50, 0, 1) ** 0.4


def diaphragm_v(t: np.ndarray | float, side: str) -> np.ndarray:
    """Height of the `side` hemidiaphragm at `t`: lowest at the costophrenic angle, domed medially."""
    s = np.clip((THORAX_HALF_WIDTH - np.asarray(t)) / (THORAX_HALF_WIDTH - DOME_PEAK_T), 0, 1)
    return COSTOPHRENIC_V[side] - DOME_HEIGHT * (1 - (1 - s) ** 2)


def heart_box(ctr: float) -> tuple[float, float, float, float]:
    """Heart ellipse ``(u_centre, v_centre, half_width, half_height)`` for a cardiothoracic ratio.

    Two thirds of the heart's width lies left of the midline (patient's left = viewer's right).
    """
    width = ctr * 2 * THORAX_HALF_WIDTH
    return 0.5 + width / 6, HEART_CENTRE_V, width / 2, 0.12 + 0.15 * (ctr - 0.45)


def u_of(side: str, t: float) -> float:
    """Normalised column of a point `t` from the midline on the patient's `side`."""
    return 0.5 - t if side == "right" else 0.5 + t


# --------------------------------------------------------------------------------------- study content
@dataclass
class Finding:
    """One abnormality of a study."""

    kind: str  # effusion | pneumothorax | cardiomegaly | nodule
    side: str | None = None  # right | left (None for cardiomegaly)
    severity: str | None = None  # small/moderate/large; mild/moderate/severe for cardiomegaly
    interval: str | None = None  # new | unchanged | stable | increased | decreased | improved (None: no prior)
    size_mm: float | None = None  # nodule diameter
    unit: str | None = None  # nodule size as reported: mm | cm
    zone: str | None = None  # nodule zone: upper | middle | lower
    lobe: str | None = None  # nodule lobe as reported
    centre_px: tuple[float, float] | None = None  # nodule centre (x, y) in pixels


@dataclass
class Device:
    """One support device, with its drawn course."""

    kind: str  # ett | picc | ng
    side: str | None = None  # picc: right | left arm
    tip: str | None = None  # picc: svc | cavoatrial junction | right atrium; ng: stomach | distal esophagus
    above_carina_cm: float | None = None  # ett tip height above the carina
    interval: str | None = None  # new | unchanged (None: no prior)
    path_px: list[tuple[float, float]] = field(default_factory=list)  # polyline (x, y) in pixels, tip last


@dataclass
class Study:
    uid: int
    ctr: float
    comparison: bool
    findings: list[Finding]
    devices: list[Device]


def _sample_study(uid: int, rng: np.random.Generator) -> Study:
    comparison = bool(rng.random() < 0.6)
    sides = ("right", "left")

    def interval(options: tuple[str, ...]) -> str | None:
        return str(rng.choice(options)) if comparison else None

    findings: list[Finding] = []
    cardiomegaly = None
    if rng.random() < 0.3:
        cardiomegaly = str(rng.choice(tuple(CARDIOMEGALY_CTR)))
        ctr = float(rng.uniform(*CARDIOMEGALY_CTR[cardiomegaly]))
        findings.append(Finding("cardiomegaly", severity=cardiomegaly, interval=interval(("stable", "unchanged"))))
    else:
        ctr = float(rng.uniform(*NORMAL_CTR))
    effusion_side = None
    if rng.random() < 0.35:
        effusion_side = str(rng.choice(sides))
        findings.append(Finding("effusion", side=effusion_side, severity=str(rng.choice(SEVERITIES)),
                                interval=interval(("new", "unchanged", "increased", "decreased"))))
    if rng.random() < 0.15:  # never on the side of an effusion: a hydropneumothorax is another picture
        side = str(rng.choice([s for s in sides if s != effusion_side]))
        findings.append(Finding("pneumothorax", side=side, severity=str(rng.choice(SEVERITIES)),
                                interval=interval(("new", "unchanged", "decreased", "improved"))))
    if rng.random() < 0.3:
        nodule = _place_nodule(rng, ctr, findings)
        if nodule is not None:
            nodule.interval = interval(("new", "unchanged", "stable"))
            findings.append(nodule)

    devices: list[Device] = []
    device_interval = ("new", "unchanged")
    if rng.random() < 0.15:
        devices.append(Device("ett", above_carina_cm=float(rng.choice(ETT_ABOVE_CARINA_CM)),
                              interval=interval(device_interval)))
    if rng.random() < 0.2:
        side = "right" if rng.random() < 0.65 else "left"
        devices.append(Device("picc", side=side, tip=str(rng.choice(tuple(PICC_TIP_V), p=(0.6, 0.25, 0.15))),
                              interval=interval(device_interval)))
    if rng.random() < 0.12:
        devices.append(Device("ng", tip="stomach" if rng.random() < 0.85 else "distal esophagus",
                              interval=interval(device_interval)))
    return Study(uid, ctr, comparison, findings, devices)


def _place_nodule(rng: np.random.Generator, ctr: float, findings: list[Finding]) -> Finding | None:
    """A nodule in a random zone that neither the heart nor an effusion hides (None after a few tries)."""
    effusions = {f.side: EFFUSION_HEIGHT[f.severity] for f in findings if f.kind == "effusion"}
    uc, vc, a, b = heart_box(ctr)
    size_mm = float(rng.choice(NODULE_SIZES_MM))
    radius = size_mm / 2 / FIELD_OF_VIEW_MM  # normalised
    for _ in range(8):
        side, zone = str(rng.choice(("right", "left"))), str(rng.choice(tuple(ZONE_V)))
        v = ZONE_V[zone] + rng.uniform(-0.03, 0.03)
        t = (MEDIASTINUM_HALF_WIDTH + lung_lateral_t(v)) / 2 + rng.uniform(-0.03, 0.03)
        if zone == "lower":
            t += 0.05  # lateral to the heart border
        u = u_of(side, t)
        in_heart = ((u - uc) / (a + radius)) ** 2 + ((v - vc) / (b + radius)) ** 2 <= 1
        under_fluid = side in effusions and v + radius > COSTOPHRENIC_V[side] - effusions[side] - 0.02
        if not in_heart and not under_fluid:
            unit = "cm" if size_mm >= 10 and rng.random() < 0.5 else "mm"
            return Finding("nodule", side=side, size_mm=size_mm, unit=unit, zone=zone, lobe=LOBE[side, zone],
                           centre_px=(u, v))  # normalised here; scaled to pixels when drawn
    return None


# ---------------------------------------------------------------------------------------------- drawing
def _line_layer(size: int, paths: list[list[tuple[float, float]]], width: float, supersample: int = 4) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of polylines given in normalised (u, v) coordinates."""
    big = size * supersample
    layer = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(layer)
    for path in paths:
        draw.line([(u * big, v * big) for u, v in path], fill=255, width=max(1, round(width * supersample)),
                  joint="curve")
    small = layer.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, np.float32) / 255


def _marking_paths(rng: np.random.Generator) -> list[list[tuple[float, float]]]:
    """Bronchovascular markings: branching vessels fanning out from each hilum."""
    paths = []
    for side in ("right", "left"):
        t0, v0 = HILUM
        for _ in range(16):
            angle = rng.uniform(-1.25, 1.35)  # radians from horizontal-lateral; positive = downwards
            length = rng.uniform(0.12, 0.30)
            points = [(t0, v0)]
            for _ in range(4):
                angle += rng.normal(0, 0.15)
                t, v = points[-1]
                points.append((t + np.cos(angle) * length / 4, v + np.sin(angle) * length / 4))
                if rng.random() < 0.35:  # a side branch
                    branch_angle = angle + rng.choice((-0.5, 0.5))
                    paths.append([(u_of(side, t), v), (u_of(side, t + np.cos(branch_angle) * length / 5),
                                                       v + np.sin(branch_angle) * length / 5)])
            paths.append([(u_of(side, t), v) for t, v in points])
    return paths


def _device_path(device: Device) -> list[tuple[float, float]]:
    """Normalised course of a device, tip last."""
    if device.kind == "ett":
        tip_v = CARINA_V - device.above_carina_cm * 10 / FIELD_OF_VIEW_MM
        return [(0.5, 0.0), (0.5, tip_v)]
    if device.kind == "ng":
        tip = NG_TIP[device.tip]
        course = [(0.505, 0.0), (0.512, 0.30), (0.518, 0.60)]
        if device.tip == "stomach":
            course += [(0.53, 0.80), (0.58, 0.87)]
        return course + [tip]
    tip_v = PICC_TIP_V[device.tip]
    arm = [(0.0, 0.24), (0.10, 0.22), (0.22, 0.17), (0.36, 0.16), (0.455, 0.22)]  # right arm -> right BCV
    if device.side == "left":  # left arm -> left BCV, crossing in front of the aortic arch to the SVC
        arm = [(1.0, 0.24), (0.90, 0.22), (0.78, 0.17), (0.64, 0.16), (0.54, 0.20), (0.465, 0.24)]
    return arm + [(0.46, tip_v)]


def render_study(study: Study, size: int, rng: np.random.Generator) -> np.ndarray:
    """The study's frontal radiograph, (size, size) float32 in [0, 1]; device and nodule positions are
    written back into `study` in pixels."""
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    v, u = np.meshgrid(centres, centres, indexing="ij")
    t = np.abs(u - 0.5)
    side_of = np.where(u < 0.5, "right", "left")
    dia = np.where(u < 0.5, diaphragm_v(t, "right"), diaphragm_v(t, "left"))
    by_kind = {f.kind: f for f in study.findings}

    body = (t < 0.46) | ((v > 0.06) & (v < 0.30)) | (t < 0.10)  # chest wall, shoulders and arms, neck
    lung = (t > MEDIASTINUM_HALF_WIDTH) & (t < lung_lateral_t(v)) & (v > APEX_V) & (v < dia)
    knob_t, knob_v, knob_r = AORTIC_KNOB
    mediastinum = ((t < np.where(v < 0.22, 0.05, MEDIASTINUM_HALF_WIDTH)) & (v < dia)) | (
        (u > 0.5) & (np.hypot(t - knob_t, v - knob_v) < knob_r))
    uc, vc, a, b = heart_box(study.ctr)
    heart = (((u - uc) / a) ** 2 + ((v - vc) / b) ** 2 <= 1) & (v < dia + 0.01)
    abdomen = body & (v >= dia) & (t < 0.46)
    lung &= ~heart & ~mediastinum

    image = np.where(body, SOFT_TISSUE, AIR).astype(np.float32)
    image[abdomen] = ABDOMEN

    # Lungs: dark, with bronchovascular markings that fade towards the periphery, and denser hila.
    hilum_dist = np.hypot(t - HILUM[0], v - HILUM[1])
    markings = _line_layer(size, _marking_paths(rng), width=0.6 * size / 128) * 0.10 * np.exp(-hilum_dist / 0.22)
    markings += 0.10 * np.exp(-(hilum_dist / 0.035) ** 2)
    texture = gaussian_filter(rng.normal(0, 1, (size, size)).astype(np.float32), 2.0 * size / 128) * 0.03
    lung_image = LUNG + markings + texture

    pneumothorax = by_kind.get("pneumothorax")
    ptx_region = np.zeros_like(lung)
    if pneumothorax is not None:
        rim = PNEUMOTHORAX_RIM[pneumothorax.severity]
        ptx_region = lung & (side_of == pneumothorax.side) & (t > lung_lateral_t(v) - rim) & (v < dia - 0.06)
        lung_image = np.where(ptx_region, PNEUMOTHORAX, lung_image)
        collapsed = lung & (side_of == pneumothorax.side) & ~ptx_region
        lung_image = np.where(collapsed, lung_image + 0.03, lung_image)
        edge = np.abs(t - (lung_lateral_t(v) - rim)) < 0.6 / size
        lung_image = np.where(lung & edge & (side_of == pneumothorax.side) & (v < dia - 0.06),
                              lung_image + 0.15, lung_image)
    image = np.where(lung, lung_image, image)
    image[mediastinum] = MEDIASTINUM
    trachea = (t < 0.018) & (v > 0.02) & (v < CARINA_V)
    image[trachea] = 0.42
    bronchi = _line_layer(size, [[(0.5, CARINA_V), (u_of(s, 0.09), 0.40)] for s in ("right", "left")],
                          width=2.0 * size / 128)
    image = np.where(mediastinum, image - bronchi * (MEDIASTINUM - 0.42), image)
    image[heart] = HEART

    # Bones: posterior ribs sloping down laterally, clavicles, spine.
    thorax = body & (v < dia) & ~heart & ~mediastinum
    ribs = sum(np.exp(-((v - (0.12 + 0.065 * k + 0.08 * t / THORAX_HALF_WIDTH)) / 0.008) ** 2) for k in range(10))
    image += 0.05 * ribs * thorax * (t < 0.46)
    clavicle_v = 0.13 - 0.06 * np.clip(t, 0.03, 0.35)
    image += 0.09 * np.exp(-((v - clavicle_v) / 0.010) ** 2) * (t > 0.03) * (t < 0.35)
    image += 0.05 * (t < 0.035)  # spine

    effusion = by_kind.get("effusion")
    if effusion is not None:  # fluid in the dependent pleural space, meniscus rising to the chest wall
        height = EFFUSION_HEIGHT[effusion.severity]
        lateral = np.clip((t - MEDIASTINUM_HALF_WIDTH) / (THORAX_HALF_WIDTH - MEDIASTINUM_HALF_WIDTH), 0, 1)
        surface = COSTOPHRENIC_V[effusion.side] - height * (0.5 + 0.5 * lateral**2)
        alpha = np.clip((v - surface) / 0.02 + 0.5, 0, 1) * (side_of == effusion.side) * lung
        image = image * (1 - alpha) + FLUID * alpha

    nodule = by_kind.get("nodule")
    if nodule is not None:
        nu, nv = nodule.centre_px
        radius_px = nodule.size_mm / 2 / (FIELD_OF_VIEW_MM / size)
        dist = np.hypot((u - nu) * size, (v - nv) * size)
        image += 0.30 * np.clip(radius_px + 0.5 - dist, 0, 1)
        nodule.centre_px = (round(nu * size - 0.5, 2), round(nv * size - 0.5, 2))

    for device in study.devices:
        path = _device_path(device)
        width = {"ett": 2.4, "picc": 1.6, "ng": 1.6}[device.kind] * size / 128
        coverage = _line_layer(size, [path], width=width)
        image = image * (1 - coverage) + DEVICE * coverage
        device.path_px = [(round(pu * size - 0.5, 2), round(pv * size - 0.5, 2)) for pu, pv in path]

    image = gaussian_filter(image.astype(np.float32), 0.6 * size / 128)  # focal spot / detector blur
    image += rng.normal(0, 0.012, image.shape).astype(np.float32)
    return np.clip(image, 0, 1)


# ----------------------------------------------------------------------------------------------- report
_INTERVAL_TEXT = {
    "new": ("new compared to prior", "new since the prior study", "new"),
    "unchanged": ("unchanged", "unchanged from prior"),
    "stable": ("stable", "stable compared to prior"),
    "increased": ("increased in size", "increased from prior"),
    "decreased": ("decreased in size", "decreased from prior"),
    "improved": ("improved", "improved compared to prior"),
}
_PICC_TIP_TEXT = {"svc": "in the SVC", "cavoatrial junction": "at the cavoatrial junction",
                  "right atrium": "in the right atrium"}
_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _size_text(f: Finding) -> str:
    return f"{f.size_mm / 10:g} cm" if f.unit == "cm" else f"{f.size_mm:g} mm"


def _with_interval(sentence: str, interval: str | None, rng) -> str:
    return sentence if interval is None else f"{sentence}, {_pick(rng, _INTERVAL_TEXT[interval])}"


def _device_sentence(d: Device, rng) -> str:
    if d.kind == "ett":
        core = _pick(rng, (f"endotracheal tube tip is {d.above_carina_cm:g} cm above the carina",
                           f"endotracheal tube terminates {d.above_carina_cm:g} cm above the carina"))
    elif d.kind == "picc":
        core = _pick(rng, (f"{d.side} PICC with tip {_PICC_TIP_TEXT[d.tip]}",
                           f"{d.side}-sided PICC terminates {_PICC_TIP_TEXT[d.tip]}"))
    else:
        where = "the stomach" if d.tip == "stomach" else "the distal esophagus"
        core = _pick(rng, (f"nasogastric tube with tip in {where}", f"nasogastric tube tip projects over {where}"))
    if d.interval == "new":
        core = f"interval placement of {'an' if d.kind == 'ett' else 'a'} {core}"
    elif d.interval == "unchanged":
        core = f"{core}, unchanged in position"
    text = core[0].upper() + core[1:]
    if d.kind == "ng" and d.tip == "distal esophagus":
        text += "; recommend advancement"
    return text + "."


def _finding_sentence(f: Finding, rng) -> str:
    if f.kind == "cardiomegaly":
        core = _pick(rng, (f"The heart is {_ADVERB[f.severity]} enlarged", f"{f.severity.capitalize()} cardiomegaly"))
    elif f.kind == "effusion":
        core = _pick(rng, (f"There is a {f.severity} {f.side} pleural effusion",
                           f"{f.severity.capitalize()} {f.side} pleural effusion with blunting of the {f.side} "
                           "costophrenic angle"))
    elif f.kind == "pneumothorax":
        core = _pick(rng, (f"There is a {f.severity} {f.side} pneumothorax",
                           f"{f.severity.capitalize()} {f.side} apical pneumothorax"))
    else:
        core = _pick(rng, (f"There is a {_size_text(f)} nodule in the {f.lobe}",
                           f"A {_size_text(f)} nodule is seen in the {f.lobe}"))
    return _with_interval(core, f.interval, rng) + "."


_BRIEF_ITEM = {"effusion": "Pleural effusion.", "pneumothorax": "Pneumothorax.", "cardiomegaly": "Cardiomegaly.",
               "nodule": "Pulmonary nodule.", "ett": "Support devices as described.",
               "picc": "Support devices as described.", "ng": "Support devices as described."}


def _impression_item(f: Finding | Device, rng) -> str:
    if isinstance(f, Device):
        return _device_sentence(f, rng)
    if f.kind == "cardiomegaly":
        name = f"{f.severity} cardiomegaly"
    elif f.kind == "nodule":
        name = f"{_size_text(f)} nodule in the {f.lobe}"
    else:
        name = f"{f.severity} {f.side} {'pleural effusion' if f.kind == 'effusion' else 'pneumothorax'}"
    text = _with_interval(name, f.interval, rng)
    if f.kind == "nodule" and f.interval in (None, "new"):
        text += "; recommend chest CT for further evaluation"
    return text[0].upper() + text[1:] + "."


def write_report(study: Study, rng: np.random.Generator) -> tuple[str, str]:
    """FINDINGS and IMPRESSION text of a study: every organ system, then the abnormal findings again, in full
    (side, severity, size, lobe, device position) or, in a share ``BRIEF_IMPRESSION_RATE`` of studies, by name."""
    by_kind = {f.kind: f for f in study.findings}
    sentences = [_device_sentence(d, rng) for d in study.devices]
    sentences.append(_finding_sentence(by_kind["cardiomegaly"], rng) if "cardiomegaly" in by_kind else
                     _pick(rng, ("The heart is normal in size.", "Heart size is normal.",
                                 "The cardiac silhouette is within normal limits.")))
    sentences.append(_pick(rng, ("The mediastinal contours are normal.",
                                 "Mediastinal and hilar contours are unremarkable.")))
    if "nodule" in by_kind:
        sentences += [_finding_sentence(by_kind["nodule"], rng), "No focal consolidation."]
    else:
        sentences.append(_pick(rng, ("The lungs are clear.", "No focal consolidation.",
                                     "The lungs are clear without focal consolidation.")))
    pleura = [k for k in ("effusion", "pneumothorax") if k in by_kind]
    if not pleura and rng.random() < 0.4:
        sentences.append("No pleural effusion or pneumothorax.")
    else:
        sentences.append(_finding_sentence(by_kind["effusion"], rng) if "effusion" in by_kind else
                         _pick(rng, ("No pleural effusion.", "There is no pleural effusion.")))
        sentences.append(_finding_sentence(by_kind["pneumothorax"], rng) if "pneumothorax" in by_kind else
                         _pick(rng, ("No pneumothorax.", "There is no evidence of pneumothorax.")))
    sentences.append(_pick(rng, ("The osseous structures are intact.", "No acute osseous abnormality.",
                                 "Visualized osseous structures are unremarkable.")))

    order = ("effusion", "pneumothorax", "cardiomegaly", "nodule")
    items = [by_kind[k] for k in order if k in by_kind] + list(study.devices)
    brief = rng.random() < BRIEF_IMPRESSION_RATE
    if not items:
        impression = _pick(rng, ("No acute cardiopulmonary abnormality.", "Normal chest radiograph.",
                                 "No acute cardiopulmonary process."))
    elif brief:
        impression = " ".join(dict.fromkeys(_BRIEF_ITEM[item.kind] for item in items))
    elif len(items) == 1:
        impression = _impression_item(items[0], rng)
    else:
        impression = " ".join(f"{i}. {_impression_item(item, rng)}" for i, item in enumerate(items, 1))
    return " ".join(sentences), impression


def mesh_terms(study: Study) -> list[str]:
    """IU-Xray-style MeSH terms of a study (``["normal"]`` when it has none)."""
    terms = []
    for f in study.findings:
        if f.kind == "effusion":
            terms.append(f"Pleural Effusion/{f.side}/{f.severity}")
        elif f.kind == "pneumothorax":
            terms.append(f"Pneumothorax/{f.side}/{f.severity}")
        elif f.kind == "cardiomegaly":
            terms.append(f"Cardiomegaly/{f.severity}")
        else:
            terms.append(f"Nodule/lung/{f.lobe.removeprefix(f'{f.side} ')}/{f.side}")
    for d in study.devices:
        terms.append(f"Catheters, Indwelling/{d.side}" if d.kind == "picc" else "Tube, Inserted")
    return list(dict.fromkeys(terms)) or ["normal"]


# ----------------------------------------------------------------------------------------------- writing
_INDICATIONS = ("Shortness of breath.", "Chest pain.", "Cough and fever.", "XXXX-year-old male with dyspnea.",
                "XXXX-year-old female with chest pain.", "Follow-up pleural effusion.", "Preoperative evaluation.")
_DEVICE_INDICATIONS = {"ett": "Status post intubation.", "picc": "PICC placement.", "ng": "Nasogastric tube placement."}


def demo_dir(cache_dir: str | os.PathLike | None = None, seed: int = DEFAULTS["seed"],
             n_studies: int = DEFAULTS["n_studies"], size: int = DEFAULTS["size"]) -> Path:
    """Where :func:`generate_cxr_demo` puts a demo: ``<cache>/cxr-report-demo-v1`` for the default settings, a
    name that carries the settings otherwise (so demos of different sizes can share one cache)."""
    settings = {"seed": seed, "n_studies": n_studies, "size": size}
    name = DEMO_NAME if settings == DEFAULTS else f"{DEMO_NAME}-n{n_studies}-px{size}-seed{seed}"
    return demo_cache_dir(cache_dir) / name


def generate_cxr_demo(
    cache_dir: str | os.PathLike | None = None,
    seed: int = DEFAULTS["seed"],
    n_studies: int = DEFAULTS["n_studies"],
    size: int = DEFAULTS["size"],
) -> Path:
    """Write the demo (atomically, once) and return its directory; see :func:`demo_dir` for where.

    Args:
        cache_dir: demo cache (default ``$MMCLIN_CACHE`` or ``~/.cache/mmclin``).
        seed: generator seed; the same settings give the same files.
        n_studies: number of studies (one frontal image and one report each).
        size: side of the square 8-bit grey PNG images, in pixels (``FIELD_OF_VIEW_MM`` wide).

    Raises:
        ValueError: the target directory holds a demo made with other settings.
    """
    if n_studies < 1 or size < 32:
        raise ConfigError(f"need n_studies >= 1 and size >= 32 pixels; got n_studies={n_studies}, size={size}")
    settings = {"seed": seed, "n_studies": n_studies, "size": size, "version": 2}
    return build_once(demo_dir(cache_dir, seed, n_studies, size), settings,
                      lambda tmp: _write_demo(tmp, seed, n_studies, size))


def _write_demo(tmp: Path, seed: int, n_studies: int, size: int) -> None:
    (tmp / "images").mkdir()
    rng = np.random.default_rng(seed)
    reports, projections, truth = [], [], []
    for uid in tqdm(range(1, n_studies + 1), desc="Generating demo chest radiographs", unit="study", leave=False):
        study_rng = np.random.default_rng(rng.integers(2**63))
        study = _sample_study(uid, study_rng)
        image = render_study(study, size, study_rng)
        filename = f"{uid}_IM-{uid:04d}-1001.dcm.png"
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(tmp / "images" / filename)
        findings, impression = write_report(study, study_rng)
        terms = mesh_terms(study)
        problems = list(dict.fromkeys(term.split("/")[0] for term in terms))
        portable = bool(study.devices)
        indication = _DEVICE_INDICATIONS[study.devices[0].kind] if portable else _pick(study_rng, _INDICATIONS)
        reports.append({
            "uid": uid, "MeSH": ";".join(terms), "Problems": ";".join(problems),
            "image": "Xray Chest AP portable" if portable else "Xray Chest PA",
            "indication": indication, "comparison": "Chest radiograph XXXX." if study.comparison else "None.",
            "findings": findings, "impression": impression,
        })
        projections.append({"uid": uid, "filename": filename, "projection": "Frontal"})
        truth.append({"uid": uid, "filename": filename, "size": size,
                      "pixel_spacing_mm": FIELD_OF_VIEW_MM / size, "ctr": round(study.ctr, 4),
                      "comparison": study.comparison, "mesh": terms,
                      "findings": [{k: v for k, v in asdict(f).items() if v is not None} for f in study.findings],
                      "devices": [{k: v for k, v in asdict(d).items() if v is not None} for d in study.devices]})
    for name, columns, rows in ((REPORTS_CSV, REPORT_COLUMNS, reports), (PROJECTIONS_CSV, PROJECTION_COLUMNS,
                                                                          projections)):
        with open(tmp / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    (tmp / FINDINGS_JSONL).write_text("".join(json.dumps(row) + "\n" for row in truth), encoding="utf-8")
