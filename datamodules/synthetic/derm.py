"""Seeded generator of dermoscopy-like demo images in the Derm1M CSV layout.

Seven classes named as in HAM10000 (Tschandl et al., Sci Data 2018), each drawn with the dermoscopic
signs a clinician looks for (ABCD rule: asymmetry, border, colour, diameter; dots/globules; vessels),
over six skin tones, with hair and ruler artefacts. Captions are built from a small ontology
(class, parent class, concepts actually drawn), so text and image agree.

The output is what a real Derm1M download looks like to our reader (Yan et al., arXiv:2503.14911):
``images/*.jpg`` and ``Derm1M_v2_pretrain.csv`` with columns ``filename, caption, truncated_caption,
disease_label, hierarchical_disease_label, skin_concept, body_location, source, label``, plus a
``lesion_id`` column (two views per lesion) so that splits can be grouped by lesion.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from datamodules.synthetic.cache import build_once
from mmclin.errors import ConfigError

DEMO_CSV = "Derm1M_v2_pretrain.csv"


@dataclass(frozen=True)
class LesionClass:
    name: str  # HAM10000 class name, as used in captions and zero-shot prompts
    dx: str  # HAM10000 `dx` code
    parent: str  # parent node in the ontology
    malignant: bool


CLASSES: tuple[LesionClass, ...] = (
    LesionClass("melanoma", "mel", "melanocytic", True),
    LesionClass("melanocytic nevus", "nv", "melanocytic", False),
    LesionClass("basal cell carcinoma", "bcc", "non-melanocytic", True),
    LesionClass("actinic keratosis", "akiec", "non-melanocytic", True),
    LesionClass("benign keratosis", "bkl", "non-melanocytic", False),
    LesionClass("dermatofibroma", "df", "non-melanocytic", False),
    LesionClass("vascular lesion", "vasc", "vascular", False),
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)

# Approximate Fitzpatrick I-VI skin colours (RGB) under dermoscope lighting.
SKIN_TONES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("very light", (242, 200, 176)),
    ("light", (226, 178, 146)),
    ("intermediate", (200, 140, 104)),
    ("tan", (168, 110, 76)),
    ("brown", (124, 80, 54)),
    ("dark brown", (86, 56, 40)),
)
BODY_SITES = ("back", "chest", "upper extremity", "lower extremity", "face", "abdomen", "scalp")

_CAPTION_TEMPLATES = (
    "Dermoscopy of {a} {name}, a {benign} {parent} lesion on {tone} skin of the {site}, showing {concepts}.",
    "{A} {name} ({parent}, {benign}) on the {site}: {concepts}.",
    "Dermoscopic image of the {site} with {concepts}; diagnosis: {name}.",
    "{tone_cap} skin, {site}. Findings: {concepts}. This {benign} lesion is {a} {name}.",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _polar_mask(h: int, rng: np.random.Generator, radius: float, asym: float, rough: float, soft: float):
    """Lesion mask in [0, 1] from a radius function r(theta) with low-order asymmetry and border roughness."""
    yy, xx = np.mgrid[0:h, 0:h].astype(np.float32)
    c = (h - 1) / 2 + rng.normal(0, h * 0.03, 2)
    dy, dx = yy - c[0], xx - c[1]
    theta = np.arctan2(dy, dx)
    dist = np.hypot(dy, dx) / (h / 2)
    r = np.ones_like(theta)
    for k, amp in ((1, asym), (2, asym), (3, asym / 2)):
        r += amp * rng.uniform(0.5, 1.0) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    for k in range(5, 13):
        r += rough * rng.uniform(0, 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    edge = (radius * r - dist) / max(soft, 1e-3)
    return np.clip(0.5 + edge, 0, 1), dist, theta


def _blobs(h: int, rng: np.random.Generator, n: int, centre_r: tuple[float, float], size: float, mask=None):
    """Sum of n Gaussian dots at radii in centre_r (fractions of the half-width), clipped to [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:h].astype(np.float32)
    out = np.zeros((h, h), np.float32)
    for _ in range(n):
        rad, ang = rng.uniform(*centre_r) * h / 2, rng.uniform(0, 2 * np.pi)
        cy, cx = h / 2 + rad * math.sin(ang), h / 2 + rad * math.cos(ang)
        s = size * h * rng.uniform(0.6, 1.4)
        out += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    out = np.clip(out, 0, 1)
    return out * mask if mask is not None else out


