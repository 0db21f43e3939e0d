"""ECG readers: any WFDB record (PTB-XL, CinC 2021 .hea + .mat, MIT-BIH format 212, PTB) and the PTB-XL tables.

Signals come back as ``(C, L)`` float32 in mV at the header's rate or resampled to a model rate with
``scipy.signal.resample_poly`` (polyphase FIR with a Kaiser anti-alias filter, never plain decimation).
PTB-XL layout: Wagner et al., Sci Data 2020 (``ptbxl_database.csv``, ``scp_statements.csv``,
``records100/``, ``records500/``); CinC 2021 redistributes its 500 Hz records as ``HR<ecg_id:05d>.hea/.mat``.
"""

from __future__ import annotations

import ast
import math
import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import wfdb
from scipy.signal import resample_poly
from wfdb.io._signal import BYTES_PER_SAMPLE  # wfdb's own table of each format's bytes per sample
from wfdb.io.header import parse_header_content, rx_signal

from mmclin.errors import ConfigError, DataError

STANDARD_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
# Official PTB-XL folds (Wagner et al. 2020): 1-8 train, 9 validation, 10 test (9 and 10 are human-validated).
PTBXL_FOLD_SPLIT = {**{fold: "train" for fold in range(1, 9)}, 9: "val", 10: "test"}
# Voltage units of WFDB and EDF headers -> factor to mV, keyed after Unicode NFKC (MICRO SIGN U+00B5 becomes
# GREEK SMALL LETTER MU U+03BC) and case folding. Case is dropped on purpose: exporters that write upper case
# mean "MV" = mV and "UV" = uV (a body-surface potential in megavolts does not exist). An empty field is mV (WFDB).
_TO_MV = {"v": 1e3, "mv": 1.0, "uv": 1e-3, "\u03bcv": 1e-3, "nv": 1e-6}
# Packed formats store samples in blocks (bytes, samples): 212 two 12-bit samples in 3 bytes, 310/311 three
# 10-bit samples in a 32-bit word (WFDB signal(5)); a writer pads the last block.
_BLOCKS = {"212": (3, 2), "310": (4, 3), "311": (4, 3)}
_STANDARD_BY_LOWER = {name.lower(): name for name in STANDARD_LEADS}


@dataclass
class ECGRecord:
    """One ECG record as read from disk."""

    signal: np.ndarray  # (C, L) float32, mV
    fs: float  # sampling rate of `signal`, Hz
    lead_names: list[str]  # C names; standard leads spelled as in STANDARD_LEADS ("avr" -> "aVR")
    record: str  # record path without extension, for messages and metadata
    source_units: list[str]  # C physical units in the header, before conversion to mV
    comments: list[str] = field(default_factory=list)  # header comment lines (CinC: "Age: 59", "Dx: 164934002,...")
    flat_leads: list[str] = field(default_factory=list)  # flat leads kept because on_flat="allow"
    n_nan: int = 0  # NaN samples set to 0 because on_nan="zero"


def canonical_lead_name(name: str) -> str:
    """Spell a standard lead as in STANDARD_LEADS whatever its case ("avr", "AVR" -> "aVR"); others unchanged."""
    stripped = name.strip()
    return _STANDARD_BY_LOWER.get(stripped.lower(), stripped)


def resample_to(signal: np.ndarray, fs: float, target_fs: float) -> np.ndarray:
    """Resample along the last axis with a polyphase anti-alias filter.

    Args:
        signal: (..., L) samples at `fs`.
        fs: source rate, Hz.
        target_fs: wanted rate, Hz. up/down is the reduced fraction target_fs/fs (rates rounded to 1/1000 Hz).

    Returns:
        (..., ceil(L * up / down)) float64. Edges are padded by a fitted line (``padtype="line"``), so a
        baseline offset does not ring at the ends as zero padding would.
    """
    if fs <= 0 or target_fs <= 0:
        raise ConfigError(f"sampling rates must be > 0, got fs={fs} and target_fs={target_fs}")
    ratio = Fraction(target_fs).limit_denominator(1000) / Fraction(fs).limit_denominator(1000)
    if ratio == 1:
        return np.asarray(signal, dtype=np.float64)
    return resample_poly(np.asarray(signal, dtype=np.float64), ratio.numerator, ratio.denominator,
                         axis=-1, padtype="line")


