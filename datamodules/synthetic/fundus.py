"""Seeded generator of colour fundus photographs with diabetic-retinopathy lesions, reports and lesion boxes.

Each image is a fundus-like scene: an orange-red disc on a black background with vignetting and choroidal
texture, a bright optic disc, a darker macula and fovea, and a vessel tree branching from the disc (the
temporal arcades bend around the macula). Lesions follow the International Clinical Diabetic Retinopathy
(ICDR) severity scale (Wilkinson et al., Ophthalmology 2003):

* grade 0: no lesions;
* grade 1: microaneurysms only;
* grade 2: microaneurysms, a few haemorrhages and hard exudates;
* grade 3: haemorrhages in all four quadrants (around the fovea), hard exudates;
* grade 4: neovascularisation at the disc (fine tortuous vessels), often a boat-shaped preretinal
  haemorrhage, some haemorrhages.

Each report states the findings drawn (a few seeded phrasings each, sometimes with a negated finding such as
"no neovascularisation"), then the grade and referral in the fixed phrases of `ICDR_GRADES` and `REFERRALS`.

The output uses the published layouts our readers take: ``images/NNNN.jpg`` with YOLO boxes in
``images/NNNN.txt`` (``class cx cy w h``, normalised) and ``retinal.names``, as in CODRAS (von Csefalvay
2019, whose class ids 0-2 ``optic_disc, hard_exudates, haemorrhage`` are kept; the demo adds ids 3-5), and an
image-report pairs CSV ``reports.csv`` with columns ``image, report, grade, referral, split``.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from datamodules.synthetic.cache import build_once, demo_cache_dir
from mmclin.errors import ConfigError

# ICDR severity phrases, index = grade (Wilkinson et al. 2003). Reports use them verbatim.
ICDR_GRADES: tuple[str, ...] = (
    "no diabetic retinopathy",
    "mild non-proliferative diabetic retinopathy",
    "moderate non-proliferative diabetic retinopathy",
    "severe non-proliferative diabetic retinopathy",
    "proliferative diabetic retinopathy",
)
# Referral per grade: this project's convention, ordered by urgency as in the ICO Guidelines for Diabetic
# Eye Care (2017): re-screen, routine, soon (weeks), urgent.
REFERRALS: tuple[str, ...] = (
    "no referral needed", "refer routinely", "refer routinely", "refer soon", "refer urgently",
)
# YOLO class ids: 0-2 as in CODRAS's retinal.names (haemorrhage there also covers microaneurysms).
LESION_CLASSES: tuple[str, ...] = (
    "optic_disc", "hard_exudates", "haemorrhage", "microaneurysm", "neovascularisation", "preretinal_haemorrhage",
)
NAMES_FILE = "retinal.names"
REPORTS_CSV = "reports.csv"
DEMO_NAME = "fundus-report-demo-v1"
GRADE_SHARES = (0.24, 0.2, 0.2, 0.18, 0.18)  # mildly skewed towards healthy eyes, every grade learnable
SPLIT_SHARES = {"val": 0.15, "test": 0.15}  # the rest is train; stratified by grade

# RGB colours (0-255) of fundus structures, roughly as they appear in IDRiD photographs.
_BACKGROUNDS = ((205, 95, 35), (188, 74, 28), (214, 116, 46), (172, 62, 24))
_DISC, _CUP = (250, 212, 135), (255, 238, 185)
_VESSEL = (120, 22, 14)
_LESION_COLOURS = {
    "hard_exudates": (246, 228, 120),
    "haemorrhage": (98, 14, 8),
    "microaneurysm": (112, 16, 10),
    "neovascularisation": (186, 36, 24),
    "preretinal_haemorrhage": (86, 8, 5),
}
_SUPERSAMPLE = 2  # masks are drawn at 2x and box-reduced, so small round lesions do not render as squares


@dataclass
class Lesion:
    """One annotated object: its YOLO class and the shapes drawn, in normalised image coordinates.

    ``shapes`` holds ``("polygon", points (n, 2))`` and ``("line", points (n, 2), width)`` items.
    """

    kind: str
    shapes: list[tuple] = field(default_factory=list)

    def extent(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of everything drawn, normalised, including line half-widths."""
        lo, hi = np.full(2, np.inf), np.full(2, -np.inf)
        for shape in self.shapes:
            pad = shape[2] / 2 if shape[0] == "line" else 0.0
            lo, hi = np.minimum(lo, shape[1].min(0) - pad), np.maximum(hi, shape[1].max(0) + pad)
        return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


