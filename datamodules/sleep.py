"""Sleep PSG readers: EDF/EDF+ signals and EDF+ hypnograms (Sleep-EDF Sleep Cassette, HMC) as AASM stages.

Sleep-EDF (Kemp et al. 2000, PhysioNet sleep-edfx) ships ``SC4ssNE0-PSG.edf`` with ``SC4ssNEx-Hypnogram.edf``
scored in Rechtschaffen & Kales; HMC (Alvarez-Estevez & Rijsman 2021) scores in AASM and appends ``@@<channel>``
to its labels. EDF: Kemp et al. 1992; EDF+ and its annotation TALs: Kemp & Olivan 2003, edfplus.info/specs.

Why a home-made EDF reader: wfdb 4.3's ``read_edf`` brings all signals to the gcd of their rates by averaging
(Sleep-EDF's 100 Hz EEG with 1 Hz respiration comes back at 1 Hz, and the averaging branch mis-scales by
operator precedence), and its ``rdedfann`` fails (it passes ``delete_file`` that ``read_edf`` does not take)
and flattens TAL separators to spaces. The EDF header is fixed-width ASCII and the data little-endian int16.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from datamodules.ecg import resample_to, voltage_to_mv
from mmclin.errors import ConfigError, DataError

AASM_STAGES = ("W", "N1", "N2", "N3", "R")
_UNSCORED, _MOVEMENT, _GAP = -2, -3, -4  # internal codes; all become -1 in the epoch array
# Annotation text (lower case, "@@channel" removed) -> stage index or marker. R&K S3 and S4 merge into N3
# (AASM 2007); "Movement time" has no AASM stage and is kept apart from unscored epochs in the summary.
STAGE_LABELS = {
    "sleep stage w": 0, "sleep stage 1": 1, "sleep stage n1": 1, "sleep stage 2": 2, "sleep stage n2": 2,
    "sleep stage 3": 3, "sleep stage 4": 3, "sleep stage n3": 3, "sleep stage r": 4,
    "sleep stage ?": _UNSCORED, "movement time": _MOVEMENT,
}
# EDF+ signal types measured in volts (Kemp & Olivan 2003, "standard texts"): a label starting with one of them
# must carry a voltage unit.
_ELECTRICAL_TYPES = ("EEG", "ECG", "EOG", "ERG", "EMG")
_SIGNAL_FIELDS = (("label", 16), ("transducer", 80), ("unit", 8), ("pmin", 8), ("pmax", 8), ("dmin", 8),
                  ("dmax", 8), ("prefilter", 80), ("samples", 8), ("reserved", 32))


class Annotation(NamedTuple):
    onset_s: float  # seconds from the file's start time
    duration_s: float  # 0 when the TAL gives none
    label: str  # text as written, e.g. "Sleep stage 4" or "Lights off@@EEG F4-A1"


@dataclass
class HypnogramSummary:
    """What `hypnogram_to_epochs` did with every epoch and annotation."""

    n_epochs: int
    stage_counts: dict[str, int]  # AASM stage -> epochs
    n_unscored: int  # "Sleep stage ?" epochs
    n_movement: int  # "Movement time" epochs
    n_gap: int  # epochs no stage annotation covers
    n_trimmed: int  # unscored/movement epochs past the PSG end, dropped
    ignored: dict[str, int]  # non-stage annotations (lights off/on, ...) -> count


@dataclass
class PSGRecord:
    signal: np.ndarray  # (C, L) float32 in each channel's physical unit (uV for voltages)
    fs: float  # Hz
    channel_names: list[str]
    units: list[str]  # physical dimension per channel: "uV" for every voltage, else as in the EDF header
    start: dt.datetime | None  # recording start from the header; None when anonymised beyond parsing
    record: str  # file path

    @property
    def duration_s(self) -> float:
        return self.signal.shape[1] / self.fs


@dataclass
class _EDFHeader:
    path: Path
    start: dt.datetime | None
    header_bytes: int
    n_records: int
    record_s: float  # duration of one data record, s (0 in annotation-only files)
    discontinuous: bool  # EDF+D
    signals: dict[str, list[str]]  # field name -> one string per signal


def _read_edf_header(path: str | os.PathLike) -> _EDFHeader:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: EDF file not found")
    with open(path, "rb") as file:
        fixed = file.read(256)
        if len(fixed) < 256 or fixed[:8].strip() != b"0":
            raise DataError(f"{path}: not an EDF file (expected a 256-byte header starting with version '0')")
        text = fixed.decode("latin-1")
        try:
            header_bytes, n_records, record_s, n_signals = (int(text[184:192]), int(text[236:244]),
                                                            float(text[244:252]), int(text[252:256]))
        except ValueError as err:
            raise DataError(f"{path}: unreadable EDF header field ({err})") from err
        per_signal = file.read(256 * n_signals).decode("latin-1")
    if n_signals < 1 or len(per_signal) < 256 * n_signals or header_bytes != 256 * (n_signals + 1):
        raise DataError(f"{path}: EDF header declares {n_signals} signals and {header_bytes} header bytes; "
                        f"expected 256 * (signals + 1) bytes and at least one signal")
    signals, pos = {}, 0
    for name, width in _SIGNAL_FIELDS:
        signals[name] = [per_signal[pos + i * width: pos + (i + 1) * width].strip() for i in range(n_signals)]
        pos += width * n_signals
    try:
        record_bytes = 2 * sum(int(n) for n in signals["samples"])
    except ValueError as err:
        raise DataError(f"{path}: unreadable samples-per-record field {signals['samples']}") from err
    if record_bytes <= 0:
        raise DataError(f"{path}: data records hold no samples; expected samples-per-record > 0")
    size = path.stat().st_size - header_bytes
    if n_records == -1:  # allowed while recording; derive it from the file size
        n_records = size // record_bytes
    if size != n_records * record_bytes:
        raise DataError(f"{path}: header declares {n_records} data records of {record_bytes} bytes "
                        f"({n_records * record_bytes} bytes) but the file holds {size} bytes of data")
    try:  # dd.mm.yy hh.mm.ss; years 85-99 are 19xx (EDF spec clipping date)
        day, month, year = (int(v) for v in text[168:176].split("."))
        hour, minute, second = (int(v) for v in text[176:184].split("."))
        start = dt.datetime(year + (1900 if year >= 85 else 2000), month, day, hour, minute, second)
    except ValueError:
        start = None
    return _EDFHeader(path, start, header_bytes, n_records, record_s, text[192:197] == "EDF+D", signals)


def _digital(header: _EDFHeader, index: int) -> np.ndarray:
    """(n_records * samples,) int16 samples of one signal, read through a memory map."""
    counts = [int(n) for n in header.signals["samples"]]
    data = np.memmap(header.path, dtype="<i2", mode="r", offset=header.header_bytes,
                     shape=(header.n_records, sum(counts)))
    first = sum(counts[:index])
    return np.array(data[:, first:first + counts[index]]).reshape(-1)


def read_hypnogram(path: str | os.PathLike) -> list[Annotation]:
    """All annotations of an EDF+ file ("EDF Annotations" signals), sorted by onset.

    Each TAL is ``+onset[\\x15duration]\\x14text\\x14[text\\x14...]\\x00``; a TAL may carry several texts, and the
    first TAL of each data record, with no text, only keeps time and is skipped.
    """
    header = _read_edf_header(path)
    channels = [i for i, label in enumerate(header.signals["label"]) if label == "EDF Annotations"]
    if not channels:
        raise DataError(f"{path}: no 'EDF Annotations' signal; expected an EDF+ hypnogram, found "
                        f"{header.signals['label']}")
    annotations = []
    for index in channels:
        for tal in _digital(header, index).astype("<i2").tobytes().split(b"\x00"):
            if not tal:
                continue
            stamp, *texts = tal.split(b"\x14")
            onset, _, duration = stamp.decode("latin-1").partition("\x15")
            if onset[:1] not in ("+", "-"):
                raise DataError(f"{path}: TAL {tal[:40]!r} does not start with a signed onset like '+30'")
            annotations += [Annotation(float(onset), float(duration or 0), t.decode("utf-8", "replace"))
                            for t in texts if t]
    return sorted(annotations, key=lambda a: a.onset_s)


def hypnogram_to_epochs(
    annotations: Sequence[Annotation],
    epoch_s: float = 30.0,
    n_epochs: int | None = None,
    offset_s: float = 0.0,
    source: str = "hypnogram",
) -> tuple[np.ndarray, HypnogramSummary]:
    """Stage index per epoch: 0-4 for AASM_STAGES, -1 for unscored, movement or not covered.

    Args:
        annotations: from `read_hypnogram`; stage annotations must start on an epoch boundary and last whole
            epochs (unscored ones are rounded up). Other annotations are ignored and counted.
        epoch_s: epoch length, s.
        n_epochs: epochs in the PSG; None ends with the last stage annotation.
        offset_s: added to every onset (hypnogram start minus PSG start, s).
        source: file name for messages.

    Raises:
        DataError: unknown "Sleep stage" label, misaligned or overlapping stages, a scored stage before the
            PSG start or past ``n_epochs`` (hypnogram longer than the PSG).
    """
    if epoch_s <= 0:
        raise ConfigError(f"epoch_s must be > 0, got {epoch_s}")
    spans, ignored = [], Counter()
    for ann in map(Annotation._make, annotations):
        label = ann.label.split("@@")[0].strip()  # HMC: "Sleep stage N2@@EEG F4-A1"
        code = STAGE_LABELS.get(label.lower())
        if code is None:
            if label.lower().startswith("sleep stage"):
                raise DataError(f"{source}: unknown stage {ann.label!r} at {ann.onset_s} s; expected one of "
                                f"{sorted(STAGE_LABELS)}")
            ignored[label] += 1
            continue
        first, count = (ann.onset_s + offset_s) / epoch_s, ann.duration_s / epoch_s
        if abs(first - round(first)) > 1e-6 or (code >= 0 and abs(count - round(count)) > 1e-6):
            raise DataError(f"{source}: {ann.label!r} at {ann.onset_s} s for {ann.duration_s} s is not aligned to "
                            f"{epoch_s}-s epochs (offset {offset_s} s)")
        spans.append((round(first), round(count) if code >= 0 else math.ceil(count - 1e-6), code, ann))
    end = max((first + count for first, count, _, _ in spans), default=0)
    total = end if n_epochs is None else n_epochs
    raw = np.full(max(total, end), _GAP, dtype=np.int64)
    n_trimmed = 0
    for first, count, code, ann in spans:
        if first < 0 or first + count > total:
            if code >= 0:
                raise DataError(f"{source}: {ann.label!r} at {ann.onset_s} s ({count} epochs) lies outside the PSG "
                                f"({total} epochs of {epoch_s} s); hypnogram longer than the PSG")
            kept = max(0, min(first + count, total) - max(first, 0))
            n_trimmed, first, count = n_trimmed + count - kept, max(first, 0), kept
        if (raw[first:first + count] != _GAP).any():
            raise DataError(f"{source}: {ann.label!r} at {ann.onset_s} s overlaps an earlier stage annotation")
        raw[first:first + count] = code
    raw = raw[:total]
    summary = HypnogramSummary(
        n_epochs=total, stage_counts={s: int((raw == i).sum()) for i, s in enumerate(AASM_STAGES)},
        n_unscored=int((raw == _UNSCORED).sum()), n_movement=int((raw == _MOVEMENT).sum()),
        n_gap=int((raw == _GAP).sum()), n_trimmed=n_trimmed, ignored=dict(ignored))
    return np.where(raw >= 0, raw, -1), summary


def read_psg(path: str | os.PathLike, channels: Sequence[str], target_fs: float | None = None) -> PSGRecord:
    """Read named signals of an EDF/EDF+C file in physical units, every voltage in uV.

    Args:
        path: ``*-PSG.edf``.
        channels: labels to read, in this order, matched case-insensitively ("EEG Fpz-Cz").
        target_fs: resample every channel to this rate (Hz, polyphase anti-alias filter); required when the
            channels have different rates (Sleep-EDF: EEG 100 Hz, respiration 1 Hz).

    Raises:
        DataError: missing file or channel (the message lists those available), EDF+D (discontinuous) data,
            channels at different rates without `target_fs`, a bad header, an electrical channel (EEG, EOG, EMG,
            ...) without a voltage unit.
    """
    if isinstance(channels, str) or not channels:
        raise ConfigError(f"channels must be a non-empty sequence of labels, got {channels!r}")
    header = _read_edf_header(path)
    labels = header.signals["label"]
    index = {label.lower(): i for i, label in enumerate(labels)}
    missing = [c for c in channels if c.strip().lower() not in index]
    if missing:
        available = [label for label in labels if label != "EDF Annotations"]
        raise DataError(f"{path}: no channel(s) {missing}; the file has {available}")
    if header.discontinuous:
        raise DataError(f"{path}: EDF+D (discontinuous) recording; expected continuous EDF or EDF+C")
    picks = [index[c.strip().lower()] for c in channels]
    rates = [int(header.signals["samples"][i]) / header.record_s if header.record_s > 0 else 0.0 for i in picks]
    if min(rates) <= 0:
        raise DataError(f"{path}: data records of {header.record_s} s; expected signals with a positive rate")
    if target_fs is None and len(set(rates)) > 1:
        raise DataError(f"{path}: channels {list(channels)} have rates {rates} Hz; pass target_fs to resample them")
    rows, units = [], []
    for i, rate in zip(picks, rates):
        pmin, pmax, dmin, dmax = (float(header.signals[k][i]) for k in ("pmin", "pmax", "dmin", "dmax"))
        if dmax == dmin or pmax == pmin:
            raise DataError(f"{path}: channel {labels[i]} has digital range {dmin}..{dmax} and physical range "
                            f"{pmin}..{pmax}; expected non-empty ranges")
        unit, to_unit = _unit_to_uv(path, labels[i], header.signals["unit"][i])
        row = ((_digital(header, i) - dmin) * ((pmax - pmin) / (dmax - dmin)) + pmin) * to_unit
        rows.append(row if target_fs is None or rate == target_fs else resample_to(row, rate, target_fs))
        units.append(unit)
    fs = float(target_fs if target_fs is not None else rates[0])
    return PSGRecord(signal=np.stack(rows).astype(np.float32), fs=fs, channel_names=[labels[i] for i in picks],
                     units=units, start=header.start, record=str(path))


def _unit_to_uv(path, label: str, unit: str) -> tuple[str, float]:
    """A channel's unit after reading and the factor to it: every voltage spelling (V, mV, uV, µV, nV, see
    ``voltage_to_mv``) becomes uV, Sleep-EDF's unit; other units stay as written (factor 1).

    Raises:
        DataError: an EEG/ECG/EOG/ERG/EMG channel whose unit is no voltage.
    """
    try:  # the header is ASCII by the EDF spec; a writer that put UTF-8 there means "µV", not "ÂµV"
        unit = unit.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        pass
    to_mv = voltage_to_mv(unit) if unit.strip() else None
    if to_mv is not None:
        return "uV", to_mv * 1000
    kind = next((t for t in _ELECTRICAL_TYPES if label.strip().upper().startswith(t)), None)
    if kind:
        raise DataError(f"{path}: channel {label} is in {unit!r}; an {kind} signal needs a voltage unit "
                        "(V, mV, uV, µV, nV)")
    return unit, 1.0


def read_scored_psg(
    psg_path: str | os.PathLike,
    hypnogram_path: str | os.PathLike,
    channels: Sequence[str],
    target_fs: float | None = None,
    epoch_s: float = 30.0,
) -> tuple[PSGRecord, np.ndarray, HypnogramSummary]:
    """A PSG with one stage per whole `epoch_s` epoch (see `hypnogram_to_epochs`).

    Hypnogram onsets are shifted by the difference of the two header start times (whole seconds; 0 when either
    cannot be parsed). Scored epochs past the PSG raise DataError; trailing unscored ones are trimmed, counted.
    """
    psg = read_psg(psg_path, channels, target_fs)
    hyp_start = _read_edf_header(hypnogram_path).start
    offset = (hyp_start - psg.start).total_seconds() if hyp_start and psg.start else 0.0
    stages, summary = hypnogram_to_epochs(read_hypnogram(hypnogram_path), epoch_s,
                                          n_epochs=int(psg.duration_s // epoch_s), offset_s=offset,
                                          source=str(hypnogram_path))
    return psg, stages, summary


def pair_sleep_edf_files(root: str | os.PathLike) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """Pair ``*-PSG.edf`` with ``*-Hypnogram.edf`` by the first 7 characters (``SC4001E0`` <-> ``SC4001EC``).

    Returns:
        (psg, hypnogram) pairs sorted by name, and the files left without a partner (an explicit skip list).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: Sleep-EDF folder not found")
    psgs = {p.name[:7]: p for p in sorted(root.rglob("*-PSG.edf"))}
    hyps = {p.name[:7]: p for p in sorted(root.rglob("*-Hypnogram.edf"))}
    pairs = [(psgs[k], hyps[k]) for k in sorted(psgs.keys() & hyps.keys())]
    unpaired = sorted([psgs[k] for k in psgs.keys() - hyps.keys()] + [hyps[k] for k in hyps.keys() - psgs.keys()])
    return pairs, unpaired
