from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import shared_data
from PIL import Image, ImageDraw

from datamodules.fundus import (
    DEFAULT_QUESTION,
    FundusReportDataModule,
    load_fundus,
    preprocess_fundus,
    read_aptos,
    read_class_names,
    read_idrid_grading,
    read_report_pairs,
    read_yolo_boxes,
)
from datamodules.synthetic.fundus import (
    ICDR_GRADES,
    LESION_CLASSES,
    REFERRALS,
    fundus_report,
    generate_fundus_demo,
    render_fundus,
    sample_fundus_scene,
    scene_boxes,
)
from mmclin.errors import DataError

IMAGENET_MEAN, IMAGENET_STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * IMAGENET_STD[:, None, None] + IMAGENET_MEAN[:, None, None]


def _states(text: str, phrase: str) -> bool:
    """`phrase` occurs as itself, not inside a longer grade ("proliferative" within "non-proliferative")."""
    return re.search(rf"(?<![\w-]){re.escape(phrase)}", text) is not None


def _pixel_boxes(image_dir: Path, names: list[str]) -> pd.DataFrame:
    """Every ``NNNN.txt`` of `image_dir` read as the datamodule reads it, with pixel corners on its ``NNNN.jpg``."""
    tables = []
    for txt in sorted(image_dir.glob("*.txt")):
        image = txt.with_suffix(".jpg")
        with Image.open(image) as im:  # reads the header only
            width, height = im.size
        boxes = read_yolo_boxes(txt, names, (width, height))
        tables.append(boxes.assign(image_id=txt.stem, path=str(image), width=width, height=height))
    return pd.concat(tables, ignore_index=True)


# ---------------------------------------------------------------- real IDRiD photographs in ../shared/data


def test_idrid_codras_boxes_parse_to_named_pixel_boxes_on_full_resolution_images():
    root = shared_data("fundus_idrid_codras")
    names = read_class_names(root / "retinal.names")
    assert names == ["optic_disc", "hard_exudates", "haemorrhage"]
    boxes = _pixel_boxes(root / "images", names)
    assert boxes["image_id"].nunique() == len(list((root / "images").glob("*.jpg"))) == 12
    assert set(boxes["width"]) == {4288} and set(boxes["height"]) == {2848}
    assert set(boxes["class_name"]) == set(names)
    assert (boxes[boxes["class_name"] == "optic_disc"].groupby("image_id").size() == 1).all()
    assert boxes.groupby("image_id").size().to_dict()["0003"] == 27  # 27 lines, the last without a newline
    # 0003.txt line 1: "0 0.22493003731343283 0.45400280898876405 0.1396921641791045 0.23525280898876405"
    disc = boxes[(boxes["image_id"] == "0003") & (boxes["line"] == 1)].iloc[0]
    assert disc["class_name"] == "optic_disc"
    assert disc[["x0", "y0", "x1", "y1"]].astype(float).tolist() == pytest.approx([665, 958, 1264, 1628])
    with Image.open(root / "images" / "0003.jpg") as im:
        assert im.size == (4288, 2848)
        full = np.asarray(im.convert("RGB"))
    assert full.shape == (2848, 4288, 3)
    # The optic-disc box lies on the brightest structure: brighter than the fundus on average.
    for image_id, rows in boxes.groupby("image_id"):
        with Image.open(rows["path"].iloc[0]) as im:
            im.draft("RGB", (536, 356))
            small = np.asarray(im.convert("RGB"), np.float32)
        scale = small.shape[1] / 4288
        d = rows[rows["class_name"] == "optic_disc"].iloc[0]
        disc_lum = small[int(d.y0 * scale):int(d.y1 * scale), int(d.x0 * scale):int(d.x1 * scale)].mean()
        fundus = small[..., 0] > 25
        assert disc_lum > small[fundus].mean() + 15, image_id