@dataclass
class FundusScene:
    """Everything needed to render one photograph, in normalised coordinates (x right, y down, side = 1)."""

    grade: int
    centre: np.ndarray  # fundus disc centre (2,)
    radius: float  # fundus disc radius
    disc: np.ndarray  # optic disc centre (2,)
    disc_radius: float
    fovea: np.ndarray  # (2,)
    background: tuple[float, float, float]  # fundus RGB
    texture_seed: int
    vessels: list[tuple[np.ndarray, float]]  # polylines (n, 2) and their width
    lesions: list[Lesion]  # the optic disc first, then the lesions in drawing order
    quadrants: set[str] = field(default_factory=set)  # quadrants holding haemorrhages


def fundus_demo_dir(cache_dir: str | os.PathLike | None = None, n_images: int = 600, size: int = 160) -> Path:
    """Where :func:`generate_fundus_demo` writes a demo of this size."""
    return demo_cache_dir(cache_dir) / f"{DEMO_NAME}-n{n_images}-s{size}"


def generate_fundus_demo(cache_dir: str | os.PathLike | None = None, seed: int = 0, n_images: int = 600,
                         size: int = 160) -> Path:
    """Write the demo once into ``fundus_demo_dir(cache_dir, n_images, size)`` (atomically) and return it.

    Args:
        cache_dir: demo cache (default ``$MMCLIN_CACHE`` or ``~/.cache/mmclin``).
        seed: generator seed; the same seed and sizes give the same files.
        n_images: number of photographs (at least 5, one per grade).
        size: side of the square JPEG images in pixels.

    Raises:
        ValueError: `n_images` or `size` too small, or the directory holds a demo made with another seed.
    """
    if n_images < len(ICDR_GRADES):
        raise ConfigError(f"n_images={n_images}: need at least {len(ICDR_GRADES)} (one per ICDR grade)")
    if size < 64:
        raise ConfigError(f"size={size}: lesions are not drawable below 64 px")
    settings = {"seed": seed, "n_images": n_images, "size": size}
    return build_once(fundus_demo_dir(cache_dir, n_images, size), settings,
                      lambda tmp: _write_demo(tmp, n_images, size, seed))


