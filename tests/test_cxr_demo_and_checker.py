"""The CXR report demo (IU-Xray layout, pixels that agree with the reports), the report-error datamodule and the
text-only report checker."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CONFIGS
from PIL import Image

from datamodules.report_errors import (
    NO_ERROR_ANSWER,
    QUESTION,
    ReportErrorDataModule,
    ReportErrorDataset,
    error_answer,
    read_error_records,
)
from datamodules.reports import read_iu_xray
from datamodules.synthetic.cxr import (
    CARINA_V,
    COSTOPHRENIC_V,
    DEFAULTS,
    FINDINGS_JSONL,
    HEART_CENTRE_V,
    PROJECTION_COLUMNS,
    PROJECTIONS_CSV,
    REPORT_COLUMNS,
    REPORTS_CSV,
    THORAX_HALF_WIDTH,
    ZONE_V,
    demo_dir,
    generate_cxr_demo,
    lung_lateral_t,
)
from mmclin.errors import DataError
from mmclin.models.report_checker import ReportChecker
from mmclin.reports.injection import FINE_TYPES, error_sites

N_STUDIES, SIZE = 150, 128


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return generate_cxr_demo(tmp_path_factory.mktemp("cxr-cache"), seed=0, n_studies=N_STUDIES, size=SIZE)


@pytest.fixture(scope="module")
def truth(demo) -> list[dict]:
    return [json.loads(line) for line in (demo / FINDINGS_JSONL).read_text().splitlines()]


@pytest.fixture(scope="module")
def reports(demo) -> dict[int, dict]:
    with open(demo / REPORTS_CSV, newline="", encoding="utf-8") as f:
        return {int(row["uid"]): row for row in csv.DictReader(f)}


@pytest.fixture
def one_thread():
    """Train on one thread: on a CPU shared with other jobs, two threads' spin-waiting makes steps ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pixels(demo: Path, row: dict) -> np.ndarray:
    return np.asarray(Image.open(demo / "images" / row["filename"]), dtype=np.float32)


def _finding(row: dict, kind: str) -> dict | None:
    return next((f for f in row["findings"] if f["kind"] == kind), None)


def _side_box(image: np.ndarray, side: str, t: tuple[float, float], v: tuple[float, float]) -> np.ndarray:
    """Pixels at distance t from the midline on the patient's `side` (viewer's left = patient's right)."""
    n = image.shape[0]
    cols = np.arange(n)
    dist = np.abs((cols + 0.5) / n - 0.5)
    on_side = (cols + 0.5) / n < 0.5 if side == "right" else (cols + 0.5) / n > 0.5
    rows = slice(int(v[0] * n), int(np.ceil(v[1] * n)))
    return image[rows][:, on_side & (dist >= t[0]) & (dist <= t[1])]


# ------------------------------------------------------------------------------------------------- demo files
def test_demo_is_deterministic_and_settings_are_kept_apart(tmp_path):
    a = generate_cxr_demo(tmp_path / "a", seed=3, n_studies=12, size=64)
    b = generate_cxr_demo(tmp_path / "b", seed=3, n_studies=12, size=64)
    digest = lambda root: {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
                           for p in sorted(root.rglob("*")) if p.is_file()}
    assert digest(a) == digest(b) and len(digest(a)) == 12 + 4  # images, two CSVs, findings.jsonl, marker
    other = generate_cxr_demo(tmp_path / "a", seed=4, n_studies=12, size=64)
    assert other != a and digest(other)[REPORTS_CSV] != digest(a)[REPORTS_CSV]
    assert demo_dir(tmp_path, **DEFAULTS).name == "cxr-report-demo-v2"
    assert generate_cxr_demo(tmp_path / "a", seed=3, n_studies=12, size=64) == a  # reused, not rewritten


def test_demo_writes_the_iu_xray_csv_pair(demo, truth, reports):
    for name, columns in ((REPORTS_CSV, REPORT_COLUMNS), (PROJECTIONS_CSV, PROJECTION_COLUMNS)):
        with open(demo / name, newline="") as f:
            assert tuple(next(csv.reader(f))) == columns
    with open(demo / PROJECTIONS_CSV, newline="") as f:
        projections = list(csv.DictReader(f))
    assert [int(p["uid"]) for p in projections] == list(range(1, N_STUDIES + 1)) == sorted(reports)
    for p in projections:
        assert p["projection"] == "Frontal" and p["filename"] == f"{p['uid']}_IM-{int(p['uid']):04d}-1001.dcm.png"
        with Image.open(demo / "images" / p["filename"]) as image:
            assert image.mode == "L" and image.size == (SIZE, SIZE)
    for row in truth:
        report = reports[row["uid"]]
        assert report["MeSH"].split(";") == row["mesh"]
        assert (report["MeSH"] == "normal") == (not row["findings"] and not row["devices"])
        assert report["comparison"] == ("Chest radiograph XXXX." if row["comparison"] else "None.")
        assert row["pixel_spacing_mm"] == pytest.approx(375.0 / SIZE)
    read = read_iu_xray(demo / REPORTS_CSV, image_root=demo / "images").reports
    assert len(read) == N_STUDIES and read[0].id == "1" and Path(read[0].images[0]).is_file()
    assert "FINDINGS: " in read[0].text and "IMPRESSION: " in read[0].text