def test_preprocess_real_idrid_is_fast_path_of_a_full_decode():
    path = shared_data("fundus_idrid_codras") / "images" / "0003.jpg"
    x = preprocess_fundus(path, 224)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    rgb = _unnormalise(x)
    assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5
    r, g, b = rgb[:, 112, 112]
    assert r > g > b  # orange-red fundus in the centre
    # Reference: full 4288x2848 decode, the same foreground crop (red > 0.1) and resize.
    with Image.open(path) as im:
        full = im.convert("RGB")
    red = np.asarray(full)[..., 0] > 25.5
    cols, rows = np.flatnonzero(red.any(0)), np.flatnonzero(red.any(1))
    assert 200 < cols[0] < 330 and 3600 < cols[-1] < 3750  # the fundus does not fill the frame's width
    ref = full.crop((cols[0], rows[0], cols[-1] + 1, rows[-1] + 1))
    side = round(ref.width * 224 / ref.height)
    ref = np.asarray(ref.resize((side, 224), Image.BILINEAR, reducing_gap=None))[:, (side - 224) // 2:][:, :224]
    fast = load_fundus(path, 224).permute(1, 2, 0).numpy().astype(np.float32)
    assert np.abs(fast - ref).mean() < 2.0  # grey levels out of 255


# ---------------------------------------------------------------- preprocessing on drawn images


def _fundus_png(path: Path, size=(1200, 800), centre=(330, 420), radius=260) -> Path:
    im = Image.new("RGB", size)
    x, y = centre
    ImageDraw.Draw(im).ellipse((x - radius, y - radius, x + radius, y + radius), fill=(200, 90, 30))
    im.save(path)
    return path


def test_border_crop_centres_the_fundus_and_fills_the_frame(tmp_path):
    path = _fundus_png(tmp_path / "eye.png")  # off-centre disc on a wide black frame (PNG: reduce path)
    cropped = load_fundus(path, 64)
    assert cropped.shape == (3, 64, 64) and cropped.dtype == torch.uint8
    inside = (cropped[0] > 25).float()
    assert inside.mean().item() == pytest.approx(np.pi / 4, abs=0.04)  # a circle inscribed in the square
    assert inside[32, 1] == 1 and inside[32, 62] == 1 and inside[1, 32] == 1 and inside[0, 0] == 0
    uncropped = load_fundus(path, 64, crop_border=False)
    assert (uncropped[0] > 25).float().mean() < 0.6
    black = tmp_path / "black.png"
    Image.new("RGB", (300, 200)).save(black)
    with pytest.raises(DataError, match="black.png'.*no fundus found"):
        load_fundus(black, 64)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot read image .*broken.jpg"):
        load_fundus(broken, 64)


# ---------------------------------------------------------------- readers: values and named errors


def test_pairs_csv_reader_and_its_errors(tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,report,grade,referral,split\n"
                   "a.jpg,Microaneurysms. Impression: mild.,1,refer routinely,train\n"
                   "\n"
                   "sub/b.jpg,Normal fundus.,,,Validation\n")
    table = read_report_pairs(csv)
    assert table["path"].tolist() == [str(tmp_path / "a.jpg"), str(tmp_path / "sub" / "b.jpg")]
    assert table["grade"].tolist() == [1, -1] and table["referral"].tolist() == ["refer routinely", ""]
    assert table["split"].tolist() == ["train", "val"] and table["line"].tolist() == [2, 4]
    assert table["image_id"].tolist() == ["a", "b"]

    cases = {
        "image,text\na.jpg,x\n": r"pairs.csv: missing column\(s\) \['report'\]",
        "image,report\na.jpg,x\nb.jpg,  \n": r"pairs.csv line 3: empty report",
        "image,report,grade\na.jpg,x,2\n\nb.jpg,x,5\n": r"pairs.csv line 4: grade '5' is not an integer grade 0-4",
        "image,report,split\na.jpg,x,train\nb.jpg,x,\n": r"pairs.csv line 3: split is empty",
        "image,report,split\na.jpg,x,holdout\n": r"pairs.csv line 2: split 'holdout' is not one of",
    }
    for text, message in cases.items():
        csv.write_text(text)
        with pytest.raises(DataError, match=message):
            read_report_pairs(csv)
    with pytest.raises(DataError, match="nope.csv: CSV file not found"):
        read_report_pairs(tmp_path / "nope.csv")


def test_pairs_json_reader_names_the_line_of_the_bad_record(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text('[\n  {"image": "a.jpg", "report": "Normal.", "grade": 0},\n'
                    '  {\n    "image": "b.jpg",\n    "report": "Haemorrhages.",\n    "grade": null\n  }\n]\n')
    table = read_report_pairs(path)
    assert table["line"].tolist() == [2, 3] and table["grade"].tolist() == [0, -1]
    path.write_text('[\n  {"image": "a.jpg", "report": "x"},\n  {\n    "image": "b.jpg"\n  }\n]\n')
    with pytest.raises(DataError, match=r"pairs.json line 3: missing key\(s\) \['report'\]"):
        read_report_pairs(path)
    path.write_text('[\n  {"image": "a.jpg", "report": "x"},\n  {"image": "b.jpg" "report": "y"}\n]\n')
    with pytest.raises(DataError, match="pairs.json line 3: invalid JSON"):
        read_report_pairs(path)
    path.write_text('{"image": "a.jpg", "report": "x"}')
    with pytest.raises(DataError, match="expected a JSON list of objects"):
        read_report_pairs(path)


def test_grading_readers_aptos_and_idrid(tmp_path):
    (tmp_path / "train.csv").write_text("id_code,diagnosis\n000c1434d8d7,2\n001639a390f0,4\n")
    aptos = read_aptos(tmp_path / "train.csv")
    assert aptos["path"].tolist() == [str(tmp_path / "train_images" / "000c1434d8d7.png"),
                                      str(tmp_path / "train_images" / "001639a390f0.png")]
    assert aptos["grade"].tolist() == [2, 4] and aptos["referral"].tolist() == ["refer routinely", "refer urgently"]
    assert aptos["report"][1] == "Impression: proliferative diabetic retinopathy, refer urgently."
    (tmp_path / "train.csv").write_text("id_code,diagnosis\nx,1\ny,7\n")
    with pytest.raises(DataError, match="train.csv line 3: diagnosis '7'"):
        read_aptos(tmp_path / "train.csv")
    (tmp_path / "test.csv").write_text("id_code\nx\n")
    with pytest.raises(DataError, match=r"test.csv: missing column\(s\) \['diagnosis'\]"):
        read_aptos(tmp_path / "test.csv")

    # IDRiD's published header: trailing space after "edema", empty trailing columns in the training CSV.
    labels = tmp_path / "a. IDRiD_Disease Grading_Training Labels.csv"
    labels.write_text("Image name,Retinopathy grade,Risk of macular edema ,,,\n"
                      "IDRiD_001,3,2,,,\nIDRiD_002,0,0,,,\n,,,,,\n")
    idrid = read_idrid_grading(labels, tmp_path / "a. Training Set")
    assert idrid["path"].tolist() == [str(tmp_path / "a. Training Set" / f"IDRiD_00{i}.jpg") for i in (1, 2)]
    assert idrid["grade"].tolist() == [3, 0] and idrid["edema_risk"].tolist() == [2, 0]
    assert idrid["report"][0] == "Impression: severe non-proliferative diabetic retinopathy, refer soon."
    labels.write_text("Image name,Retinopathy grade\nIDRiD_001,3\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['Risk of macular edema'\]"):
        read_idrid_grading(labels, tmp_path)


def test_yolo_reader_rejects_or_counts_malformed_lines(tmp_path):
    txt = tmp_path / "0001.txt"
    txt.write_text("0 0.5 0.5 0.2 0.4\n1 0.5 0.5 0.2\n2 0.5 1.2 0.1 0.1\n7 0.5 0.5 0.1 0.1\n2 0.5 0.5 0 0.1\n"
                   "2 a 0.5 0.1 0.1\n\n2 0.25 0.75 0.1 0.1\n")
    names = ["optic_disc", "hard_exudates", "haemorrhage"]
    for line, message in ((2, "expected 5 fields"), (3, r"normalised to \[0, 1\]"), (4, "class 7 outside 0-2"),
                          (5, "box has no area"), (6, "integer class and four numbers")):
        lines = txt.read_text().splitlines()
        txt.write_text("\n".join([lines[0], *[x for k, x in enumerate(lines, 1) if k == line]]) + "\n")
        with pytest.raises(DataError, match=rf"0001.txt line 2: .*{message}"):
            read_yolo_boxes(txt, names)
        txt.write_text("\n".join(lines) + "\n")
    boxes = read_yolo_boxes(txt, names, image_size=(200, 100), on_error="skip")
    assert boxes.attrs["n_skipped_lines"] == 5
    assert boxes["line"].tolist() == [1, 8] and boxes["class_name"].tolist() == ["optic_disc", "haemorrhage"]
    np.testing.assert_allclose(boxes[["x0", "y0", "x1", "y1"]].to_numpy(float), [[80, 30, 120, 70], [40, 70, 60, 80]])


# ---------------------------------------------------------------- demo generator


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return generate_fundus_demo(tmp_path_factory.mktemp("fundus-cache"), n_images=20, size=128)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_is_deterministic_and_in_the_published_layouts(demo, tmp_path):
    again = generate_fundus_demo(tmp_path / "a", n_images=20, size=128)
    assert again.name == demo.name == "fundus-report-demo-v1-n20-s128"
    assert _digest(again) == _digest(demo)
    other = generate_fundus_demo(tmp_path / "b", seed=1, n_images=20, size=128)
    assert (other / "reports.csv").read_text() != (demo / "reports.csv").read_text()
    assert read_class_names(demo / "retinal.names") == list(LESION_CLASSES)
    assert LESION_CLASSES[:3] == ("optic_disc", "hard_exudates", "haemorrhage")  # CODRAS's ids
    table = read_report_pairs(demo / "reports.csv")
    assert len(table) == 20 and sorted(set(table["grade"])) == [0, 1, 2, 3, 4]
    assert set(table["split"]) == {"train", "val", "test"}
    with Image.open(table["path"][0]) as im:
        assert im.format == "JPEG" and im.size == (128, 128)
    with pytest.raises(ValueError, match="n_images=3"):
        generate_fundus_demo(tmp_path / "c", n_images=3)


def test_demo_reports_state_grade_and_referral_and_negate_absent_findings():
    negated = 0
    for i in range(150):
        rng = np.random.default_rng(i)
        grade = i % 5
        scene = sample_fundus_scene(grade, rng)
        report = fundus_report(scene, rng)
        assert len(report.split()) <= 25, report
        stated = [g for g, phrase in enumerate(ICDR_GRADES) if _states(report, phrase)]
        assert stated == [grade], report
        assert REFERRALS[grade] in report and (grade == 0) == ("no referral needed" in report)
        new_vessels = re.findall(r"(\w+ )?(neovascularisation|new vessels)", report.lower())
        if grade == 4:
            assert any(w != "no " for w, _ in new_vessels), report
        else:
            assert all(w == "no " for w, _ in new_vessels), report
        negated += report.lower().count(". no ")
        kinds = [lesion.kind for lesion in scene.lesions]
        assert kinds.count("optic_disc") == 1
        lesions = set(kinds) - {"optic_disc"}
        assert {0: lesions == set(), 1: lesions == {"microaneurysm"},
                2: lesions == {"microaneurysm", "haemorrhage", "hard_exudates"},
                3: scene.quadrants == {"superotemporal", "inferotemporal", "superonasal", "inferonasal"},
                4: "neovascularisation" in lesions}[grade], (grade, kinds)
    assert 30 < negated < 120  # negated findings appear in some reports, not all


def test_lesion_boxes_cover_exactly_the_drawn_lesions(demo):
    size = 128
    for seed, grade in enumerate((4, 1, 2, 3, 4)):
        scene = sample_fundus_scene(grade, np.random.default_rng(100 + seed))
        with_lesions = render_fundus(scene, size).astype(int)
        without = render_fundus(scene, size, lesions=False).astype(int)
        diff = np.abs(with_lesions - without).sum(-1)
        covered = np.zeros((size, size), bool)
        for class_id, cx, cy, w, h in scene_boxes(scene, size):
            x0, y0 = int((cx - w / 2) * size), int((cy - h / 2) * size)
            x1, y1 = int(np.ceil((cx + w / 2) * size)), int(np.ceil((cy + h / 2) * size))
            if LESION_CLASSES[class_id] == "optic_disc":
                assert with_lesions[y0:y1, x0:x1].mean() > with_lesions[size // 2 - 20:size // 2 + 20].mean()
                continue
            covered[y0:y1, x0:x1] = True
            green = (with_lesions - without)[y0:y1, x0:x1, 1]
            # exudates are yellow-white (brighter), haemorrhages and new vessels dark or red (less green)
            change = green.max() if LESION_CLASSES[class_id] == "hard_exudates" else -green.min()
            assert change > 25, (seed, LESION_CLASSES[class_id])
        assert not (diff > 6)[~covered].any()  # nothing drawn outside the boxes
    # On disk: the boxes in the demo's txt files mark lesion-coloured pixels of its JPEGs.
    boxes = _pixel_boxes(demo / "images", read_class_names(demo / "retinal.names"))
    assert set(boxes["class_name"]) == set(LESION_CLASSES)
    for image_id, rows in boxes.groupby("image_id"):
        with Image.open(rows["path"].iloc[0]) as im:
            rgb = np.asarray(im, np.float32)
        for r in rows.itertuples():
            x0, y0, x1, y1 = int(r.x0), int(r.y0), int(np.ceil(r.x1)), int(np.ceil(r.y1))
            patch = rgb[y0:y1, x0:x1, 1]
            surround = np.median(rgb[max(0, y0 - 4):y1 + 4, max(0, x0 - 4):x1 + 4, 1])  # mostly background
            if r.class_name == "hard_exudates":
                assert patch.max() > 1.5 * surround, (image_id, r.line)
            elif r.class_name != "optic_disc":
                assert patch.min() < 0.8 * surround, (image_id, r.line, r.class_name)


# ---------------------------------------------------------------- datamodule


def test_datamodule_samples_on_the_demo(demo):
    dm = FundusReportDataModule(cache_dir=str(demo.parent), demo_images=20, demo_image_size=128, image_size=64)
    dm.setup()
    sizes = {k: len(v) for k, v in dm.datasets.items()}
    assert sum(sizes.values()) == 20 and min(sizes.values()) > 0
    sample = dm.datasets["train"][0]
    assert set(sample) == {"image", "question", "answer", "choices", "meta"}
    assert len(sample["image"]) == 1 and sample["image"][0].shape == (3, 64, 64)
    assert sample["image"][0].dtype == torch.float32
    rgb = _unnormalise(sample["image"][0])
    assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5 and rgb[0, 24:40, 24:40].mean() > 0.3  # fundus
    assert sample["question"] == DEFAULT_QUESTION and sample["choices"] == []
    meta = sample["meta"]
    assert set(meta) == {"image_id", "grade", "referral"} and meta["image_id"].isdigit()
    assert _states(sample["answer"], ICDR_GRADES[meta["grade"]]) and meta["referral"] == REFERRALS[meta["grade"]]
    lazy = FundusReportDataModule(cache_dir=str(demo.parent), demo_images=20, demo_image_size=128, image_size=64,
                                  cache_images=False)
    lazy.setup()
    assert torch.equal(lazy.datasets["train"][0]["image"][0], sample["image"][0])
    grades = dm.datasets["train"].table["grade"]
    majority = grades.value_counts().idxmax()
    test = dm.datasets["test"].table["grade"]
    baselines = dm.baselines("test")
    assert baselines["majority_grade_acc"] == pytest.approx((test == majority).mean())
    assert 0 <= baselines["majority_grade_macro_f1"] <= baselines["majority_grade_acc"] + 1e-9


def test_datamodule_skips_and_counts_missing_images(tmp_path):
    _fundus_png(tmp_path / "a.png", size=(120, 80), centre=(60, 40), radius=38)
    (tmp_path / "reports.json").write_text('[{"image": "a.png", "report": "Normal.", "grade": 0},\n'
                                           ' {"image": "gone.png", "report": "Haemorrhages.", "grade": 2}]')
    strict = FundusReportDataModule(root=str(tmp_path), format="pairs-json", image_size=32)
    with pytest.raises(DataError, match=r"reports.json line 2: image '.*gone.png' not found"):
        strict.setup()
    dm = FundusReportDataModule(root=str(tmp_path), format="pairs-json", image_size=32, on_missing="skip",
                                val_fraction=0.0, test_fraction=0.0)
    dm.setup()
    assert len(dm.skipped) == 1 and dm.skipped["line"].tolist() == [2]
    assert len(dm.datasets["train"]) == 1 and dm.datasets["train"][0]["meta"]["grade"] == 0