def read_wfdb_record(
    path: str | os.PathLike,
    leads: Sequence[str] | None = None,
    target_fs: float | None = None,
    on_nan: Literal["error", "zero"] = "error",
    on_flat: Literal["error", "allow"] = "error",
    flat_tol_mv: float = 1e-3,
) -> ECGRecord:
    """Read a WFDB record (.hea with .dat/.mat/... signal files) as mV.

    Args:
        path: record path with or without the ``.hea`` extension.
        leads: names to select, in this order, matched case-insensitively ("AVR" finds "aVR"); None keeps all.
        target_fs: resample to this rate (Hz); None keeps the header's rate.
        on_nan: "error" raises on invalid (NaN) samples; "zero" sets them to 0 and counts them in `n_nan`.
        on_flat: "error" raises on a lead whose peak-to-peak range is <= `flat_tol_mv`; "allow" keeps it and
            lists it in `flat_leads`.
        flat_tol_mv: flat-line tolerance, mV, over the whole record.

    Raises:
        DataError: missing header or signal file, header and signal file disagree (length or checksum),
            requested leads missing, unknown units, NaN or flat leads (unless allowed).
    """
    if on_nan not in ("error", "zero") or on_flat not in ("error", "allow"):
        raise ConfigError(f"on_nan must be 'error'|'zero' and on_flat 'error'|'allow', got {on_nan!r}, {on_flat!r}")
    if target_fs is not None and target_fs <= 0:
        raise ConfigError(f"target_fs must be > 0, got {target_fs}")
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".hea", ".dat", ".mat") else base
    name = str(base)
    if not base.with_suffix(".hea").is_file():
        raise DataError(f"{name}.hea: WFDB header not found")
    try:
        header = wfdb.rdheader(name)
    except Exception as err:  # wfdb raises bare ValueError/IndexError on malformed headers
        raise DataError(f"{name}.hea: not a readable WFDB header ({err})") from err
    if isinstance(header, wfdb.MultiRecord):
        raise DataError(f"{name}.hea: a multi-segment WFDB record; expected a single-segment record")
    names = [canonical_lead_name(n) for n in header.sig_name]
    for file_name in sorted(set(header.file_name)):
        if not (base.parent / file_name).is_file():
            owners = [n for n, f in zip(names, header.file_name) if f == file_name]
            raise DataError(f"{name}: signal file {base.parent / file_name} (leads {owners}) named in the header "
                            "is missing")
    channels = _select(names, leads, name)
    units = header_units(base.with_suffix(".hea"), header.n_sig)
    factors = []
    for i in channels:
        factor = voltage_to_mv(units[i])
        if factor is None:
            raise DataError(f"{name}: lead {names[i]} is in {units[i]!r}; expected a voltage unit (V, mV, uV, "
                            "µV, nV)")
        factors.append(factor)
    try:
        rec = wfdb.rdrecord(name, channels=channels, physical=False)
    except (ValueError, OSError) as err:  # short signal file: "Samples were not loaded correctly" / broadcast error
        raise DataError(f"{name}: signal file does not hold the {header.sig_len} samples x {header.n_sig} "
                        f"signals the header declares ({err})") from err
    _check_checksums(rec, header, channels, names, name)
    _check_signal_file_sizes(header, base, names)
    signal = rec.dac().T * np.asarray(factors)[:, None]  # (C, L); invalid samples -> NaN
    lead_names = [names[i] for i in channels]
    n_nan = int(np.isnan(signal).sum())
    if n_nan and on_nan == "error":
        bad = {lead: int(c) for lead, c in zip(lead_names, np.isnan(signal).sum(axis=1)) if c}
        raise DataError(f"{name}: NaN (invalid) samples per lead {bad}; expected finite values (or on_nan='zero')")
    signal = np.nan_to_num(signal, nan=0.0)
    flat = [lead for lead, ptp in zip(lead_names, np.ptp(signal, axis=1)) if ptp <= flat_tol_mv]
    if flat and on_flat == "error":
        raise DataError(f"{name}: flat-line lead(s) {flat} (peak-to-peak <= {flat_tol_mv} mV over "
                        f"{rec.sig_len} samples); expected a recorded signal (or on_flat='allow')")
    fs = float(rec.fs)
    if target_fs is not None and target_fs != fs:
        signal, fs = resample_to(signal, fs, target_fs), float(target_fs)
    return ECGRecord(signal=signal.astype(np.float32), fs=fs, lead_names=lead_names, record=name,
                     source_units=[units[i] for i in channels], comments=list(header.comments or []),
                     flat_leads=flat, n_nan=n_nan)


