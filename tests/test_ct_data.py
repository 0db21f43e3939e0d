from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from conftest import shared_data

from datamodules.ct import (
    CTPreprocessing,
    CTVolumeDataset,
    LoadCTd,
    check_dicom_series,
    load_ct,
    read_deeptumorvqa,
    read_m3d_vqa,
    split_options,
)
from datamodules.ct_vqa import CTVQADataModule
from mmclin.errors import ConfigError, DataError

# Native geometry, no window, no crop: the output is the stored voxels, reordered to (z, y, x).
RAW = {"spacing": None, "hu_window": None, "foreground_hu": None, "resize_mode": "pad_crop"}
LIVER, SPLEEN = 5, 1  # TotalSegmentator 'total' task label ids


def raw(grid) -> CTPreprocessing:
    return CTPreprocessing(grid=grid, **RAW)


def voxel_sizes(affine) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


def write_nifti(path, data, affine=None, dtype=np.int16):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None
                             else affine), str(path))
    return path


def phantom(shape=(20, 18, 10), lesion=False) -> np.ndarray:
    """HU volume (x, y, z): air around an elliptic 40 HU body, optionally a 120 HU lesion on the patient's right."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    body = np.where((x / 0.8) ** 2 + (y / 0.7) ** 2 < 1, 40, -1000)
    if lesion:
        body[(x - 0.4) ** 2 + y**2 + z**2 < 0.1] = 120
    return body


# ---------------------------------------------------------------- real CT in ../shared/data


def test_real_nifti_keeps_hu_orientation_and_spacing():
    root = shared_data("ct_totalsegmentator_example")
    hu = np.asarray(nib.load(root / "example_ct.nii.gz").dataobj)  # (x, y, z) = (122, 101, 112), RAS, 3 mm
    out = load_ct(root / "example_ct.nii.gz", raw((112, 101, 122)))["image"]
    assert out.shape == (1, 112, 101, 122) and out.dtype == torch.float32
    assert nib.aff2axcodes(out.affine.numpy()) == ("S", "A", "R")
    np.testing.assert_allclose(voxel_sizes(out.affine), [3.0, 3.0, 3.0])
    np.testing.assert_array_equal(out[0].numpy(), hu.transpose(2, 1, 0))  # the same voxels as nibabel reads
    assert -1030 <= np.percentile(hu, 5) <= -990  # air outside the body sits at about -1000 HU
    assert -150 <= np.median(hu[hu > -500]) <= 100  # the body is mostly fat and soft tissue
    windowed = load_ct(root / "example_ct.nii.gz", dataclasses.replace(raw((112, 101, 122)),
                                                                       hu_window=(-1000, 1000)))["image"]
    np.testing.assert_allclose(windowed[0].numpy(), np.clip((hu.transpose(2, 1, 0) + 1000) / 2000, 0, 1), atol=1e-6)
    assert float(windowed.min()) == 0.0 and float(windowed.max()) == 1.0  # clipped: -1207 and 3382 HU exist


def test_real_nifti_stored_lps_loads_as_the_ras_original(tmp_path):
    root = shared_data("ct_totalsegmentator_example")
    image = nib.load(root / "example_ct_sm.nii.gz")  # 122 x 101 x 30, RAS, 3 mm
    n0, n1 = image.shape[:2]
    flip = np.array([[-1, 0, 0, n0 - 1], [0, -1, 0, n1 - 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    lps = nib.Nifti1Image(np.asarray(image.dataobj)[::-1, ::-1, :].copy(), image.affine @ flip)
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    nib.save(lps, str(tmp_path / "lps.nii.gz"))
    pre = CTPreprocessing(spacing=(6.0, 4.5, 4.5), grid=(16, 70, 84), resize_mode="pad_crop", foreground_hu=None)
    a, b = load_ct(root / "example_ct_sm.nii.gz", pre)["image"], load_ct(tmp_path / "lps.nii.gz", pre)["image"]
    torch.testing.assert_close(a, b)
    np.testing.assert_allclose(a.affine.numpy(), b.affine.numpy(), atol=1e-4)
    assert nib.aff2axcodes(a.affine.numpy()) == ("S", "A", "R")
    np.testing.assert_allclose(voxel_sizes(a.affine), [6.0, 4.5, 4.5])  # the configured (z, y, x) spacing
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0


def test_real_mask_follows_its_ct_through_the_pipeline():
    root = shared_data("ct_totalsegmentator_example")
    seg = np.asarray(nib.load(root / "example_seg.nii.gz").dataobj)
    pre = CTPreprocessing(spacing=(4.5, 4.5, 4.5), hu_window=None, grid=(16, 32, 32))
    out = load_ct(root / "example_ct_sm.nii.gz", pre, mask=root / "example_seg.nii.gz")
    image, mask = out["image"], out["mask"]
    assert image.shape == mask.shape == (1, 16, 32, 32) and mask.dtype == torch.int64
    assert set(torch.unique(mask).tolist()) <= set(np.unique(seg).tolist())  # nearest: no invented labels
    # Organ HU after resampling, cropping and resizing still read as liver and spleen (unenhanced ~40-60 HU).
    for label in (LIVER, SPLEEN):
        assert 25 <= float(image[mask == label].median()) <= 70


def test_real_dicom_series_voxels_match_pydicom():
    root = shared_data("ct_totalsegmentator_example") / "example_ct_dicom"
    files = check_dicom_series(root)
    slices = [pydicom.dcmread(f) for f in files]
    assert [int(s.InstanceNumber) for s in slices] == list(range(267, 287))
    out = load_ct(root, raw((20, 512, 512)))["image"]
    assert out.shape == (1, 20, 512, 512)
    affine = out.affine.numpy()
    assert nib.aff2axcodes(affine) == ("S", "A", "R")
    # The slice step (ImagePositionPatient) is 2 mm; SliceThickness says 3 mm: slices overlap, spacing is the step.
    np.testing.assert_allclose(voxel_sizes(affine), [2.0, 0.9765625, 0.9765625])
    assert float(slices[0].SliceThickness) == 3.0
    by_z = {round(float(s.ImagePositionPatient[2]), 3): s for s in slices}
    for d, h, w in [(0, 0, 0), (19, 511, 511), (7, 300, 200), (12, 256, 100)]:
        x, y, z = (affine @ [d, h, w, 1])[:3]
        s = by_z[round(z, 3)]
        lps_x, lps_y = -x, -y  # RAS -> DICOM's LPS
        col = round((lps_x - float(s.ImagePositionPatient[0])) / float(s.PixelSpacing[1]))
        row = round((lps_y - float(s.ImagePositionPatient[1])) / float(s.PixelSpacing[0]))
        expected = s.pixel_array[row, col] * float(s.RescaleSlope) + float(s.RescaleIntercept)
        assert float(out[0, d, h, w]) == expected
    assert float(out.min()) == -1024.0  # the scanner's padding value, HU after the rescale


def test_real_dicom_three_slice_series():
    root = shared_data("ct_dcmqi_liver_seg") / "ct-3slice"
    out = load_ct(root, raw((3, 512, 512)))["image"]
    np.testing.assert_allclose(voxel_sizes(out.affine), [1.0, 0.810547, 0.810547], atol=1e-5)
    assert nib.aff2axcodes(out.affine.numpy()) == ("S", "A", "R")
    raw_pixels = pydicom.dcmread(root / "01.dcm")
    assert int(raw_pixels.PixelPaddingValue) == -2000 and float(raw_pixels.RescaleIntercept) == -1024
    # GE pads outside the reconstruction circle with -2000 stored, i.e. -3024 HU; the window clips it to air.
    padding = out == -3024
    assert 0.15 < float(padding.float().mean()) < 0.3
    assert -50 < float(out[out > -500].median()) < 60  # soft tissue inside the body
    windowed = load_ct(root, dataclasses.replace(raw((3, 512, 512)), hu_window=(-1000, 1000)))["image"]
    assert float(windowed[padding].max()) == 0.0


# ---------------------------------------------------------------- bad input, tiny fixtures


def copy_series(src, dst, skip=()):
    dst.mkdir()
    for f in sorted(src.iterdir()):
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def test_dicom_mixed_series_is_refused(tmp_path):
    root = copy_series(shared_data("ct_dcmqi_liver_seg") / "ct-3slice", tmp_path / "mixed")
    ds = pydicom.dcmread(root / "02.dcm")
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(root / "02.dcm")
    with pytest.raises(DataError, match=r"mixed: mixes 2 series \(SeriesInstanceUID .*2 files.*1 files"):
        load_ct(root, raw((3, 64, 64)))


def test_dicom_missing_slice_is_refused(tmp_path):
    src = shared_data("ct_totalsegmentator_example") / "example_ct_dicom"
    middle = check_dicom_series(src)[10].name
    root = copy_series(src, tmp_path / "gappy", skip={middle})
    with pytest.raises(DataError, match=r"gappy: missing slice\(s\): a 4.00 mm gap .* median slice step is 2.00 mm"):
        load_ct(root, raw((19, 64, 64)))


def test_dicom_instance_order_against_positions_is_refused(tmp_path):
    root = copy_series(shared_data("ct_dcmqi_liver_seg") / "ct-3slice", tmp_path / "shuffled")
    for name, number in (("01.dcm", 2), ("02.dcm", 1)):
        ds = pydicom.dcmread(root / name)
        ds.InstanceNumber = number
        ds.save_as(root / name)
    with pytest.raises(DataError, match="do not follow InstanceNumber order"):
        check_dicom_series(root)


def test_truncated_missing_and_unknown_files(tmp_path):
    noise = np.random.default_rng(0).integers(-1000, 1000, (20, 18, 10))  # incompressible: the header survives
    for name, error in (("ct.nii.gz", "EOFError"), ("ct.nii", "OSError: Expected 7200 bytes")):
        path = write_nifti(tmp_path / name, noise)
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.8)])
        with pytest.raises(DataError, match=rf"{name}: cannot read this NIfTI file \({error}.*truncated"):
            load_ct(path, raw((10, 18, 20)))
    with pytest.raises(DataError, match="absent.nii.gz: CT volume not found"):
        load_ct(tmp_path / "absent.nii.gz")
    (tmp_path / "ct.mha").write_bytes(b"x")
    with pytest.raises(DataError, match=r"ct\.mha: unsupported CT file"):
        load_ct(tmp_path / "ct.mha")


def test_non_hu_volume_is_refused_unless_allowed(tmp_path):
    path = write_nifti(tmp_path / "png_like.nii.gz", np.linspace(0, 255, 20 * 18 * 10).reshape(20, 18, 10),
                       dtype=np.uint8)
    with pytest.raises(DataError, match=r"png_like.nii.gz: looks like it is not in Hounsfield units \(values 0..255"):
        load_ct(path, CTPreprocessing(grid=(10, 18, 20), spacing=None, foreground_hu=None, resize_mode="pad_crop"))
    out = load_ct(path, CTPreprocessing(grid=(10, 18, 20), spacing=None, foreground_hu=None, resize_mode="pad_crop",
                                        check_hu=False))["image"]
    assert float(out.min()) == pytest.approx(0.5) and float(out.max()) == pytest.approx(1255 / 2000)


def test_mask_off_the_ct_grid_is_refused(tmp_path):
    ct = write_nifti(tmp_path / "ct.nii.gz", phantom())
    small = write_nifti(tmp_path / "small.nii.gz", np.zeros((20, 18, 9)), dtype=np.uint8)
    shifted = np.diag([2.0, 2.0, 3.0, 1.0])
    shifted[:3, 3] = [0, 0, 6.0]
    moved = write_nifti(tmp_path / "moved.nii.gz", np.zeros((20, 18, 10)), shifted, dtype=np.uint8)
    pre = raw((10, 18, 20))
    for mask, what in ((small, r"shape \(20, 18, 9\) vs \(20, 18, 10\)"), (moved, "affine")):
        with pytest.raises(DataError, match=rf"mask .*{mask.name} is not on the grid of CT .*ct\.nii\.gz: .*{what}"):
            load_ct(ct, pre, mask=mask)
    same = write_nifti(tmp_path / "same.nii.gz", phantom(lesion=True) == 120, dtype=np.uint8)
    out = load_ct(ct, pre, mask=same)
    assert int(out["mask"].sum()) == int((phantom(lesion=True) == 120).sum())


def test_orientation_puts_the_patients_right_at_high_w(tmp_path):
    # Stored LAS (x runs to the patient's left): the lesion at +x in voxel space is on the patient's left...
    las = np.diag([-2.0, 2.0, 3.0, 1.0])
    path = write_nifti(tmp_path / "las.nii.gz", phantom(lesion=True), las)
    out = load_ct(path, raw((10, 18, 20)))["image"][0]
    lesion_w = torch.nonzero(out == 120)[:, 2].float().mean()
    assert lesion_w < 10  # ...so in RAS order (W runs left -> right) it sits at low W


def test_foreground_crop_keeps_the_body_whatever_the_window(tmp_path):
    hu = np.full((20, 18, 10), -1000)
    hu[4:14, 6:12, 2:8] = 40  # a 10 x 6 x 6 voxel body in air
    path = write_nifti(tmp_path / "box.nii.gz", hu)
    body_only = CTPreprocessing(spacing=None, hu_window=None, grid=(6, 6, 10), resize_mode="pad_crop")
    assert torch.all(load_ct(path, body_only)["image"] == 40)
    soft_tissue = dataclasses.replace(body_only, hu_window=(-160.0, 240.0))  # a window above foreground_hu
    np.testing.assert_allclose(load_ct(path, soft_tissue)["image"].numpy(), 0.5)


# ---------------------------------------------------------------- settings and cache


def test_settings_are_json_and_checked():
    pre = CTPreprocessing()
    assert json.loads(json.dumps(pre.settings())) == pre.settings()
    assert pre.settings()["hu_window"] == [-1000.0, 1000.0] and pre.settings()["grid"] == [32, 256, 256]
    assert CTPreprocessing(grid=[32, 256, 256]) == pre
    assert CTPreprocessing(grid=(8, 8, 8)).cache_key() != pre.cache_key()
    for bad in ({"orientation": "SAR"}, {"hu_window": (1000, -1000)}, {"spacing": (0, 1, 1)},
                {"resize_mode": "crop"}, {"grid": (8, 8)}):
        with pytest.raises(ValueError):
            CTPreprocessing(**bad)
    # the datamodule's preprocessing arguments default to the dataclass's
    params = inspect.signature(CTVQADataModule).parameters
    for field in dataclasses.fields(CTPreprocessing):
        assert params[field.name].default == field.default, field.name


def test_cache_is_reused_and_keyed_by_settings_and_source(tmp_path, monkeypatch):
    volumes = [write_nifti(tmp_path / f"ct{i}.nii.gz", phantom(lesion=i == 1)) for i in range(2)]
    pre = CTPreprocessing(grid=(4, 8, 8), spacing=None)
    first = CTVolumeDataset(volumes, pre, tmp_path / "cache")
    items = [first[i]["image"] for i in range(2)]
    folder = tmp_path / "cache" / f"ct-{pre.cache_key()}"
    assert len(list(folder.glob("*.pt"))) == 2
    assert json.loads((folder / "settings.json").read_text())["settings"] == pre.settings()

    def fail(self, data):
        raise AssertionError("loaded from source although cached")

    monkeypatch.setattr(LoadCTd, "__call__", fail)
    again = CTVolumeDataset(volumes, pre, tmp_path / "cache")
    for i in range(2):
        torch.testing.assert_close(again[i]["image"], items[i])
    monkeypatch.undo()
    other = dataclasses.replace(pre, grid=(4, 6, 6))
    assert CTVolumeDataset(volumes, other, tmp_path / "cache")[0]["image"].shape == (1, 4, 6, 6)
    assert len(list((tmp_path / "cache" / f"ct-{other.cache_key()}").glob("*.pt"))) == 1
    # a replaced source file is preprocessed again, not served from the cache
    write_nifti(volumes[0], phantom(lesion=True))
    os.utime(volumes[0], ns=(1, 1))
    fresh = CTVolumeDataset(volumes, pre, tmp_path / "cache")[0]["image"]
    torch.testing.assert_close(fresh, items[1])
    assert len(list(folder.glob("*.pt"))) == 3


def test_cached_dataset_raises_data_errors(tmp_path):
    path = write_nifti(tmp_path / "bad.nii.gz", np.full((8, 8, 4), 100), dtype=np.uint8)
    dataset = CTVolumeDataset([path], CTPreprocessing(grid=(4, 8, 8)), tmp_path / "cache")
    with pytest.raises(DataError, match="bad.nii.gz: looks like it is not in Hounsfield units"):
        dataset[0]
    with pytest.raises(DataError, match="CT volume not found"):
        CTVolumeDataset([tmp_path / "nothing.nii.gz"], CTPreprocessing(), tmp_path / "cache")


# ---------------------------------------------------------------- VQA tables


def test_deeptumorvqa_release_and_demo_records(tmp_path):
    bench = {"version": "2.0", "num_questions": 3, "questions": [
        {"qid": "bench_00017", "image_id": "BDMAP_00008446", "spacing": "[0.83 0.83 5.0]", "shape": "(512, 512, 116)",
         "question": "How would you classify the splenic enlargement based on volume?",
         "answer": "Normal (no splenomegaly)",
         "mc_question": "How would you classify the splenic enlargement based on volume? A: Normal (no "
                        "splenomegaly) B: Moderate C: Severe D: Mild",
         "correct_option": "A", "organ": "spleen", "lesion": False, "question_type": "medical reasoning",
         "question_subtype": "splenomegaly grading"},
        {"qid": "bench_00018", "image_id": "BDMAP_00008446", "question": "What is the liver volume in cm3?",
         "answer": "1523.4", "question_type": "measurement", "question_subtype": "organ volume measurement"},
        {"qid": "bench_00019", "image_id": "BDMAP_00000001", "question": "Is there a liver lesion?", "answer": "no",
         "mc_question": "Is there a liver lesion? A. yes B. no", "question_type": "recognition"}]}
    (tmp_path / "test_qa.json").write_text(json.dumps(bench))
    table = read_deeptumorvqa(tmp_path / "test_qa.json")
    assert table.loc[0, "choices"] == ["Normal (no splenomegaly)", "Moderate", "Severe", "Mild"]
    assert table.loc[0, "answer_letter"] == "A" and table.loc[0, "question_type"] == "medical_reasoning"
    assert table.loc[0, "organ"] == "spleen" and table.loc[0, "qid"] == "bench_00017"
    assert table.loc[1, "choices"] == [] and table.loc[1, "answer_letter"] is None
    assert table.loc[1, "value"] == 1523.4 and table.loc[0, "value"] is None  # numeric answers carry their number
    assert table.loc[2, "answer_letter"] == "B"  # no correct_option: the answer names the option
    assert table.loc[2, "record"].endswith("test_qa.json:2")

    records = [{"image_id": "ct0", "image_path": "volumes/ct0.nii.gz", "question": "Which organ has the lesion?",
                "answer": "kidney", "choices": ["liver", "kidney"], "answer_letter": "B", "question_type":
                "visual_reasoning", "question_subtype": "lesion location"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    table = read_deeptumorvqa(tmp_path / "train.jsonl")
    assert table.loc[0, ["image_path", "answer_letter", "question_subtype"]].tolist() == [
        "volumes/ct0.nii.gz", "B", "lesion location"]

    (tmp_path / "bad.jsonl").write_text(json.dumps({"image_id": "ct0", "answer": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl record 0: missing field\(s\) \['question'\]"):
        read_deeptumorvqa(tmp_path / "bad.jsonl")
    (tmp_path / "letter.jsonl").write_text(json.dumps({**records[0], "answer_letter": "E"}) + "\n")
    with pytest.raises(DataError, match=r"letter.jsonl record 0: correct option 'E' is not one of the 2 options"):
        read_deeptumorvqa(tmp_path / "letter.jsonl")
    (tmp_path / "broken.jsonl").write_text("{\n")
    with pytest.raises(DataError, match="broken.jsonl line 1: not valid JSON"):
        read_deeptumorvqa(tmp_path / "broken.jsonl")


def test_split_options_formats():
    assert split_options("Which? (A) x (B) y z (C) w") == ("Which?", ["x", "y z", "w"])
    assert split_options("What is the HU? A. -5 B. 10") == ("What is the HU?", ["-5", "10"])
    assert split_options("No options here.") == ("No options here.", [])


def test_m3d_vqa_csv(tmp_path):
    row = {"Image Path": "ct_case/000006/Axial_C__portal_venous_phase.npy", "Text": "ct_case/000006/text.txt",
           "Question Type": 3, "Question": "Which organ shows the abnormality?", "Choice A": "Liver",
           "Choice B": "Spleen", "Choice C": "Kidney", "Choice D": "Pancreas", "Answer": "Kidney",
           "Answer Choice": "C"}
    pd.DataFrame([row]).to_csv(tmp_path / "M3D_VQA_val.csv", index=False)
    table = read_m3d_vqa(tmp_path / "M3D_VQA_val.csv")
    assert table.loc[0, ["image_id", "question_type", "split", "answer_letter"]].tolist() == [
        "ct_case/000006/Axial_C__portal_venous_phase", "organ", "val", "C"]
    assert table.loc[0, "choices"] == ["Liver", "Spleen", "Kidney", "Pancreas"]
    pd.DataFrame([{k: v for k, v in row.items() if k not in ("Question", "Answer")}]).to_csv(
        tmp_path / "M3D_VQA_test.csv", index=False)
    with pytest.raises(DataError, match=r"M3D_VQA_test.csv: missing column\(s\) \['Question', 'Answer'\]"):
        read_m3d_vqa(tmp_path / "M3D_VQA_test.csv")


# ---------------------------------------------------------------- the datamodule


def vqa_root(tmp_path):
    (tmp_path / "volumes").mkdir(parents=True)
    for i in range(2):
        write_nifti(tmp_path / "volumes" / f"ct{i}.nii.gz", phantom(lesion=i == 1))
    mc = {"question": "Is there a lesion?", "choices": ["yes", "no"], "question_type": "recognition",
          "question_subtype": "lesion existence"}
    splits = {
        "train": [{"image_id": "ct1", "answer": "yes", "answer_letter": "A", **mc},
                  {"image_id": "ct0", "answer": "no", "answer_letter": "B", **mc},
                  {"image_id": "ct1", "answer": "yes", "answer_letter": "A", **mc},
                  {"image_id": "ct0", "question": "What is the body's mean HU?", "answer": "40",
                   "choices": [], "answer_letter": None, "question_type": "measurement",
                   "question_subtype": "organ HU measurement"}],
        "val": [{"image_id": "ct0", "answer": "no", "answer_letter": "B", **mc}],
        "test": [{"image_id": "ct0", "answer": "no", "answer_letter": "B", **mc},
                 {"image_id": "ct1", "question": "What is the body's mean HU?", "answer": "40", "choices": [],
                  "question_type": "measurement", "question_subtype": "organ HU measurement"},
                 {"image_id": "ct9", "answer": "no", "answer_letter": "B", **mc}],
    }
    for split, records in splits.items():
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps({**r, "image_path": f"volumes/{r['image_id']}.nii.gz"}) + "\n")
    return tmp_path


def test_datamodule_samples_baselines_and_missing_volumes(tmp_path):
    root = vqa_root(tmp_path / "data")
    args = {"root": str(root), "grid": (4, 8, 8), "spacing": None, "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(DataError, match=r"test.jsonl:2: no CT volume for image_id 'ct9'"):
        CTVQADataModule(**args).setup()
    dm = CTVQADataModule(**args, on_missing="skip")
    dm.setup()
    assert dm.n_skipped == 1 and {k: len(v) for k, v in dm.datasets.items()} == {"train": 4, "val": 1, "test": 2}
    sample = dm.datasets["train"][1]
    assert sample["question"] == "Is there a lesion?\nA. yes\nB. no"
    assert sample["answer"] == "no" and sample["choices"] == ["yes", "no"]
    assert sample["meta"]["question_type"] == "recognition" and sample["meta"]["image_id"] == "ct0"
    assert sample["meta"]["answer_letter"] == "B" and sample["meta"]["volume_path"].endswith("ct0.nii.gz")
    (volume,) = sample["volume"]
    assert volume.shape == (1, 4, 8, 8) and volume.dtype == torch.float32
    assert 0 <= float(volume.min()) and float(volume.max()) <= 1
    assert float(volume.max()) == pytest.approx(0.52, abs=0.02)  # 40 HU body: (40 + 1000) / 2000
    open_q = dm.datasets["test"][1]
    assert open_q["question"] == "What is the body's mean HU?" and open_q["answer"] == "40" and open_q["choices"] == []
    assert open_q["meta"]["value"] == 40.0 and sample["meta"]["value"] is None
    # lesion volume ct1 is brighter somewhere than ct0
    assert float(dm.datasets["test"][1]["volume"][0].max()) > float(dm.datasets["test"][0]["volume"][0].max())
    # train majority for "lesion existence" is "yes" (2 of 3); the test lesion question's answer is "no"
    assert dm.baselines("test") == {
        "majority_answer_acc": 0.5, "random_choice_acc": 0.5,
        "majority_answer_acc/measurement": 1.0, "majority_answer_acc/recognition": 0.0,
        "random_choice_acc/recognition": 0.5}
    assert dm.state_dict() == {"ct_preprocessing": dm.preprocessing.settings()}
    dm.load_state_dict(dm.state_dict())
    with pytest.raises(ValueError, match="checkpoint was made with CT preprocessing"):
        CTVQADataModule(**{**args, "grid": (4, 4, 4)}).load_state_dict(dm.state_dict())


def test_datamodule_reads_m3d_tables(tmp_path):
    root = vqa_root(tmp_path / "data")
    row = {"Text": "", "Question Type": 4, "Question": "Is there a lesion?", "Choice A": "yes", "Choice B": "no",
           "Choice C": "", "Choice D": "", "Answer": "yes", "Answer Choice": "A"}
    for split in ("train", "val", "test"):
        pd.DataFrame([{"Image Path": "volumes/ct1.nii.gz", **row}]).to_csv(root / f"M3D_VQA_{split}.csv", index=False)
    dm = CTVQADataModule(str(root), questions_format="m3d", grid=(4, 8, 8), spacing=None,
                         cache_dir=str(tmp_path / "cache"))
    dm.setup()
    sample = dm.datasets["val"][0]
    assert sample["question"] == "Is there a lesion?\nA. yes\nB. no" and sample["answer"] == "yes"
    assert sample["meta"]["question_type"] == "abnormality" and sample["volume"][0].shape == (1, 4, 8, 8)
    (root / "volumes" / "ct1.npy").write_bytes(b"")
    pd.DataFrame([{"Image Path": "volumes/ct1.npy", **row}]).to_csv(root / "M3D_VQA_test.csv", index=False)
    with pytest.raises(DataError, match=r"M3D_VQA_test.csv:2: .*ct1.npy is neither a NIfTI file .*preprocessed"):
        CTVQADataModule(str(root), questions_format="m3d", cache_dir=str(tmp_path / "cache")).setup()


def test_datamodule_on_the_ct_demo(tmp_path):
    pytest.importorskip("datamodules.synthetic.ct")
    dm = CTVQADataModule(grid=(8, 16, 16), spacing=None, cache_dir=str(tmp_path),
                         demo={"n_volumes": 3, "shape": (43, 32, 33), "spacing": (8.0, 8.0, 8.0)})
    dm.setup()
    for split in ("train", "val", "test"):
        sample = dm.datasets[split][0]
        assert sample["volume"][0].shape == (1, 8, 16, 16)
        assert sample["meta"]["question_type"] in ("measurement", "recognition", "visual_reasoning",
                                                   "medical_reasoning")
        if sample["choices"]:
            assert sample["answer"] in sample["choices"] and "\nA. " in sample["question"]
        if sample["meta"].get("answer_type") == "numeric":
            assert isinstance(sample["meta"]["value"], float)
    assert 0.0 <= dm.baselines("test")["majority_answer_acc"] <= 1.0


def test_mask_classes_yield_per_class_targets_on_the_volume_grid(tmp_path):
    pytest.importorskip("datamodules.synthetic.ct")
    classes = {"liver": [5, 201], "lesion": [201, 202, 203, 204]}
    demo = {"n_volumes": 3, "shape": (43, 32, 33), "spacing": (8.0, 8.0, 8.0)}
    dm = CTVQADataModule(grid=(8, 16, 16), spacing=None, cache_dir=str(tmp_path), mask_classes=classes, demo=demo)
    dm.setup()
    sample = dm.datasets["train"][0]
    (targets,) = sample["volume_targets"]
    assert targets.shape == (2, 8, 16, 16) and targets.dtype == torch.bool
    mask = dm.volumes[dm.datasets["train"].table["volume_index"].iloc[0]]["mask"][0]
    assert torch.equal(targets[0], torch.isin(mask, torch.tensor([5, 201])))
    assert targets[0].any()
    assert torch.equal(targets[1], mask >= 201)  # the demo's lesion labels are 201-204
    with pytest.raises(DataError, match=r"train.jsonl:0: mask_classes needs a label mask .*nowhere/ctdemo_\d+"):
        CTVQADataModule(grid=(8, 16, 16), spacing=None, cache_dir=str(tmp_path), mask_classes=classes, demo=demo,
                        mask_pattern="nowhere/{image_id}.nii.gz").setup()


def test_lesion_masks_are_the_lesion_classes_of_each_questions_volume(tmp_path):
    pytest.importorskip("datamodules.synthetic.ct")
    classes = {"liver": [5, 201], "liver_lesion": [201], "spleen_lesion": [202], "kidney_right_lesion": [203]}
    demo = {"n_volumes": 3, "shape": (43, 32, 33), "spacing": (8.0, 8.0, 8.0)}
    dm = CTVQADataModule(grid=(8, 16, 16), spacing=None, cache_dir=str(tmp_path), mask_classes=classes, demo=demo)
    dm.setup()
    table = dm.datasets["train"].table
    masks = dm.lesion_masks("train")
    assert len(masks) == len(table) and masks[0].shape == (8, 16, 16) and masks[0].dtype == torch.bool
    for i in (0, len(table) - 1):
        label = dm.volumes[table["volume_index"].iloc[i]]["mask"][0]
        assert torch.equal(masks[i], torch.isin(label, torch.tensor([201, 202, 203])))  # not the organ around them
    assert any(bool(m.any()) for split in ("train", "val", "test") for m in dm.lesion_masks(split))
    assert torch.equal(dm.lesion_masks("train", ["liver_lesion"])[0], dm.volumes[table["volume_index"].iloc[0]]
                       ["mask"][0] == 201)
    with pytest.raises(ConfigError, match="lesion masks need mask_classes"):
        dm.lesion_masks("train", ["kidney_left_lesion"])
    with pytest.raises(ConfigError, match="lesion masks need mask_classes"):
        CTVQADataModule(grid=(8, 16, 16), spacing=None, cache_dir=str(tmp_path), demo=demo).lesion_masks("train")


def test_balance_types_draws_every_question_type_equally(tmp_path):
    pytest.importorskip("datamodules.synthetic.ct")
    dm = CTVQADataModule(grid=(8, 16, 16), spacing=None, cache_dir=str(tmp_path), balance_types=True, batch_size=4,
                         demo={"n_volumes": 6, "shape": (43, 32, 33), "spacing": (8.0, 8.0, 8.0)})
    dm.setup()
    dm.connect(collator=list)
    types = dm.datasets["train"].table["question_type"]
    sampler = dm.train_dataloader().sampler
    drawn = []
    for epoch in range(50):  # a new draw every epoch
        sampler.set_epoch(epoch)
        drawn += [i for i, _ in sampler]
    drawn = types.iloc[drawn].value_counts(normalize=True)
    assert len(sampler) == len(types) and types.value_counts(normalize=True).max() > 0.3  # skewed as generated
    assert drawn.max() - drawn.min() < 0.08, drawn  # about 1/4 each when drawn


# ---------------------------------------------------------------- tools/bench_ct.py


def test_bench_ct_rows(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from bench_ct import bench_ct, markdown_table, small_vit

    volumes = [write_nifti(tmp_path / f"ct{i}.nii.gz", phantom(lesion=i == 1)) for i in range(2)]
    pre = CTPreprocessing(grid=(4, 8, 8), spacing=None)
    rows = bench_ct(volumes, pre, tmp_path / "cache", small_vit(pre.grid, (2, 4, 4), 16, 1, 2), batch_size=2)
    assert [r["n"] for r in rows] == [2, 2, 2] and all(r["seconds"] > 0 for r in rows)
    assert len(list((tmp_path / "cache" / f"ct-{pre.cache_key()}").glob("*.pt"))) == 2
    assert rows[2]["peak_mib"] > 0 and rows[2]["step_mib"] is not None
    table = markdown_table(rows)
    assert table.count("\n") == 4 and "cached pass" in table