def test_reports_state_what_is_drawn(truth, reports):
    for row in truth:
        findings, impression = reports[row["uid"]]["findings"].lower(), reports[row["uid"]]["impression"].lower()
        effusion, pneumothorax = _finding(row, "effusion"), _finding(row, "pneumothorax")
        if effusion:  # the impression restates it in full, or by name only (a brief impression)
            phrase = f"{effusion['severity']} {effusion['side']} pleural effusion"
            assert phrase in findings and (phrase in impression or impression.startswith("pleural effusion."))
        else:
            assert "no pleural effusion" in findings
        if pneumothorax:
            assert f"{pneumothorax['severity']} {pneumothorax['side']} " in findings and "pneumothorax" in impression
        else:
            assert "no pneumothorax" in findings or "no evidence of pneumothorax" in findings \
                or "no pleural effusion or pneumothorax" in findings
        nodule = _finding(row, "nodule")
        if nodule:
            size = f"{nodule['size_mm'] / 10:g} cm" if nodule["unit"] == "cm" else f"{nodule['size_mm']:g} mm"
            assert f"{size} nodule" in findings and nodule["lobe"] in findings
            assert size in impression or "pulmonary nodule." in impression
        for device in row["devices"]:
            if device["kind"] == "picc":
                assert f"{device['side']} picc" in findings or f"{device['side']}-sided picc" in findings
            if device["kind"] == "ett":
                assert f"{device['above_carina_cm']:g} cm above the carina" in findings
        intervals = {f.get("interval") for f in row["findings"] + row["devices"]} - {None}
        assert bool(intervals) <= row["comparison"]  # interval words only where there is a prior study


def test_brief_impressions_leave_a_side_swap_to_the_image(demo, reports):
    """A laterality swap contradicts a full impression, which the rules see; beside a brief one only the image
    shows it."""
    from mmclin.reports.injection import inject
    from mmclin.reports.rules import RuleChecker

    rules, flagged = RuleChecker(), {"brief": [], "full": []}
    for report in read_iu_xray(demo / REPORTS_CSV).reports:
        impression = reports[int(report.id)]["impression"].lower()
        if not any(side in report.text.lower() for side in ("left", "right")) or "no acute" in impression \
                or "normal chest" in impression:
            continue
        error = inject(report.text, "laterality_swap", np.random.default_rng(0))
        if error is not None:
            brief = not any(side in impression for side in ("left", "right"))
            flagged["brief" if brief else "full"].append(rules.check(error.modified)["has_error"])
    assert len(flagged["brief"]) >= 10 and len(flagged["full"]) >= 10
    assert np.mean(flagged["brief"]) < 0.2 and np.mean(flagged["full"]) > 0.5


def test_every_error_type_has_sites_in_the_demo(demo):
    texts = [r.text for r in read_iu_xray(demo / REPORTS_CSV)]
    for fine_type in FINE_TYPES:
        assert sum(bool(error_sites(t, fine_type)) for t in texts) >= 10, fine_type


# ------------------------------------------------------------------------------------------- pixels vs report
def test_effusion_fills_its_costophrenic_angle(demo, truth):
    margins = {"small": [], "moderate": [], "large": []}
    for row in truth:
        effusion = _finding(row, "effusion")
        if effusion is None:
            continue
        image = _pixels(demo, row)
        other = "left" if effusion["side"] == "right" else "right"
        angle = {s: _side_box(image, s, (0.32, THORAX_HALF_WIDTH), (COSTOPHRENIC_V[s] - 0.10, COSTOPHRENIC_V[s]))
                 for s in ("right", "left")}
        margins[effusion["severity"]].append(angle[effusion["side"]].mean() - angle[other].mean())
    assert all(margins.values()), {k: len(v) for k, v in margins.items()}
    assert min(min(v) for v in margins.values()) > 8  # grey levels: blunted, fluid-dense angle on the named side
    assert np.median(margins["small"]) < np.median(margins["large"])