def voltage_to_mv(unit: str) -> float | None:
    """The factor that brings values in `unit` to mV ("" counts as mV), or None when `unit` is no voltage.

    Every spelling WFDB and EDF writers use is accepted: V, mV, uV, nV in any case, and micro written with
    MICRO SIGN (U+00B5) or GREEK MU (U+03BC); "MV" is read as mV (see ``_TO_MV``).
    """
    key = unicodedata.normalize("NFKC", unit).strip().casefold()
    return _TO_MV.get(key or "mv")


def header_units(hea: Path, n_sig: int) -> list[str]:
    """The physical unit of each signal as written in a WFDB header ("" where the field is empty).

    wfdb reads headers as ASCII and drops every other byte, so a unit written "µV" comes back from
    ``wfdb.rdheader`` as "V", a factor of 10^6 off; here the signal lines are parsed with wfdb's own pattern from
    the text decoded as UTF-8, or as Latin-1 (a single-byte MICRO SIGN, 0xB5) when it is not UTF-8.
    """
    raw = hea.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    lines = parse_header_content(text)[0][1:1 + n_sig]
    matches = [rx_signal.match(line) for line in lines]
    if len(matches) != n_sig or not all(matches):
        raise DataError(f"{hea}: expected {n_sig} readable signal lines after the record line")
    return [m.group("units") for m in matches]


