"""Media contracts where media enter (issue 27, area A): voltage units of WFDB and EDF headers, a header's length
against its signal file, CT volumes too thin to be volumes, and images (16-bit, palette, alpha, too small).

Reader-level cases run in process on files built here; each medium also has one `lightning predict` run in a fresh
process that must end in one named line.
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import wfdb
from conftest import CONFIGS, TINY_CLIP, one_line_error, shared_data
from PIL import Image

from datamodules.ct import CTPreprocessing, CTVolumeDataset, check_dicom_series, load_ct
from datamodules.ct_questions import MIN_CT_SLICES, load_ct_and_mask
from datamodules.derm import DermDataModule, ImageTextDataset
from datamodules.ecg import read_wfdb_record
from datamodules.fundus import load_fundus
from datamodules.images import MIN_IMAGE_SIDE, read_image
from datamodules.sleep import read_psg
from datamodules.synthetic.sleep import write_edf
from mmclin.errors import DataError
from mmclin.reports.qa import load_radiograph

LEADS = ["I", "II", "III"]


# ------------------------------------------------------------------------------------------- WFDB units


def _record(folder, name="rec", n=1000, fmt="16", units="uV", signal=None):
    """A 3-lead 250 Hz record with fixed gains (so records of different lengths share one digital scale)."""
    if signal is None:
        t = np.arange(n) / 250
        signal = np.stack([np.sin(2 * np.pi * (k + 1) * t) * 0.4 * (k + 1) for k in range(3)], axis=1)
    gain = 100.0 if fmt == "80" else 200.0
    wfdb.wrsamp(name, fs=250, units=[units] * 3, sig_name=LEADS, p_signal=signal[:n], fmt=[fmt] * 3,
                adc_gain=[gain] * 3, baseline=[0] * 3, write_dir=str(folder))
    return folder / name, signal[:n].T


@pytest.mark.parametrize("written, encoding, to_mv", [
    ("mV", "utf-8", 1.0), ("MV", "utf-8", 1.0),  # upper case is how some exporters write mV: no megavolt ECGs
    ("uV", "utf-8", 1e-3), ("UV", "utf-8", 1e-3),
    ("\u00b5V", "utf-8", 1e-3), ("\u00b5V", "latin-1", 1e-3),  # MICRO SIGN, as UTF-8 and as one Latin-1 byte
    ("\u03bcV", "utf-8", 1e-3),  # GREEK SMALL LETTER MU
    ("V", "utf-8", 1e3), ("nV", "utf-8", 1e-6),
])
def test_every_voltage_spelling_of_a_wfdb_header_reads_as_mv(tmp_path, written, encoding, to_mv):
    t = np.arange(1000) / 250
    truth = np.stack([np.sin(2 * np.pi * (k + 1) * t) * 0.4 * (k + 1) for k in range(3)])  # (3, L) mV
    wfdb.wrsamp("rec", fs=250, units=["mV"] * 3, sig_name=LEADS, p_signal=truth.T / to_mv, fmt=["16"] * 3,
                adc_gain=[20000 * to_mv] * 3, baseline=[0] * 3, write_dir=str(tmp_path))  # written in `written`
    header = tmp_path / "rec.hea"
    header.write_bytes(header.read_text().replace("/mV", f"/{written}").encode(encoding))
    ecg = read_wfdb_record(tmp_path / "rec")
    assert ecg.source_units == [written] * 3
    np.testing.assert_allclose(ecg.signal, truth, atol=1e-4)


@pytest.mark.parametrize("written", ["mA", "%", "\u00c2\u00b5V"])  # the last: UTF-8 read as Latin-1 and saved again
def test_an_unknown_unit_names_record_lead_and_unit(tmp_path, written):
    path, _ = _record(tmp_path, units="mV")
    header = path.with_suffix(".hea")
    header.write_bytes(header.read_text().replace("/mV", f"/{written}").encode("utf-8"))
    with pytest.raises(DataError, match=rf"rec: lead I is in '{written}'; expected a voltage unit"):
        read_wfdb_record(path)


# ------------------------------------------------------------------------------------------- WFDB length


@pytest.mark.parametrize("fmt", ["16", "212", "80", "24", "32"])
def test_a_header_that_undercounts_its_samples_is_refused_even_with_agreeing_checksums(tmp_path, fmt):
    """The header (and its checksums) describe the first 500 samples; the signal file holds 1000."""
    path, _ = _record(tmp_path, n=500, fmt=fmt)
    full, _ = _record(tmp_path, name="full", n=1000, fmt=fmt)
    shutil.copy(full.with_suffix(".dat"), path.with_suffix(".dat"))
    with pytest.raises(DataError, match=rf"rec: the header declares 500 samples per signal \(sig_len\) but rec.dat "
                                        rf"holds 1000 \(.* format {fmt}"):
        read_wfdb_record(path)


@pytest.mark.parametrize("fmt", ["16", "212"])
def test_a_header_that_overcounts_its_samples_is_refused(tmp_path, fmt):
    path, _ = _record(tmp_path, n=1000, fmt=fmt)
    half, _ = _record(tmp_path, name="half", n=500, fmt=fmt)
    shutil.copy(half.with_suffix(".dat"), path.with_suffix(".dat"))
    with pytest.raises(DataError, match=r"rec: signal file (rec.dat )?does not hold the 1000 samples x 3 signals"):
        read_wfdb_record(path)


@pytest.mark.parametrize("n", [999, 1000])
def test_packed_and_odd_length_records_read_whole(tmp_path, n):
    """Format 212 packs two samples in 3 bytes: an odd count ends in a partial block, which is not an extra frame."""
    for fmt in ("212", "16"):
        path, values = _record(tmp_path, name=f"r{fmt}", n=n, fmt=fmt, units="mV")
        assert read_wfdb_record(path).signal.shape == (3, n)
        single = tmp_path / f"one{fmt}"
        wfdb.wrsamp(single.name, fs=250, units=["mV"], sig_name=["I"], p_signal=values[:1].T, fmt=[fmt],
                    adc_gain=[200.0], baseline=[0], write_dir=str(tmp_path))
        assert read_wfdb_record(single).signal.shape == (1, n)


def test_real_mit_bih_record_passes_the_length_check():
    record = read_wfdb_record(shared_data("wfdb_physionet_samples") / "100")  # format 212, 650000 x 2
    assert record.signal.shape == (2, 650000)


# ------------------------------------------------------------------------------------------- EDF


def _edf(tmp_path, units: dict[str, bytes], seconds=60, name="night.edf"):
    """An EDF with the given channels, each a 10 Hz sine of amplitude 20 in its written unit; `units` holds the raw
    8-byte unit fields to patch in (written as 'uV' first, since the writer is ASCII-only)."""
    t = np.arange(seconds * 100) / 100
    signals = [(label, "uV", 100.0, -500.0, 500.0, 20 * np.sin(2 * np.pi * 10 * t)) for label in units]
    path = write_edf(tmp_path / name, signals)
    data = bytearray(path.read_bytes())
    for i, raw in enumerate(units.values()):
        start = 256 + len(units) * (16 + 80) + 8 * i  # label, transducer fields, then the unit field of signal i
        data[start:start + 8] = raw.ljust(8)
    path.write_bytes(bytes(data))
    return path


def test_edf_voltage_channels_come_back_in_uv_whatever_the_spelling(tmp_path):
    units = {"EEG Fpz-Cz": b"uV", "EEG Pz-Oz": b"\xb5V", "EOG horizontal": b"mV", "EMG submental": "µV".encode(),
             "ECG": b"V", "Resp oro-nasal": b""}
    psg = read_psg(_edf(tmp_path, units), list(units))
    assert psg.units == ["uV"] * 5 + [""]
    peaks = np.abs(psg.signal).max(axis=1)
    np.testing.assert_allclose(peaks / peaks[0], [1, 1, 1e3, 1, 1e6, 1], rtol=1e-3)  # mV x 1e3, V x 1e6


@pytest.mark.parametrize("raw", [b"", b"mmHg", b"%"])
def test_an_edf_electrical_channel_without_a_voltage_unit_is_refused(tmp_path, raw):
    path = _edf(tmp_path, {"EEG Fpz-Cz": raw, "Resp oro-nasal": b""})
    with pytest.raises(DataError, match=rf"night.edf: channel EEG Fpz-Cz is in '{raw.decode()}'; an EEG signal needs "
                                        "a voltage unit"):
        read_psg(path, ["EEG Fpz-Cz"])
    assert read_psg(path, ["Resp oro-nasal"]).units == [""]  # not an electrical channel: kept as written


def test_edf_record_count_is_checked_against_the_file_size(tmp_path):
    """Documented behaviour of the EDF reader (already checked before this issue): more data than declared, or less,
    is refused naming both."""
    path = _edf(tmp_path, {"EEG Fpz-Cz": b"uV"})  # two 30-s data records after a 512-byte header
    one_record = (path.stat().st_size - 512) // 2
    path.write_bytes(path.read_bytes() + path.read_bytes()[512:512 + one_record])
    with pytest.raises(DataError, match=r"night.edf: header declares 2 data records .* but the file holds"):
        read_psg(path, ["EEG Fpz-Cz"])


# ------------------------------------------------------------------------------------------- CT


def _nifti(path, shape):
    hu = np.full(shape, -1000, np.int16)
    hu[tuple(slice(s // 4, s - s // 4) for s in shape)] = 40  # a soft-tissue block in air
    nib.save(nib.Nifti1Image(hu, np.diag([1.5, 1.5, 3.0, 1.0])), str(path))
    return path


@pytest.mark.parametrize("shape", [(48, 40, 1), (1, 40, 48), (48, 1, 40), (48, 40, 1, 1)])
def test_a_one_voxel_thick_nifti_is_refused_on_every_route(tmp_path, shape):
    from datamodules.ct_vqa import CTVQADataModule

    path = _nifti(tmp_path / "thin.nii.gz", shape)
    words = rf"thin.nii.gz: {' x '.join(map(str, shape[:3]))} voxels; a CT volume needs at least {MIN_CT_SLICES} "
    with pytest.raises(DataError, match=words):
        load_ct(path, CTPreprocessing(grid=(8, 16, 16)))
    with pytest.raises(DataError, match=words):
        CTVolumeDataset([path], CTPreprocessing(grid=(8, 16, 16)), tmp_path / "cache")[0]
    with pytest.raises(DataError, match=words):
        CTVQADataModule(grid=(8, 16, 16)).study_item(path, "Is there a lesion in the liver?")
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.uint8), np.diag([1.5, 1.5, 3.0, 1.0])), str(mask))
    with pytest.raises(DataError, match=words):
        load_ct_and_mask(path, mask)


def test_the_documented_minimum_of_slices_is_accepted(tmp_path):
    out = load_ct(_nifti(tmp_path / "two.nii.gz", (48, 40, MIN_CT_SLICES)), CTPreprocessing(grid=(8, 16, 16)))
    assert tuple(out["image"].shape) == (1, 8, 16, 16)


def test_a_single_dicom_slice_is_refused_as_before(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(shared_data("ct_dcmqi_liver_seg") / "ct-3slice" / "01.dcm", one / "01.dcm")
    with pytest.raises(DataError, match=rf"one: 1 slice\(s\) \(01.dcm\); a CT volume needs at least {MIN_CT_SLICES}"):
        check_dicom_series(one)
    with pytest.raises(DataError, match="a single slice is not a volume"):
        load_ct(one)


# ------------------------------------------------------------------------------------------- images


def _gradient16(path, size=(96, 64)):
    """A 16-bit grayscale PNG spanning the full range; returns it and its 8-bit twin (by the PNG rescaling rule)."""
    pixels = np.linspace(0, 65535, size[0] * size[1]).reshape(size[1], size[0]).astype(np.uint16)
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode == "I;16"
    return path, np.round(pixels / 257).astype(np.uint8)


def test_a_16_bit_png_is_scaled_by_its_bit_depth_not_clipped_to_white(tmp_path):
    path, eight_bit = _gradient16(tmp_path / "g16.png")
    rgb = np.asarray(read_image(path))
    assert rgb.shape == (64, 96, 3) and (rgb == eight_bit[..., None]).all()
    assert (np.asarray(read_image(path, "L")) == eight_bit).all()
    assert np.asarray(Image.open(path).convert("RGB")).mean() > 250  # what PIL alone gives: clipped to white


def test_a_16_bit_photograph_reaches_the_model_as_its_8_bit_twin(tmp_path):
    from open_clip import image_transform

    path, eight_bit = _gradient16(tmp_path / "g16.png")
    Image.fromarray(eight_bit).save(tmp_path / "g8.png")
    transform = image_transform(32, is_train=False)
    data = DermDataModule(demo_lesions_per_class=4, demo_image_size=32)
    data.connect(transforms=(transform, transform))
    torch.testing.assert_close(data.study_item(path)["image"], data.study_item(tmp_path / "g8.png")["image"])
    fundus = _gradient16(tmp_path / "f16.png", size=(200, 160))[0]
    Image.fromarray(np.asarray(read_image(fundus, "L"))).save(tmp_path / "f8.png")
    assert torch.equal(load_fundus(fundus, 32, crop_border=False), load_fundus(tmp_path / "f8.png", 32,
                                                                                 crop_border=False))


def test_palette_and_transparent_images_convert_correctly(tmp_path):
    palette = Image.new("P", (32, 32))
    palette.putpalette([0, 0, 0, 250, 20, 10, 10, 200, 30] + [0] * 759)
    palette.paste(1, (0, 0, 16, 32))
    palette.paste(2, (16, 0, 32, 32))
    palette.save(tmp_path / "p.png")
    palette.save(tmp_path / "p_transparent.png", transparency=2)
    assert tuple(np.asarray(read_image(tmp_path / "p.png"))[0, 31]) == (10, 200, 30)
    rgb = np.asarray(read_image(tmp_path / "p_transparent.png"))
    assert tuple(rgb[0, 0]) == (250, 20, 10) and tuple(rgb[0, 31]) == (0, 0, 0)  # transparent: over black
    gray_alpha = np.stack([np.full((32, 32), 200, np.uint8), np.full((32, 32), 128, np.uint8)], axis=-1)
    Image.fromarray(gray_alpha, "LA").save(tmp_path / "la.png")
    assert tuple(np.asarray(read_image(tmp_path / "la.png"))[5, 5]) == (100, 100, 100)  # 200 at half opacity
    Image.new("RGBA", (32, 32), (200, 100, 50, 255)).save(tmp_path / "opaque.png")
    assert tuple(np.asarray(read_image(tmp_path / "opaque.png"))[5, 5]) == (200, 100, 50)


def test_float_pixels_are_refused(tmp_path):
    Image.fromarray(np.zeros((32, 32), np.float32), "F").save(tmp_path / "f.tif")
    with pytest.raises(DataError, match=r"f.tif': floating-point pixels have no defined range"):
        read_image(tmp_path / "f.tif")


@pytest.mark.parametrize("size", [(1, 1), (MIN_IMAGE_SIDE - 1, 200)])
def test_an_image_below_the_minimum_size_is_refused_on_every_route(tmp_path, size):
    from open_clip import image_transform

    from datamodules.fundus import FundusReportDataModule

    path = tmp_path / "tiny.png"
    Image.new("RGB", size, (200, 90, 30)).save(path)
    words = rf"image '.*tiny.png': {size[0]}x{size[1]} pixels; expected at least {MIN_IMAGE_SIDE} pixels a side"
    with pytest.raises(DataError, match=words):
        read_image(path)
    with pytest.raises(DataError, match=words):
        DermDataModule(demo_lesions_per_class=4, demo_image_size=32, image_size=32).study_item(path)
    table = pd.DataFrame({"path": [str(path)], "caption": ["x"], "label": ["nevus"], "line": [7]})
    with pytest.raises(DataError, match="pairs.csv line 7: " + words):
        ImageTextDataset(table, ["nevus"], image_transform(32, False), None, "pairs.csv")[0]
    with pytest.raises(DataError, match=words):
        FundusReportDataModule(image_size=32).study_item(path)
    with pytest.raises(DataError, match="report r1: " + words):
        load_radiograph({"id": "r1", "images": [str(path)]}, 32)
    Image.new("RGB", (MIN_IMAGE_SIDE, MIN_IMAGE_SIDE), (200, 90, 30)).save(path)
    assert read_image(path).size == (MIN_IMAGE_SIDE, MIN_IMAGE_SIDE)


# ------------------------------------------------------------------------------------------- fresh processes


def _predict(config: str, *args: str, tmp_path) -> list[str]:
    return ["-m", "mmclin", "predict", "-c", str(CONFIGS / config), *args, "--trainer.logger", "false",
            "--trainer.default_root_dir", str(tmp_path / "run")]


def test_predict_on_a_wfdb_record_in_an_unknown_unit_is_one_line(tmp_path, demo_cache):
    t = np.arange(2500) / 250
    wfdb.wrsamp("twelve", fs=250, units=["mA"] * 12, p_signal=np.stack([np.sin(t * (k + 1)) for k in range(12)], 1),
                sig_name=["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"],
                fmt=["16"] * 12, write_dir=str(tmp_path))
    studies = tmp_path / "studies.jsonl"
    studies.write_text(json.dumps({"input": str(tmp_path / "twelve"), "question": "Is this ECG normal?",
                                   "choices": ["yes", "no"]}) + "\n")
    one_line_error(_predict("ecg-qa-softprompt.yaml", "--data.init_args.root", str(tmp_path),  # no demo needed
                            "--data.init_args.predict", str(studies), tmp_path=tmp_path),
                   demo_cache, "twelve: lead I is in 'mA'; expected a voltage unit")


@pytest.mark.slow  # the reader's refusal is tested in process above; this is its CLI route
def test_predict_on_an_edf_eeg_in_an_unknown_unit_is_one_line(tmp_path, demo_cache):
    path = _edf(tmp_path, {"EEG Fpz-Cz": b"mA", "EEG Pz-Oz": b"uV", "EOG horizontal": b"uV"}, seconds=180)
    one_line_error(_predict("sleep-qa-softprompt.yaml", "--data.init_args.root", str(tmp_path),
                            "--data.init_args.predict", str(path), tmp_path=tmp_path),
                   demo_cache, "night.edf: channel EEG Fpz-Cz is in 'mA'; an EEG signal needs a voltage unit")


@pytest.mark.slow  # the reader's refusal is tested in process above; this is its CLI route
def test_predict_on_a_one_slice_nifti_is_one_line(tmp_path, demo_cache):
    path = _nifti(tmp_path / "thin.nii.gz", (64, 64, 1))
    studies = tmp_path / "studies.jsonl"
    studies.write_text(json.dumps({"input": str(path), "question": "Is there a lesion in the liver?"}) + "\n")
    one_line_error(_predict("ct-vqa.yaml", "--data.init_args.root", str(tmp_path), "--data.init_args.predict",
                            str(studies), tmp_path=tmp_path),
                   demo_cache, "thin.nii.gz: 64 x 64 x 1 voxels; a CT volume needs at least 2 slices")


@pytest.mark.slow  # the reader's refusal is tested in process above; this is its CLI route
def test_predict_on_a_one_pixel_photograph_is_one_line(tmp_path, demo_cache):
    path = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (255, 0, 0)).save(path)
    one_line_error(_predict("derm-clip.yaml", "--data.init_args.demo_lesions_per_class", "4",
                            "--data.init_args.demo_image_size", "32", "--data.init_args.predict", str(path),
                            "--model.init_args.model_config", json.dumps(TINY_CLIP), tmp_path=tmp_path),
                   demo_cache, "one.png': 1x1 pixels; expected at least 16 pixels a side")