def test_pneumothorax_is_a_dark_rim_without_markings(demo, truth):
    found = 0
    for row in truth:
        ptx = _finding(row, "pneumothorax")
        if ptx is None or _finding(row, "effusion"):
            continue
        image = _pixels(demo, row)
        other = "left" if ptx["side"] == "right" else "right"
        rim = {s: np.concatenate([_side_box(image, s, (lung_lateral_t(v) - 0.03, lung_lateral_t(v) - 0.01),
                                            (v, v + 0.01)).ravel() for v in np.arange(0.35, 0.6, 0.01)])
               for s in ("right", "left")}
        assert rim[ptx["side"]].mean() < rim[other].mean() - 15, row["uid"]
        found += 1
    assert found >= 5


def test_heart_width_gives_the_cardiothoracic_ratio(demo, truth):
    measured, stated = [], []
    for row in truth:
        # above fluid over a rib (~0.67), below mediastinum (0.78) and heart (0.84)
        line = _pixels(demo, row)[int(HEART_CENTRE_V * SIZE)] / 255 > 0.70
        mid = SIZE // 2
        left, right = mid, mid
        while left > 0 and line[left - 1]:
            left -= 1
        while right < SIZE - 1 and line[right + 1]:
            right += 1
        measured.append((right - left + 1) / (2 * THORAX_HALF_WIDTH * SIZE))
        stated.append(row["ctr"])
        cardiomegaly = _finding(row, "cardiomegaly")
        assert (measured[-1] > 0.505) == (cardiomegaly is not None), (row["uid"], measured[-1], row["ctr"])
    np.testing.assert_allclose(measured, stated, atol=0.02)


def test_nodule_is_drawn_to_scale_in_its_zone(demo, truth):
    found = mirrored = 0
    for row in truth:
        nodule = _finding(row, "nodule")
        if nodule is None or nodule["size_mm"] < 8:
            continue
        image = _pixels(demo, row) / 255
        x, y = (round(c) for c in nodule["centre_px"])
        assert (x < SIZE / 2) == (nodule["side"] == "right")
        assert abs((y + 0.5) / SIZE - ZONE_V[nodule["zone"]]) < 0.05
        radius_px = nodule["size_mm"] / 2 / row["pixel_spacing_mm"]
        yy, xx = np.mgrid[0:SIZE, 0:SIZE]
        dist = np.hypot(yy - nodule["centre_px"][1], xx - nodule["centre_px"][0])
        mirror = np.hypot(yy - nodule["centre_px"][1], xx - (SIZE - 1 - nodule["centre_px"][0]))
        excess, background = {}, {}
        for name, d in (("nodule", dist), ("mirror", mirror)):
            disc, ring = d <= radius_px + 1.5, (d > radius_px + 1.5) & (d <= radius_px + 4)
            background[name] = np.median(image[ring])
            excess[name] = (image[disc] - background[name]).sum() / 0.30  # nodule: +0.30; blur keeps sums
        diameter_mm = 2 * np.sqrt(max(excess["nodule"], 0) / np.pi) * row["pixel_spacing_mm"]
        assert diameter_mm == pytest.approx(nodule["size_mm"], rel=0.3), row["uid"]
        if image[mirror <= radius_px + 4].max() < 0.6:  # the mirror spot is in lung, off the heart and devices
            assert excess["mirror"] < 0.5 * excess["nodule"], row["uid"]  # nothing like it on the other side
            mirrored += 1
        found += 1
    assert found >= 5 and mirrored >= 3