def _check_signal_file_sizes(header: wfdb.Record, base: Path, names: list[str]) -> None:
    """Each signal file must hold the header's ``sig_len`` frames, no fewer and not a whole frame more.

    wfdb reads ``sig_len`` frames and ignores the rest of the file, so a header that under-counts its samples
    would read part of the record without a word. A trailing partial frame (padding) is allowed; FLAC-compressed
    formats (508, 516, 524) have no fixed size and are not checked.
    """
    if header.sig_len is None:  # wfdb then takes the length from the file size
        return
    for file_name in dict.fromkeys(header.file_name):
        signals = [i for i, f in enumerate(header.file_name) if f == file_name]
        fmt = header.fmt[signals[0]]
        if not BYTES_PER_SAMPLE.get(fmt):
            continue
        block_bytes, block_samples = _BLOCKS.get(fmt, (BYTES_PER_SAMPLE[fmt], 1))
        per_frame = sum((header.samps_per_frame or [1] * header.n_sig)[i] or 1 for i in signals)
        declared = header.sig_len * per_frame  # samples
        path = base.parent / file_name
        data_bytes = path.stat().st_size - (header.byte_offset[signals[0]] or 0)
        held = int(data_bytes // block_bytes) * block_samples  # whole blocks only
        padded = math.ceil(declared / block_samples) * block_samples
        if data_bytes < math.ceil(declared * block_bytes / block_samples):
            raise DataError(f"{base}: signal file {path.name} does not hold the {header.sig_len} samples x "
                            f"{len(signals)} signals the header declares (it holds {held // per_frame}: {data_bytes} "
                            f"bytes of data in format {fmt})")
        if held >= padded + per_frame:
            raise DataError(f"{base}: the header declares {header.sig_len} samples per signal (sig_len) but "
                            f"{path.name} holds {held // per_frame} ({data_bytes} bytes of data in format {fmt}, "
                            f"signals {[names[i] for i in signals]}); header and signal file disagree")


def _select(names: list[str], leads: Sequence[str] | None, record: str) -> list[int]:
    if leads is None:
        return list(range(len(names)))
    if isinstance(leads, str):
        raise ConfigError(f"leads must be a sequence of names, got the string {leads!r}")
    index = {n.lower(): i for i, n in enumerate(names)}
    wanted = [canonical_lead_name(lead).lower() for lead in leads]
    if len(set(wanted)) != len(wanted):
        raise ConfigError(f"leads {list(leads)} name a lead twice")
    missing = [lead for lead, w in zip(leads, wanted) if w not in index]
    if missing:
        raise DataError(f"{record}: has {len(names)} leads {names}; missing requested lead(s) {missing}")
    return [index[w] for w in wanted]


def _check_checksums(rec: wfdb.Record, header: wfdb.Record, channels: list[int], names: list[str], record: str) -> None:
    """WFDB headers carry a 16-bit checksum per signal; a header that under-counts samples reads silently otherwise."""
    if not header.checksum or any(s != 1 for s in (header.samps_per_frame or [1])):
        return
    sums = rec.d_signal.astype(np.int64).sum(axis=0) % 65536
    for col, i in enumerate(channels):
        if header.checksum[i] is not None and int(sums[col]) != header.checksum[i] % 65536:
            raise DataError(f"{record}: lead {names[i]}: checksum {header.checksum[i]} in the header but the "
                            f"{header.sig_len} samples read give {int(sums[col])}; header length and signal file "
                            "disagree")


def read_ptbxl_database(database_csv: str | os.PathLike, scp_statements_csv: str | os.PathLike) -> pd.DataFrame:
    """Read PTB-XL's ``ptbxl_database.csv`` with labels from ``scp_statements.csv``.

    Returns:
        The table indexed by ``ecg_id`` with ``scp_codes`` parsed to ``{code: likelihood %}``, plus
        ``diagnostic_superclass`` (sorted ``diagnostic_class`` of every code flagged diagnostic, whatever its
        likelihood, as in PTB-XL's example code), ``strat_fold`` (int) and ``split`` (1-8 train, 9 val, 10 test).

    Raises:
        DataError: missing file or column, unparsable ``scp_codes``, an SCP code absent from the statements
            table, a fold outside 1-10. Messages give the ecg_id and CSV line.
    """
    database_csv, scp_statements_csv = Path(database_csv), Path(scp_statements_csv)
    for csv in (database_csv, scp_statements_csv):
        if not csv.is_file():
            raise DataError(f"{csv}: CSV file not found")
    statements = pd.read_csv(scp_statements_csv, index_col=0)
    for column in ("diagnostic", "diagnostic_class"):
        if column not in statements.columns:
            raise DataError(f"{scp_statements_csv}: missing column {column!r}; the file has {list(statements.columns)}")
    superclass = statements.loc[statements["diagnostic"] == 1, "diagnostic_class"].to_dict()
    table = pd.read_csv(database_csv)
    missing = [c for c in ("ecg_id", "scp_codes", "strat_fold", "filename_lr", "filename_hr") if c not in table.columns]
    if missing:
        raise DataError(f"{database_csv}: missing column(s) {missing}; the file has {list(table.columns)}")
    codes, classes = [], []
    for line, (ecg_id, text, fold) in enumerate(zip(table["ecg_id"], table["scp_codes"], table["strat_fold"]), 2):
        where = f"{database_csv} line {line} (ecg_id {ecg_id})"
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError) as err:
            raise DataError(f"{where}: scp_codes {text!r} is not a dict literal like {{'NORM': 100.0}}") from err
        if not isinstance(parsed, dict):
            raise DataError(f"{where}: scp_codes {text!r} is not a dict literal like {{'NORM': 100.0}}")
        unknown = [code for code in parsed if code not in statements.index]
        if unknown:
            raise DataError(f"{where}: SCP code(s) {unknown} not in {scp_statements_csv}")
        if fold not in PTBXL_FOLD_SPLIT:
            raise DataError(f"{where}: strat_fold {fold!r}; expected an integer 1-10")
        codes.append(parsed)
        classes.append(sorted({superclass[code] for code in parsed if code in superclass}))
    table["scp_codes"], table["diagnostic_superclass"] = codes, classes
    table["strat_fold"] = table["strat_fold"].astype(int)
    table["split"] = table["strat_fold"].map(PTBXL_FOLD_SPLIT)
    return table.set_index("ecg_id")


def ptbxl_record_path(root: str | os.PathLike, ecg_id: int, row: pd.Series, fs: Literal[100, 500] = 500) -> Path:
    """Where the record of one ``read_ptbxl_database`` row lives under `root` (path without extension).

    Tries the published layout (``filename_hr`` at 500 Hz, ``filename_lr`` at 100 Hz), then, at 500 Hz, the
    CinC 2021 name ``HR<ecg_id:05d>``. Raises DataError listing both when neither header exists.
    """
    if fs not in (100, 500):
        raise ConfigError(f"PTB-XL ships 100 and 500 Hz records, got fs={fs}")
    root = Path(root)
    tried = [root / row["filename_hr" if fs == 500 else "filename_lr"]]
    if fs == 500:
        tried.append(root / f"HR{int(ecg_id):05d}")
    for candidate in tried:
        if candidate.with_suffix(".hea").is_file():
            return candidate
    raise DataError(f"ecg_id {ecg_id}: no WFDB header at {[str(p) + '.hea' for p in tried]}")