def _lowfreq_noise(h: int, rng: np.random.Generator, cells: int = 4) -> np.ndarray:
    small = Image.fromarray((rng.uniform(0, 255, (cells, cells))).astype(np.uint8))
    return np.asarray(small.resize((h, h), Image.BICUBIC), np.float32) / 255.0


def _paint(img: np.ndarray, alpha: np.ndarray, colour) -> np.ndarray:
    a = alpha[..., None]
    return img * (1 - a) + np.asarray(colour, np.float32) * a


def _render_lesion(cls: LesionClass, h: int, rng: np.random.Generator, skin: np.ndarray) -> tuple[np.ndarray, list]:
    """Draw one lesion of class `cls` on skin; return the image (H, W, 3) float and the concepts drawn."""
    img = skin.copy()
    concepts: list[str] = []
    name = cls.dx
    if name == "mel":
        radius = rng.uniform(0.55, 0.8)
        mask, dist, _ = _polar_mask(h, rng, radius, asym=rng.uniform(0.15, 0.28), rough=0.05, soft=0.04)
        n1, n2 = _lowfreq_noise(h, rng), _lowfreq_noise(h, rng)
        img = _paint(img, mask, (96, 56, 34))
        img = _paint(img, mask * (n1 > 0.55) * 0.9, (28, 18, 16))
        concepts += ["asymmetry", "irregular border", "colour variegation"]
        if rng.random() < 0.7:
            img = _paint(img, mask * (n2 > 0.6) * 0.7, (95, 110, 140))
            concepts.append("blue-white veil")
        if rng.random() < 0.7:
            img = _paint(img, _blobs(h, rng, 12, (0.2, radius), 0.018, mask), (20, 12, 10))
            concepts.append("atypical dots and globules")
        if radius > 0.65:
            concepts.append("large diameter")
    elif name == "nv":
        radius = rng.uniform(0.3, 0.5)
        mask, dist, theta = _polar_mask(h, rng, radius, asym=0.03, rough=0.005, soft=0.06)
        img = _paint(img, mask * 0.95, (140, 88, 52))
        concepts += ["symmetric shape", "regular border", "uniform brown colour"]
        if rng.random() < 0.7:
            yy, xx = np.mgrid[0:h, 0:h]
            net = (np.sin(xx * 0.9) * np.sin(yy * 0.9) > 0.3).astype(np.float32)
            img = _paint(img, mask * net * 0.35, (90, 55, 35))
            concepts.append("regular pigment network")
    elif name == "bcc":
        radius = rng.uniform(0.4, 0.6)
        mask, _, _ = _polar_mask(h, rng, radius, asym=0.08, rough=0.02, soft=0.08)
        img = _paint(img, mask * 0.8, (232, 176, 178))
        concepts += ["pearly pink surface", "arborizing vessels"]
        vessels = Image.new("L", (h, h), 0)
        draw = ImageDraw.Draw(vessels)
        for _ in range(rng.integers(3, 6)):
            x, y = h / 2 + rng.normal(0, h * 0.12, 2)
            ang = rng.uniform(0, 2 * np.pi)
            for _ in range(8):
                ang += rng.normal(0, 0.6)
                nx, ny = x + math.cos(ang) * h * 0.06, y + math.sin(ang) * h * 0.06
                draw.line([(x, y), (nx, ny)], fill=255, width=max(1, h // 64))
                x, y = nx, ny
        img = _paint(img, np.asarray(vessels, np.float32) / 255 * mask, (170, 24, 36))
        if rng.random() < 0.6:
            img = _paint(img, _blobs(h, rng, 3, (0.0, radius * 0.7), 0.05, mask) * 0.8, (88, 96, 124))
            concepts.append("blue-grey ovoid nests")
    elif name == "akiec":
        radius = rng.uniform(0.5, 0.75)
        mask, _, _ = _polar_mask(h, rng, radius, asym=0.12, rough=0.03, soft=0.3)
        img = _paint(img, mask * 0.75, (212, 104, 96))
        concepts += ["ill-defined border", "erythematous background"]
        img = _paint(img, _blobs(h, rng, 40, (0.0, radius), 0.012, mask), (245, 240, 232))
        concepts.append("white scale")
        if rng.random() < 0.6:
            img = _paint(img, _blobs(h, rng, 10, (0.0, radius * 0.8), 0.02, mask) * 0.7, (250, 225, 215))
            concepts.append("strawberry pattern")
    elif name == "bkl":
        radius = rng.uniform(0.4, 0.6)
        mask, _, _ = _polar_mask(h, rng, radius, asym=0.1, rough=0.01, soft=0.02)
        img = _paint(img, mask * 0.95, (172, 124, 70))
        concepts += ["sharp demarcation", "waxy tan surface", "milia-like cysts"]
        img = _paint(img, _blobs(h, rng, 8, (0.0, radius * 0.8), 0.022, mask), (250, 246, 222))
        if rng.random() < 0.7:
            img = _paint(img, _blobs(h, rng, 8, (0.0, radius * 0.8), 0.018, mask), (62, 40, 24))
            concepts.append("comedo-like openings")
    elif name == "df":
        radius = rng.uniform(0.25, 0.4)
        mask, dist, _ = _polar_mask(h, rng, radius, asym=0.05, rough=0.01, soft=0.1)
        img = _paint(img, mask * 0.7, (158, 108, 74))
        centre = np.clip(1 - dist / (radius * 0.55), 0, 1) ** 0.7
        img = _paint(img, centre * 0.95, (238, 228, 218))
        concepts += ["central white scar-like patch", "peripheral delicate pigment network"]
    elif name == "vasc":
        radius = rng.uniform(0.3, 0.5)
        mask, _, _ = _polar_mask(h, rng, radius, asym=0.06, rough=0.01, soft=0.03)
        img = _paint(img, mask * 0.9, (150, 40, 70))
        colour = (178, 28, 52) if rng.random() < 0.5 else (104, 30, 92)
        img = _paint(img, _blobs(h, rng, 14, (0.0, radius * 0.85), 0.045, mask), colour)
        concepts += ["red-purple lacunae", "well-demarcated border"]
    else:
        raise ConfigError(f"unknown class {cls}")
    return img, concepts


def _add_artefacts(img: Image.Image, rng: np.random.Generator) -> list[str]:
    h = img.size[0]
    draw = ImageDraw.Draw(img)
    found = []
    if rng.random() < 0.35:
        for _ in range(rng.integers(1, 7)):
            pts = [tuple(rng.uniform(0, h, 2))]
            ang = rng.uniform(0, 2 * np.pi)
            for _ in range(6):
                ang += rng.normal(0, 0.25)
                pts.append((pts[-1][0] + math.cos(ang) * h * 0.12, pts[-1][1] + math.sin(ang) * h * 0.12))
            draw.line(pts, fill=(30, 22, 18), width=1)
        found.append("hair")
    if rng.random() < 0.15:
        y = h - h // 10
        draw.line([(0, y), (h, y)], fill=(20, 20, 20), width=1)
        for x in range(0, h, max(2, h // 16)):
            draw.line([(x, y), (x, y - h // 24)], fill=(20, 20, 20), width=1)
        found.append("ruler")
    return found


def _render_view(cls: LesionClass, h: int, seed: int, tone_rgb, view_seed: int) -> tuple[Image.Image, list, list]:
    lesion_rng = np.random.default_rng(seed)  # same lesion in every view
    view_rng = np.random.default_rng(view_seed)
    light = view_rng.uniform(0.85, 1.1)
    skin = np.ones((h, h, 3), np.float32) * np.asarray(tone_rgb, np.float32) * light
    skin += (_lowfreq_noise(h, view_rng, 6)[..., None] - 0.5) * 18
    img, concepts = _render_lesion(cls, h, lesion_rng, skin)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    pil = pil.rotate(view_rng.uniform(0, 360), resample=Image.BILINEAR, fillcolor=tuple(int(v) for v in tone_rgb))
    # Dermoscope vignette: dark circular field stop, applied after rotation so it stays centred.
    yy, xx = np.mgrid[0:h, 0:h]
    r = np.hypot(yy - h / 2, xx - h / 2) / (h / 2)
    img = np.asarray(pil, np.float32) * np.clip(1.25 - 0.45 * r**2, 0.3, 1)[..., None]
    img += view_rng.normal(0, 4, img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    pil = pil.filter(ImageFilter.GaussianBlur(radius=view_rng.uniform(0.0, 0.6)))
    artefacts = _add_artefacts(pil, view_rng)
    return pil, concepts, artefacts


def _caption(cls: LesionClass, concepts: list[str], tone: str, site: str, artefacts: list[str], rng) -> str:
    shown = list(rng.permutation(concepts))[: max(1, int(rng.integers(1, len(concepts) + 1)))]
    concept_text = ", ".join(shown[:-1]) + (" and " if len(shown) > 1 else "") + shown[-1]
    template = _CAPTION_TEMPLATES[int(rng.integers(len(_CAPTION_TEMPLATES)))]
    text = template.format(
        a=_article(cls.name),
        A=_article(cls.name).capitalize(),
        name=cls.name,
        parent=cls.parent,
        benign="malignant" if cls.malignant else "benign",
        tone=tone,
        tone_cap=tone.capitalize(),
        site=site,
        concepts=concept_text,
    )
    if artefacts:
        text += " Artefacts: " + " and ".join(artefacts) + "."
    return text


def generate_derm_demo(
    out_dir: str | os.PathLike,
    lesions_per_class: int = 90,
    views_per_lesion: int = 2,
    image_size: int = 128,
    seed: int = 0,
) -> Path:
    """Write the demo dataset to `out_dir` (atomically) and return it; reuse it if already complete.

    Args:
        out_dir: target directory; created with ``images/`` and ``Derm1M_v2_pretrain.csv``.
        lesions_per_class: lesions per class; each lesion gives `views_per_lesion` images.
        views_per_lesion: photographs of the same lesion (rotation, lighting, artefacts differ).
        image_size: side of the square JPEG images in pixels.
        seed: generator seed; the same seed gives the same files.

    Raises:
        ValueError: `out_dir` already holds a demo made with other settings.
    """
    settings = {"seed": seed, "lesions_per_class": lesions_per_class, "views_per_lesion": views_per_lesion,
                "image_size": image_size}
    return build_once(out_dir, settings,
                      lambda tmp: _write_demo(tmp, lesions_per_class, views_per_lesion, image_size, seed))


def _write_demo(tmp: Path, lesions_per_class: int, views_per_lesion: int, image_size: int, seed: int) -> None:
    (tmp / "images").mkdir()
    rng = np.random.default_rng(seed)
    rows = []
    jobs = [(cls, i) for cls in CLASSES for i in range(lesions_per_class)]
    for cls, i in tqdm(jobs, desc="Generating demo dermoscopy", unit="lesion", leave=False):
        lesion_seed = int(rng.integers(2**31))
        tone, tone_rgb = SKIN_TONES[int(rng.integers(len(SKIN_TONES)))]
        site = BODY_SITES[int(rng.integers(len(BODY_SITES)))]
        lesion_id = f"DEMO_L{len(rows) // views_per_lesion:05d}"
        for v in range(views_per_lesion):
            image, concepts, artefacts = _render_view(cls, image_size, lesion_seed, tone_rgb, int(rng.integers(2**31)))
            filename = f"images/{cls.dx}_{i:04d}_{v}.jpg"
            image.save(tmp / filename, quality=92)
            caption = _caption(cls, concepts, tone, site, artefacts, rng)
            rows.append(
                {
                    "filename": filename,
                    "caption": caption,
                    "truncated_caption": caption,
                    "disease_label": cls.name,
                    "hierarchical_disease_label": f"skin lesion > {cls.parent} > {cls.name}",
                    "skin_concept": ", ".join(concepts),
                    "body_location": site,
                    "source": "synthetic",
                    "label": cls.name,
                    "lesion_id": lesion_id,
                }
            )
    with open(tmp / DEMO_CSV, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