def test_devices_are_drawn_along_their_course(demo, truth):
    kinds = set()
    for row in truth:
        image = _pixels(demo, row) / 255
        for device in row["devices"]:
            kinds.add((device["kind"], device.get("side")))
            path = np.array(device["path_px"])
            points = np.concatenate([np.linspace(a, b, int(np.hypot(*(b - a))) + 2) for a, b in zip(path, path[1:])])
            inside = points[(points >= 0).all(1) & (points <= SIZE - 1).all(1)]
            rows, cols = np.round(inside[:, 1]).astype(int), np.round(inside[:, 0]).astype(int)
            brightest = np.max([image[np.clip(rows + dy, 0, SIZE - 1), np.clip(cols + dx, 0, SIZE - 1)]
                                for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)  # a thin line spans pixels
            assert np.median(brightest) > 0.8, (row["uid"], device["kind"])
            if device["kind"] == "picc":  # the arm it enters from is the stated side (viewer's left = right arm)
                assert (path[0][0] < SIZE / 2) == (device["side"] == "right")
            if device["kind"] == "ett":
                tip_y = path[-1][1]
                cm_above = ((CARINA_V * SIZE - 0.5) - tip_y) * row["pixel_spacing_mm"] / 10
                assert cm_above == pytest.approx(device["above_carina_cm"], abs=0.2)
                column = image[:, SIZE // 2 - 1:SIZE // 2 + 1].mean(1)
                assert column[int(tip_y) - 3] > column[int(tip_y) + 4] + 0.2  # the tube stops at its tip
    assert {("ett", None), ("ng", None), ("picc", "right"), ("picc", "left")} <= kinds


# ---------------------------------------------------------------------------------------------- datamodule
def test_datamodule_splits_by_study_and_injects_per_split(demo, tmp_path):
    dm = ReportErrorDataModule(root=str(demo), seed=1)
    dm.setup()
    ids = {s: {r["id"] for r in dm.records[s]} for s in ("train", "val", "test")}
    assert sum(map(len, ids.values())) == N_STUDIES and not (ids["train"] & ids["val"] or ids["train"] & ids["test"]
                                                             or ids["val"] & ids["test"])
    assert len(ids["val"]) == len(ids["test"]) == round(0.15 * N_STUDIES)
    for split in ("train", "val", "test"):
        records = dm.records[split]
        assert sum(r["has_error"] for r in records) == round(0.5 * len(records))
        assert all((r["modified"] != r["original"]) == r["has_error"] for r in records)
    again = ReportErrorDataModule(root=str(demo), seed=1)
    again.setup()
    assert again.records == dm.records
    assert dm._inject("train", epoch=1) != dm.records["train"]  # fresh training errors in later epochs
    assert dm.corpus("train") == [r["original"] for r in dm.records["train"]]

    # an errors.jsonl from the inject tool reads back as the same records, without a second injection
    path = tmp_path / "errors.jsonl"
    path.write_text("".join(json.dumps({**r, "split": s}) + "\n" for s in ("train", "val", "test")
                            for r in dm.records[s]))
    from_file = ReportErrorDataModule(root=str(path))
    from_file.setup()
    assert from_file.records["test"] == [{**r, "split": "test"} for r in dm.records["test"]]
    path.write_text('{"id": "1", "original": "x"}\n')
    with pytest.raises(DataError, match=r"errors.jsonl:1: record lacks \['modified', 'has_error', 'fine_type'\]"):
        read_error_records(path)


def test_qa_mode_gives_image_question_answer_samples(demo):
    dm = ReportErrorDataModule(root=str(demo), mode="qa", image_size=64)
    dm.setup()
    assert dm.choices == [NO_ERROR_ANSWER] + [f"error: yes; type: {t}" for t in FINE_TYPES]
    dataset = _dataset(dm, "val")
    samples = [dataset[i] for i in range(len(dataset))]
    for sample, record in zip(samples, dm.records["val"]):
        (image,) = sample["image"]
        assert image.shape == (1, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() < image.max() <= 1
        assert sample["question"] == f"{record['modified']}\n{QUESTION}"
        assert sample["answer"] == error_answer(record["fine_type"] if record["has_error"] else None)
        assert sample["answer"] in sample["choices"] and sample["meta"]["id"] == record["id"]
    from mmclin.llm import byte_tokenizer
    from mmclin.tasks.qa import QACollator

    batch = QACollator(byte_tokenizer(), media_keys=("image",))(samples[:3])  # what MultimodalLM batches with
    assert batch["image"].shape == (3, 1, 64, 64) and batch["image_sample"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="with_images cannot be False"):
        ReportErrorDataModule(mode="qa", with_images=False)


def test_mesh_classes_give_image_targets_from_the_studys_findings(demo, truth):
    classes = {"effusion_right": "^Pleural Effusion/right", "effusion_left": "^Pleural Effusion/left",
               "tube": "^Tube, Inserted"}
    dm = ReportErrorDataModule(root=str(demo), mode="qa", image_size=64, mesh_classes=classes)
    dm.setup()
    assert dm.aux_classes == list(classes)
    dataset = ReportErrorDataset(dm.records["val"], "qa", True, dm.choices, 64, dm.mesh_classes)
    by_uid = {row["uid"]: row for row in truth}
    for i, record in enumerate(dm.records["val"]):
        study = by_uid[int(record["id"])]
        effusion = _finding(study, "effusion")
        expected = [effusion is not None and effusion["side"] == "right", effusion is not None and
                    effusion["side"] == "left", any(d["kind"] in ("ett", "ng") for d in study["devices"])]
        assert dataset[i]["image_targets"][0].tolist() == [float(e) for e in expected], record["mesh"]
    with pytest.raises(DataError, match="report 7: mesh_classes needs the study's MeSH terms"):
        dataset.targets({"id": "7", "modified": "No acute disease."})
    with pytest.raises(ValueError, match="not a regular expression"):
        ReportErrorDataModule(mode="qa", mesh_classes={"bad": "(unclosed"})
    with pytest.raises(ValueError, match="text checker has no image encoder"):
        ReportErrorDataModule(mode="text", mesh_classes=classes)


def _dataset(dm: ReportErrorDataModule, split: str):
    from datamodules.report_errors import ReportErrorDataset

    return ReportErrorDataset(dm.records[split], dm.hparams.mode, dm.with_images, dm.choices, dm.hparams.image_size)


# ------------------------------------------------------------------------------------------------- checker
def test_checker_learns_to_flag_errors_and_round_trips(demo, tmp_path, one_thread):
    import lightning as L

    L.seed_everything(0)
    # Typos (non-words) can be seen in the text alone; with them the checker must beat chance quickly. (Inserted
    # findings are now sentences that other studies wrote, so they no longer give themselves away by wording.)
    dm = ReportErrorDataModule(root=str(demo), error_types=["typo_homophone"], batch_size=16)
    model = ReportChecker(encoder={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1},
                          max_length=256, pooling="max", lr=3e-3, dropout=0.0, warmup=0.1)
    trainer = L.Trainer(max_epochs=20, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        reload_dataloaders_every_n_epochs=1, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    (metrics,) = trainer.test(model, datamodule=dm, verbose=False)
    # chance: 0.5 SIMPLE accuracy; COMPLEX macro-F1 over none / typo ~0.5
    assert metrics["test/simple_acc"] >= 0.8 and metrics["test/complex_macro_f1"] >= 0.7, metrics
    assert model.hparams.vocab[:4] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] and "effusion" in model.hparams.vocab

    records = dm.records["test"]
    predicted = model.predict_reports(records, batch_size=8, progress=False)
    assert len(predicted) == len(records)
    for p in predicted:
        assert set(p) == {"has_error", "fine_type", "coarse_type", "p_error", "n_windows"} and 0 <= p["p_error"] <= 1
        assert p["has_error"] == (p["p_error"] >= 0.5) == (p["fine_type"] is not None)
        assert p["coarse_type"] == (FINE_TYPES[p["fine_type"]] if p["fine_type"] else None)
    via_trainer = [p for batch in trainer.predict(model, datamodule=dm) for p in batch]  # test split
    assert [{**p, "p_error": 0} for p in via_trainer] == [{**p, "p_error": 0} for p in predicted]
    np.testing.assert_allclose([p["p_error"] for p in via_trainer], [p["p_error"] for p in predicted], atol=1e-6)
    accuracy = np.mean([p["has_error"] == r["has_error"] for p, r in zip(predicted, records)])
    assert accuracy == pytest.approx(metrics["test/simple_acc"], abs=1e-6)

    path = tmp_path / "checker.ckpt"
    trainer.save_checkpoint(path)
    loaded = ReportChecker.load_from_checkpoint(path)
    again = loaded.predict_reports(records, progress=False)
    assert [{**p, "p_error": 0} for p in again] == [{**p, "p_error": 0} for p in predicted]
    np.testing.assert_allclose([p["p_error"] for p in again], [p["p_error"] for p in predicted], atol=1e-6)
    with pytest.raises(DataError, match="record 7: expected a dict with the report text under 'modified'"):
        loaded.predict_reports([{"id": 7, "original": "x"}], progress=False)


def test_config_runs_a_step(tmp_path, one_thread):
    from mmclin.cli import build_cli

    override = tmp_path / "tiny.yaml"
    override.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "limit_train_batches": 2, "max_epochs": 1, "limit_val_batches": 1,
                    "default_root_dir": str(tmp_path), "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path)}}},
        "model": {"init_args": {"encoder": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}}},
        "data": {"init_args": {"demo_studies": 40, "demo_image_size": 64, "cache_dir": str(tmp_path / "cache"),
                               "batch_size": 8}},
    }))
    cli = build_cli(["fit", "-c", str(CONFIGS / "cxr-error-check-text.yaml"), "-c", str(override)])
    assert cli.trainer.global_step == 2
    assert 0 <= cli.trainer.callback_metrics["test/simple_acc"] <= 1  # test_after_fit: the test split follows
    assert cli.model.collator is not None and len(cli.model.hparams.vocab) > 50