def _write_demo(tmp: Path, n_images: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    grades, splits = _assign_grades_and_splits(n_images, rng)
    (tmp / "images").mkdir()
    (tmp / NAMES_FILE).write_text("\n".join(LESION_CLASSES) + "\n")
    rows = []
    for i, (grade, split) in enumerate(zip(grades, splits), 1):
        scene_rng = np.random.default_rng(int(rng.integers(2**63)))
        scene = sample_fundus_scene(int(grade), scene_rng)
        stem = f"images/{i:04d}"
        Image.fromarray(render_fundus(scene, size)).save(tmp / f"{stem}.jpg", quality=92)
        (tmp / f"{stem}.txt").write_text("".join(f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n"
                                                 for c, cx, cy, w, h in scene_boxes(scene, size)))
        rows.append({"image": f"{stem}.jpg", "report": fundus_report(scene, scene_rng), "grade": int(grade),
                     "referral": REFERRALS[grade], "split": split})
    with open(tmp / REPORTS_CSV, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _assign_grades_and_splits(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Grades in `GRADE_SHARES` (each at least once), splits stratified by grade, in a shuffled order."""
    counts = np.maximum(1, np.floor(np.asarray(GRADE_SHARES) * n).astype(int))
    counts[0] += n - counts.sum()
    grades, splits = [], []
    for grade, k in enumerate(counts):
        n_val, n_test = (round(k * SPLIT_SHARES[s]) for s in ("val", "test"))
        grades += [grade] * k
        splits += ["val"] * n_val + ["test"] * n_test + ["train"] * (k - n_val - n_test)
    order = rng.permutation(n)
    return np.asarray(grades)[order], np.asarray(splits)[order]


# ---------------------------------------------------------------------------------------------- scene
def sample_fundus_scene(grade: int, rng: np.random.Generator) -> FundusScene:
    """Draw the anatomy and the lesions of one ICDR `grade` (0-4) photograph."""
    if grade not in range(len(ICDR_GRADES)):
        raise ConfigError(f"grade must be an ICDR grade 0-4; got {grade}")
    centre = 0.5 + rng.normal(0, 0.008, 2)
    radius = rng.uniform(0.44, 0.475)
    side = 1.0 if rng.random() < 0.5 else -1.0  # +1: right eye, optic disc on the right of the image
    disc = centre + np.array([side * rng.uniform(0.5, 0.58), rng.normal(0, 0.04)]) * radius
    disc_radius = rng.uniform(0.13, 0.16) * radius
    fovea = centre + np.array([-side * rng.uniform(0.0, 0.06), rng.uniform(0.0, 0.05)]) * radius
    base = np.asarray(_BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))], float) + rng.normal(0, 6, 3)
    scene = FundusScene(grade, centre, radius, disc, disc_radius, fovea, tuple(np.clip(base, 0, 255)),
                        int(rng.integers(2**31)), _vessel_tree(disc, fovea, centre, radius, side, rng), [])
    disc_outline = _ellipse(disc, disc_radius, disc_radius, 0.0)
    scene.lesions.append(Lesion("optic_disc", [("polygon", disc_outline)]))
    n_ma = {0: 0, 1: (3, 8), 2: (3, 9), 3: (4, 10), 4: (3, 9)}[grade]
    n_haem = {0: 0, 1: 0, 2: (2, 6), 3: None, 4: (2, 8)}[grade]
    n_exudate = {0: 0, 1: 0, 2: (1, 4), 3: (1, 4), 4: (0, 3)}[grade]
    for _ in range(int(rng.integers(*n_exudate)) if n_exudate else 0):
        scene.lesions.append(_exudate_cluster(scene, rng))
    for _ in range(int(rng.integers(*n_ma)) if n_ma else 0):
        r = rng.uniform(0.005, 0.008)
        scene.lesions.append(Lesion("microaneurysm", [("polygon", _ellipse(_free_spot(scene, rng), r, r, 0.0))]))
    if grade == 3:  # ICDR severe NPDR (4-2-1 rule, fewer than its 20 per quadrant): all four quadrants
        spots = [_free_spot(scene, rng, quadrant=q) for q in _QUADRANTS for _ in range(int(rng.integers(4, 7)))]
    else:
        spots = [_free_spot(scene, rng) for _ in range(int(rng.integers(*n_haem)) if n_haem else 0)]
    for spot in spots:
        rx = rng.uniform(0.011, 0.02)
        shape = _ellipse(spot, rx, rx * rng.uniform(0.6, 1.2), rng.uniform(0, np.pi))
        scene.lesions.append(Lesion("haemorrhage", [("polygon", shape)]))
        scene.quadrants.add(_quadrant(scene, spot))
    if grade == 4:
        scene.lesions.append(_neovascularisation(scene, rng))
        if rng.random() < 0.5:
            scene.lesions.append(_preretinal_haemorrhage(scene, side, rng))
    return scene


_QUADRANTS = ("superotemporal", "inferotemporal", "superonasal", "inferonasal")


def _quadrant(scene: FundusScene, point: np.ndarray) -> str:
    """Quadrant of `point` around the fovea; nasal is the optic disc's side."""
    nasal = (point[0] - scene.fovea[0]) * (scene.disc[0] - scene.fovea[0]) > 0
    return ("inferonasal" if nasal else "inferotemporal") if point[1] > scene.fovea[1] else \
        ("superonasal" if nasal else "superotemporal")


def _free_spot(scene: FundusScene, rng: np.random.Generator, quadrant: str | None = None) -> np.ndarray:
    """A point inside the fundus (away from its rim and off the optic disc), optionally in one quadrant."""
    while True:
        angle, r = rng.uniform(0, 2 * np.pi), scene.radius * math.sqrt(rng.uniform(0.01, 0.75))
        point = scene.centre + r * np.array([math.cos(angle), math.sin(angle)])
        if np.hypot(*(point - scene.disc)) < 1.8 * scene.disc_radius:
            continue
        if quadrant is None or _quadrant(scene, point) == quadrant:
            return point


def _ellipse(centre: np.ndarray, rx: float, ry: float, theta: float, n: int = 20) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(theta), math.sin(theta)
    return centre + np.stack([c * x - s * y, s * x + c * y], 1)


def _exudate_cluster(scene: FundusScene, rng: np.random.Generator) -> Lesion:
    """Yellow-white dots grouped near the macula, annotated as one box (CODRAS bundles clusters)."""
    while True:
        angle, r = rng.uniform(0, 2 * np.pi), rng.uniform(0.16, 0.4) * scene.radius
        centre = scene.fovea + r * np.array([math.cos(angle), math.sin(angle)])
        if np.hypot(*(centre - scene.disc)) > 2.2 * scene.disc_radius:
            break
    shapes = []
    for _ in range(int(rng.integers(4, 10))):
        dot = centre + rng.normal(0, 0.018, 2)
        size = rng.uniform(0.004, 0.008)
        shapes.append(("polygon", _ellipse(dot, size, size * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi), 12)))
    return Lesion("hard_exudates", shapes)


def _walk(start: np.ndarray, heading: float, steps: int, step: float, turn_sd: float, bend: float,
          rng: np.random.Generator) -> np.ndarray:
    points, angle = [start], heading
    for _ in range(steps):
        angle += bend + rng.normal(0, turn_sd)
        points.append(points[-1] + step * np.array([math.cos(angle), math.sin(angle)]))
    return np.asarray(points)


def _vessel_tree(disc, fovea, centre, radius, side, rng) -> list[tuple[np.ndarray, float]]:
    """Four trunks from the disc; the temporal arcades bend around the macula, branches split off them."""
    vessels: list[tuple[np.ndarray, float]] = []
    temporal = -side  # x direction from the disc towards the fovea

    def grow(start, heading, steps, width, bend, depth):
        path = [start]
        angle = heading
        for k in range(steps):
            angle += bend + rng.normal(0, 0.08)
            nxt = path[-1] + 0.045 * radius * np.array([math.cos(angle), math.sin(angle)])
            if np.hypot(*(nxt - centre)) > 0.95 * radius or np.hypot(*(nxt - fovea)) < 0.12 * radius:
                break
            path.append(nxt)
            if depth < 2 and k >= 2 and rng.random() < 0.2:
                grow(nxt, angle + rng.choice([-1, 1]) * rng.uniform(0.5, 1.0), int(steps * 0.6),
                     width * 0.65, bend * 0.5, depth + 1)
        if len(path) > 1:
            vessels.append((np.asarray(path), width))

    for vertical in (-1.0, 1.0):  # superior, inferior (y grows downwards)
        heading = math.atan2(vertical, temporal * rng.uniform(0.25, 0.5))
        # temporal arcades turn towards the temporal side: clockwise or anticlockwise by eye and hemifield
        bend = -vertical * temporal * rng.uniform(0.05, 0.075)
        grow(disc, heading, int(rng.integers(16, 22)), rng.uniform(0.014, 0.018), bend, 0)
        heading = math.atan2(vertical, -temporal * rng.uniform(0.5, 1.2))
        grow(disc, heading, int(rng.integers(7, 11)), rng.uniform(0.009, 0.012), vertical * temporal * 0.04, 0)
    return vessels


def _neovascularisation(scene: FundusScene, rng: np.random.Generator) -> Lesion:
    """New vessels at the disc: short, fine, tortuous loops on and around the optic disc."""
    shapes = []
    for _ in range(int(rng.integers(5, 9))):
        a, r = rng.uniform(0, 2 * np.pi), scene.disc_radius * rng.uniform(0.2, 1.2)
        start = scene.disc + r * np.array([math.cos(a), math.sin(a)])
        path = _walk(start, rng.uniform(0, 2 * np.pi), int(rng.integers(4, 8)), 0.01, 0.9, 0.0, rng)
        shapes.append(("line", path, 0.006))
    return Lesion("neovascularisation", shapes)


def _preretinal_haemorrhage(scene: FundusScene, side: float, rng: np.random.Generator) -> Lesion:
    """A boat-shaped haemorrhage (flat upper fluid level, round lower border) along an arcade."""
    centre = scene.fovea + np.array([side * rng.uniform(-0.1, 0.3), rng.choice([-1, 1]) * rng.uniform(0.3, 0.5)]) \
        * scene.radius
    rx = rng.uniform(0.035, 0.06)
    t = np.linspace(0, np.pi, 16)
    boat = centre + np.stack([rx * np.cos(t), rx * rng.uniform(0.6, 0.9) * np.sin(t)], 1)
    return Lesion("preretinal_haemorrhage", [("polygon", boat)])


# ---------------------------------------------------------------------------------------------- render
def _mask(size: int, shapes: list[tuple]) -> np.ndarray:
    """Coverage in [0, 1] of polygons and lines drawn at `_SUPERSAMPLE` x and box-reduced to `size`."""
    big = size * _SUPERSAMPLE
    canvas = Image.new("L", (big, big))
    draw = ImageDraw.Draw(canvas)
    for shape in shapes:
        pts = [tuple(p) for p in shape[1] * big]
        if shape[0] == "polygon":
            draw.polygon(pts, fill=255)
        else:
            draw.line(pts, fill=255, width=max(1, round(shape[2] * big)), joint="curve")
    return np.asarray(canvas.reduce(_SUPERSAMPLE), np.float32) / 255.0


def _blend(img: np.ndarray, alpha: np.ndarray, colour) -> np.ndarray:
    a = alpha[..., None]
    return img * (1 - a) + np.asarray(colour, np.float32) * a


def render_fundus(scene: FundusScene, size: int, lesions: bool = True) -> np.ndarray:
    """The photograph as (size, size, 3) uint8; ``lesions=False`` draws the same eye without its lesions."""
    rng = np.random.default_rng(scene.texture_seed)
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    dist = np.hypot(xx - scene.centre[0], yy - scene.centre[1]) / scene.radius
    texture = np.asarray(Image.fromarray(rng.uniform(0, 255, (7, 7)).astype(np.uint8)).resize((size, size),
                                                                                            Image.BICUBIC))
    shade = (1 - 0.35 * dist**3) * (0.92 + 0.16 * texture.astype(np.float32) / 255)
    fov = np.hypot(xx - scene.fovea[0], yy - scene.fovea[1]) / scene.radius
    shade *= (1 - 0.3 * np.exp(-fov**2 / (2 * 0.16**2))) * (1 - 0.25 * np.exp(-fov**2 / (2 * 0.035**2)))
    img = np.asarray(scene.background, np.float32) * shade[..., None]
    d_disc = np.hypot(xx - scene.disc[0], yy - scene.disc[1]) / scene.disc_radius
    img = _blend(img, np.clip((1 - d_disc) * size * scene.disc_radius / 3.0, 0, 1) * 0.95, _DISC)
    img = _blend(img, np.clip((0.45 - d_disc) * size * scene.disc_radius / 2.0, 0, 1) * 0.8, _CUP)
    vessels = _mask(size, [("line", path, width) for path, width in scene.vessels])
    img = _blend(img, np.asarray(Image.fromarray(vessels * 255).convert("L").filter(ImageFilter.GaussianBlur(0.5)),
                                 np.float32) / 255 * 0.75, _VESSEL)
    if lesions:
        for kind, colour in _LESION_COLOURS.items():
            shapes = [s for lesion in scene.lesions if lesion.kind == kind for s in lesion.shapes]
            if shapes:
                img = _blend(img, _mask(size, shapes) * 0.92, colour)
    img = img + rng.normal(0, 1.5, img.shape)  # sensor noise
    inside = np.clip((1 - dist) * scene.radius * size + 0.5, 0, 1)  # anti-aliased fundus rim
    img = img * inside[..., None] + rng.uniform(0, 4, img.shape) * (1 - inside[..., None])
    return np.clip(img, 0, 255).astype(np.uint8)


def scene_boxes(scene: FundusScene, size: int) -> list[tuple[int, float, float, float, float]]:
    """YOLO boxes ``(class_id, cx, cy, w, h)`` of the optic disc and lesions, one pixel of margin for blur."""
    margin = 1.0 / size
    boxes = []
    for lesion in scene.lesions:
        x0, y0, x1, y1 = np.clip(np.asarray(lesion.extent()) + [-margin, -margin, margin, margin], 0, 1)
        boxes.append((LESION_CLASSES.index(lesion.kind), (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0))
    return boxes


# ---------------------------------------------------------------------------------------------- report
_PHRASES = {
    "normal": ("normal optic disc, macula and vessels", "healthy-appearing retina", "unremarkable fundus"),
    "microaneurysm": ("a few microaneurysms", "scattered microaneurysms", "microaneurysms"),
    "haemorrhage_few": ("dot-blot haemorrhages", "intraretinal haemorrhages", "several haemorrhages"),
    "haemorrhage_4q": ("multiple haemorrhages in all four quadrants", "haemorrhages in all four quadrants",
                       "extensive haemorrhages in four quadrants"),
    "hard_exudates": ("hard exudates near the macula", "hard exudates at the posterior pole",
                      "exudates near the fovea"),
    "neovascularisation": ("neovascularisation at the disc", "new vessels at the optic disc",
                           "disc neovascularisation"),
    "preretinal_haemorrhage": ("a preretinal haemorrhage", "a boat-shaped preretinal haemorrhage"),
}
# Absent findings a report may state; a parser must read them as negated, not as present.
_NEGATIONS = {
    0: ("no microaneurysms or haemorrhages", "no haemorrhages or exudates", "no neovascularisation"),
    1: ("no haemorrhages or exudates", "no haemorrhages", "no new vessels"),
    2: ("no neovascularisation", "no signs of proliferative disease", "no new vessels"),
    3: ("no neovascularisation", "no signs of proliferative disease", "no new vessels"),
    4: (),
}
_IMPRESSIONS = ("Impression: {grade}, {referral}.", "Assessment: {grade}; {referral}.",
                "Conclusion: {grade}, {referral}.")


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def fundus_report(scene: FundusScene, rng: np.random.Generator) -> str:
    """A short report of what `scene` shows: findings, maybe a negated finding, then grade and referral."""
    kinds = {lesion.kind for lesion in scene.lesions}
    pick = lambda key: _PHRASES[key][int(rng.integers(len(_PHRASES[key])))]  # noqa: E731
    found = []
    if scene.grade == 0:
        found.append(pick("normal"))
    if "microaneurysm" in kinds and scene.grade in (1, 2):  # implied at grades 3-4; left out to keep reports short
        found.append(pick("microaneurysm"))
    if "neovascularisation" in kinds:
        found.append(pick("neovascularisation"))
    if "preretinal_haemorrhage" in kinds:
        found.append(pick("preretinal_haemorrhage"))
    if "haemorrhage" in kinds:
        found.append(pick("haemorrhage_4q" if scene.grade == 3 else "haemorrhage_few"))
    if "hard_exudates" in kinds:
        found.append(pick("hard_exudates"))
    text = _join(found)
    sentences = [text[0].upper() + text[1:] + "."]
    negations = _NEGATIONS[scene.grade]
    if negations and rng.random() < 0.5:
        negated = negations[int(rng.integers(len(negations)))]
        sentences.append(negated[0].upper() + negated[1:] + ".")
    impression = _IMPRESSIONS[int(rng.integers(len(_IMPRESSIONS)))]
    sentences.append(impression.format(grade=ICDR_GRADES[scene.grade], referral=REFERRALS[scene.grade]))
    return " ".join(sentences)
