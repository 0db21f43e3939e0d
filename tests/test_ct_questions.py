"""CT questions from label masks (datamodules.ct_questions), their CLI and the synthetic CT demo."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import shared_data
from scipy import ndimage

from datamodules.ct_questions import (
    LESION_TYPES,
    QUESTION_TYPES,
    TOTALSEGMENTATOR_LABELS,
    generate_questions,
    measure_organs,
    questions_from_files,
)
from datamodules.synthetic.ct import DEMO_LESION_LABELS, generate_ct_demo
from mmclin.errors import DataError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import ct_vqa_from_masks  # noqa: E402

EXAMPLE_ORGANS = ["liver", "spleen", "kidney_right", "kidney_left", "gallbladder", "pancreas", "urinary_bladder"]
N_DEMO = 8
LESION_ARGS = [f"{label}:{organ}" for label, organ in DEMO_LESION_LABELS.items()]


@pytest.fixture(scope="module")
def example():
    root = shared_data("ct_totalsegmentator_example")
    return root / "example_ct_sm.nii.gz", root / "example_seg.nii.gz"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return generate_ct_demo(tmp_path_factory.mktemp("ct-cache"), seed=0, n_volumes=N_DEMO)


@pytest.fixture(scope="module")
def demo_records(demo) -> dict[str, list[dict]]:
    return {split: [json.loads(line) for line in (demo / f"{split}.jsonl").read_text().splitlines()]
            for split in ("train", "val", "test")}


def _reference(ct_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """HU, labels and voxel volume (mL) read with plain nibabel."""
    ct, seg = nib.load(ct_path), nib.load(mask_path)
    return ct.get_fdata(), np.asarray(seg.dataobj), float(np.prod(ct.header.get_zooms())) / 1000.0


def _world_x(mask: np.ndarray, affine: np.ndarray) -> float:
    """World x (mm, RAS+: > 0 is the patient's right) of a mask's centroid."""
    return float((affine @ [*ndimage.center_of_mass(mask), 1.0])[0])


# ---------------------------------------------------------------- TotalSegmentator example in ../shared/data


def test_example_volumes_and_mean_hu_match_nibabel(example):
    hu, seg, voxel_ml = _reference(*example)
    records, notes = questions_from_files(*example, organs=EXAMPLE_ORGANS, seed=0)
    volumes = [r for r in records if r["question_subtype"] == "organ volume measurement"]
    means = [r for r in records if r["question_subtype"] == "organ HU measurement"]
    assert {r["organ"] for r in volumes} == set(EXAMPLE_ORGANS) - {"urinary_bladder"} and len(means) == 2
    for r in volumes:
        assert r["value"] == pytest.approx((seg == TOTALSEGMENTATOR_LABELS[r["organ"]]).sum() * voxel_ml, rel=1e-6)
    for r in means:
        assert r["value"] == pytest.approx(hu[seg == TOTALSEGMENTATOR_LABELS[r["organ"]]].mean(), rel=1e-5)
    liver = next(r for r in volumes if r["organ"] == "liver")
    assert liver["value"] == pytest.approx(38634 * 27 / 1000) and liver["answer"] == "1000 mL"
    # every organ, not only the two drawn for HU questions
    measures = measure_organs(hu.astype(np.float32), seg.astype(np.int32), nib.load(example[0]).affine,
                              EXAMPLE_ORGANS)
    for organ, m in measures.items():
        own = seg == TOTALSEGMENTATOR_LABELS[organ]
        assert m.volume_ml == pytest.approx(own.sum() * voxel_ml)
        assert m.mean_hu == (pytest.approx(hu[own].mean(), rel=1e-5) if own.any() else None)
    # a 30-slice crop: liver, spleen and kidneys are cut by its edge, gallbladder and pancreas are not
    assert "visible part of the liver" in liver["question"]
    assert "visible part" not in next(r for r in volumes if r["organ"] == "gallbladder")["question"]
    assert not any(r["question_subtype"] in ("splenomegaly grading", "kidney volume comparison") for r in records)
    assert [r["organ"] for r in records if r["question_subtype"] == "organ volume comparison"] == [
        "gallbladder,pancreas"]
    # the absent organ is asked about as absent, never measured
    existence = next(r for r in records if r["question_subtype"] == "organ existence")
    assert existence["answer"] == "urinary bladder" and existence["organ"] == "urinary_bladder"
    assert any(n.startswith("urinary_bladder: absent") for n in notes)
    assert any(n.startswith("spleen: not graded") for n in notes)
    for r in records:
        assert r["answer"] in r["choices"] and len(set(r["choices"])) == 4
        assert r["choices"]["ABCD".index(r["answer_letter"])] == r["answer"]
        assert r["spacing"] == [3.0, 3.0, 3.0] and r["shape"] == [122, 101, 30]


def test_tool_writes_jsonl_and_prints_the_summary(example, tmp_path, capsys):
    out = tmp_path / "q" / "example.jsonl"
    records = ct_vqa_from_masks.main(["--ct", str(example[0]), "--mask", str(example[1]), "--organs",
                                      *EXAMPLE_ORGANS, "--out", str(out), "--seed", "3"])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == records and len(lines) == 10
    assert Path(lines[0]["image_path"]) == example[0].resolve()  # outside the output folder: absolute
    printed = capsys.readouterr().out
    assert "organ volume measurement" in printed and "urinary_bladder: absent from the mask" in printed
    assert "10 questions on 1 volume(s)" in printed


def test_grid_mismatch_names_both_files(example, tmp_path):
    ct = nib.load(example[0])
    moved = ct.affine.copy()
    moved[0, 3] += 3.0
    seg = np.asarray(nib.load(example[1]).dataobj)
    nib.save(nib.Nifti1Image(seg, moved), tmp_path / "shifted.nii.gz")
    nib.save(nib.Nifti1Image(seg[:, :, :20], ct.affine), tmp_path / "short.nii.gz")
    for mask in ("shifted.nii.gz", "short.nii.gz"):
        with pytest.raises(DataError, match=rf"mask .*{mask} is not on the grid of CT .*example_ct_sm\.nii\.gz"):
            questions_from_files(example[0], tmp_path / mask)
    with pytest.raises(DataError, match="short.nii.gz"):
        ct_vqa_from_masks.main(["--ct", str(example[0]), "--mask", str(tmp_path / "short.nii.gz"), "--out",
                                str(tmp_path / "q.jsonl")])


def test_an_8_bit_ct_is_refused_with_the_datamodule_message(example, tmp_path):
    """The real CT rescaled to 0-255 (as a PNG-style export): mean attenuations would be wrong, so it is refused,
    in the words of datamodules/ct.py, unless --no-check-hu says the values are HU."""
    ct = nib.load(example[0])
    hu = ct.get_fdata()
    eight_bit = np.round((hu - hu.min()) / (hu.max() - hu.min()) * 255).astype(np.uint8)
    nib.save(nib.Nifti1Image(eight_bit, ct.affine), tmp_path / "ct_8bit.nii.gz")
    args = ["--ct", str(tmp_path / "ct_8bit.nii.gz"), "--mask", str(example[1]), "--organs", "liver",
            "--out", str(tmp_path / "q.jsonl")]
    with pytest.raises(DataError, match=r"ct_8bit\.nii\.gz: looks like it is not in Hounsfield units \(values 0\.\."):
        ct_vqa_from_masks.main(args)
    assert ct_vqa_from_masks.main([*args, "--no-check-hu"])  # the user's word: questions are written
    nan = hu.astype(np.float32)
    nan[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, ct.affine), tmp_path / "ct_nan.nii.gz")
    with pytest.raises(DataError, match=r"ct_nan\.nii\.gz: 1 voxel\(s\) are NaN"):
        questions_from_files(tmp_path / "ct_nan.nii.gz", example[1])


# ---------------------------------------------------------------- measurements on a hand-made volume


def test_lesion_measurements_on_a_handmade_volume():
    hu = np.full((12, 12, 10), -100.0, dtype=np.float32)
    labels = np.zeros(hu.shape, dtype=np.int32)
    labels[1:7, 1:9, 1:8], hu[1:7, 1:9, 1:8] = 5, 60.0  # liver, 6 x 8 x 7 voxels
    labels[2:4, 2:4, 2:4], hu[2:4, 2:4, 2:4] = 201, 5.0  # cyst, 2 x 2 x 2 voxels
    labels[5, 7, 6], hu[5, 7, 6] = 201, 100.0  # hyperdense, 1 voxel
    labels[8:11, 2:6, 2:6], hu[8:11, 2:6, 2:6] = 1, 50.0  # spleen, 3 x 4 x 4 voxels, no lesion
    affine = np.diag([2.0, 2.0, 3.0, 1.0])  # voxel 12 mm^3
    lesion_labels = {201: "liver", 202: "spleen", 203: "kidney_right", 204: "kidney_left"}
    liver = measure_organs(hu, labels, affine, ["liver"], lesion_labels)["liver"]
    assert liver.n_voxels == 6 * 8 * 7 and liver.volume_ml == pytest.approx(336 * 0.012)
    assert liver.mean_hu == pytest.approx(60.0) and not liver.truncated
    cyst, small = liver.lesions
    assert (cyst.n_voxels, small.n_voxels) == (8, 1) and cyst.volume_ml == pytest.approx(0.096)
    assert cyst.diameter_mm == pytest.approx(math.sqrt(4**2 + 4**2 + 6**2))  # corner to corner of 4 x 4 x 6 mm
    assert small.diameter_mm == pytest.approx(math.sqrt(2**2 + 2**2 + 3**2))
    records, notes = generate_questions(hu, labels, affine, "hand", "hand.nii.gz", lesion_labels=lesion_labels)
    by_subtype = {r["question_subtype"]: r for r in records}
    assert by_subtype["lesion volume measurement"]["value"] == pytest.approx(0.096)
    assert by_subtype["largest lesion diameter"]["value"] == pytest.approx(math.sqrt(68))
    assert by_subtype["lesion type classification"]["answer"] == LESION_TYPES[0]  # 5 HU in a 60 HU liver
    assert by_subtype["largest lesion location"]["answer"] == "liver"
    assert by_subtype["lesion existence"]["answer"] == "liver"
    assert by_subtype["splenomegaly grading"]["answer"].startswith("normal size")
    assert "organ existence" not in by_subtype  # only two organs present: no three present distractors
    assert {n.split(":")[0] for n in notes if "absent" in n} == {"kidney_right", "kidney_left"}
    assert not any(r["organ"] in ("kidney_right", "kidney_left") for r in records
                   if r["question_type"] == "measurement")


# ---------------------------------------------------------------- synthetic demo


def test_demo_files_are_ras_nifti_with_masks_on_the_ct_grid(demo):
    ids = sorted(p.name for p in (demo / "volumes").iterdir())
    assert len(ids) == N_DEMO and ids == sorted(p.name for p in (demo / "masks").iterdir())
    spleen_ml = []
    for name in ids:
        ct, seg = nib.load(demo / "volumes" / name), nib.load(demo / "masks" / name)
        hu, labels = np.asarray(ct.dataobj), np.asarray(seg.dataobj)
        assert hu.dtype == np.int16 and labels.dtype == np.uint8 and hu.shape == labels.shape == (64, 48, 48)
        np.testing.assert_array_equal(ct.affine, seg.affine)
        assert nib.aff2axcodes(ct.affine) == ("R", "A", "S") and ct.header.get_zooms() == (6.0, 6.0, 6.0)
        assert set(np.unique(labels)) <= {0, 1, 2, 3, 5, *DEMO_LESION_LABELS}
        assert hu[0, 0].mean() == pytest.approx(-1000, abs=5)  # air outside the body
        assert (labels == 0).sum() > 0 and np.any((hu > -130) & (hu < -70))  # fat
        plausible = {5: (40, 80), 1: (35, 60), 2: (20, 45), 3: (20, 45)}
        for label, (low, high) in plausible.items():
            if (labels == label).any():
                assert low < hu[labels == label].mean() < high
        # the patient's right is world x > 0 (RAS+): liver and right kidney there, spleen and left kidney opposite
        for label, right in ((5, True), (2, True), (1, False), (3, False), (201, True)):
            if (labels == label).any():
                assert (_world_x(labels == label, ct.affine) > 0) == right
        spleen_ml.append((labels == 1).sum() * 0.216)
    present = [v for v in spleen_ml if v > 0]
    assert max(present) / min(present) > 2  # organ size varies strongly between volumes


def test_demo_questions_split_by_volume_and_match_the_files(demo, demo_records):
    ids = {split: {r["image_id"] for r in rows} for split, rows in demo_records.items()}
    assert all(ids.values()) and not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"]
                                      & ids["test"])
    assert set().union(*ids.values()) == {p.name.removesuffix(".nii.gz") for p in (demo / "volumes").iterdir()}
    records = [r for rows in demo_records.values() for r in rows]
    per_volume = Counter(r["image_id"] for r in records)
    assert min(per_volume.values()) >= 8 and max(per_volume.values()) <= 17
    assert {r["question_type"] for r in records} == set(QUESTION_TYPES)
    letters = Counter(r["answer_letter"] for r in records)
    assert set(letters) == set("ABCD") and max(letters.values()) - min(letters.values()) <= N_DEMO
    ranks, files = Counter(), {}
    for r in records:
        assert r["answer"] in r["choices"] and len(set(r["choices"])) == 4
        assert r["choices"]["ABCD".index(r["answer_letter"])] == r["answer"]
        if r["image_id"] not in files:
            files[r["image_id"]] = _reference(demo / r["image_path"], demo / r["mask_path"])
        hu, labels, voxel_ml = files[r["image_id"]]
        lesion_ids = DEMO_LESION_LABELS
        if r["question_subtype"] == "organ volume measurement":
            own = labels == TOTALSEGMENTATOR_LABELS[r["organ"]]
            hosted = np.isin(labels, [k for k, host in lesion_ids.items() if host == r["organ"]])
            assert r["value"] == pytest.approx((own | hosted).sum() * voxel_ml, rel=1e-6)
            values = sorted(float(c.split()[0]) for c in r["choices"])
            assert all(1.25 < b / a < 1.6 for a, b in zip(values, values[1:]))  # ladder of factor sqrt(2)
            ranks[values.index(float(r["answer"].split()[0]))] += 1
        elif r["question_subtype"] == "organ HU measurement":
            assert r["value"] == pytest.approx(hu[labels == TOTALSEGMENTATOR_LABELS[r["organ"]]].mean(), rel=1e-5)
        elif r["question_subtype"] == "lesion counting":
            hosted = np.isin(labels, [k for k, host in lesion_ids.items() if host == r["organ"]])
            assert r["value"] == ndimage.label(hosted, structure=np.ones((3, 3, 3)))[1]
    assert len(ranks) == 4  # the true volume is sometimes the smallest option, sometimes the largest, ...


def test_demo_is_deterministic_and_reused(demo, demo_records, tmp_path):
    again = generate_ct_demo(tmp_path / "a", seed=0, n_volumes=N_DEMO)
    assert again != demo and (again / "test.jsonl").read_text() == (demo / "test.jsonl").read_text()
    name = "ctdemo_0001.nii.gz"
    for folder in ("volumes", "masks"):
        np.testing.assert_array_equal(np.asarray(nib.load(again / folder / name).dataobj),
                                      np.asarray(nib.load(demo / folder / name).dataobj))
    assert generate_ct_demo(tmp_path / "a", seed=0, n_volumes=N_DEMO) == again  # finished demo: reused
    other = generate_ct_demo(tmp_path / "b", seed=1, n_volumes=3)
    assert (other / "train.jsonl").read_text() != (again / "train.jsonl").read_text()
    with pytest.raises(ValueError, match="at least 3"):
        generate_ct_demo(tmp_path, n_volumes=2)
    with pytest.raises(ValueError, match="must cover"):
        generate_ct_demo(tmp_path, shape=(32, 32, 32))


def test_tool_directory_mode_on_the_demo(demo, tmp_path, capsys):
    out = demo.parent / "all-questions.jsonl"  # beside the demo: paths come out relative
    records = ct_vqa_from_masks.main(["--ct-dir", str(demo / "volumes"), "--mask-dir", str(demo / "masks"),
                                      "--lesion-label", *LESION_ARGS, "--out", str(out)])
    assert len({r["image_id"] for r in records}) == N_DEMO
    assert all((out.parent / r["image_path"]).is_file() and not Path(r["image_path"]).is_absolute()
               for r in records)
    assert "lesion counting" in capsys.readouterr().out
    (tmp_path / "cts").mkdir()
    (tmp_path / "cts" / "lonely.nii.gz").write_bytes((demo / "volumes" / "ctdemo_0000.nii.gz").read_bytes())
    with pytest.raises(DataError, match="lonely.nii.gz: no mask"):
        ct_vqa_from_masks.main(["--ct-dir", str(tmp_path / "cts"), "--mask-dir", str(demo / "masks"), "--out",
                                str(tmp_path / "q.jsonl")])
