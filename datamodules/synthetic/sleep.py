"""Seeded generator of polysomnography demo nights in the Sleep-EDF Sleep Cassette layout.

Each night is ``SC4{ss}{n}E0-PSG.edf`` (EDF+C, 30-s data records like the real files: EEG Fpz-Cz, EEG Pz-Oz and
EOG horizontal at 100 Hz in uV; Resp oro-nasal and EMG submental at 1 Hz) with ``SC4{ss}{n}EC-Hypnogram.edf``
(EDF+ annotations in Rechtschaffen & Kales labels, consecutive equal epochs merged into one annotation, a
trailing "Sleep stage ?" as in the real hypnograms). Kemp et al. 2000 describe the real data set; EDF/EDF+:
Kemp et al. 1992, Kemp & Olivan 2003.

The hypnogram is a Markov chain whose transition target follows ~90-min NREM/REM cycles (deep sleep early,
REM growing in later cycles), with wake at the start and end. The EEG of every 30-s epoch carries what a scorer
looks for (AASM manual; Rechtschaffen & Kales 1968): posterior alpha (8-12 Hz) in relaxed wake, low-amplitude
theta in S1, spindles (11-16 Hz, 0.5-2 s) and K-complexes in S2, > 75 uV delta (0.5-2 Hz) over 20-50 % of an S3
epoch and > 50 % of an S4 epoch, low-amplitude theta with sawtooth waves and rapid eye movements in REM; all over
1/f background noise.

Why a home-made EDF writer: no EDF+ writer (pyedflib, edfio, mne) is a dependency, and wfdb's ``wfdb_to_edf``
converts a WFDB record on disk and cannot write "EDF Annotations" signals.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from datamodules.synthetic.cache import build_once
from mmclin.errors import ConfigError

EPOCH_S = 30
EEG_FS = 100
RK_LABELS = {"W": "Sleep stage W", "1": "Sleep stage 1", "2": "Sleep stage 2", "3": "Sleep stage 3",
             "4": "Sleep stage 4", "R": "Sleep stage R", "M": "Movement time", "?": "Sleep stage ?"}
# Physical range per channel (label -> unit, fs, pmin, pmax); values outside are clipped like a saturated amplifier.
CHANNELS = {
    "EEG Fpz-Cz": ("uV", EEG_FS, -500.0, 500.0),
    "EEG Pz-Oz": ("uV", EEG_FS, -500.0, 500.0),
    "EOG horizontal": ("uV", EEG_FS, -1000.0, 1000.0),
    "Resp oro-nasal": ("", 1, -2000.0, 2000.0),
    "EMG submental": ("uV", 1, 0.0, 100.0),
}


def write_edf(
    path: str | os.PathLike,
    signals: Sequence[tuple[str, str, float, float, float, np.ndarray]] = (),
    record_s: float = EPOCH_S,
    annotations: Sequence[tuple[float, float, str]] | None = None,
    start: dt.datetime = dt.datetime(1989, 4, 1, 22, 0, 0),
) -> Path:
    """Write an EDF+C file: physical signals quantised to int16, and optionally one "EDF Annotations" signal.

    Args:
        path: file to write.
        signals: (label, unit, fs Hz, physical min, physical max, (L,) values) per signal; every L must fill the
            same whole number of `record_s` data records.
        record_s: data record duration, s; 0 for an annotation-only file (then ``signals`` must be empty).
        annotations: (onset s, duration s, text) written as TALs into a single data record.
        start: recording start (EDF keeps whole seconds and two-digit years, 1985-2084).

    Returns:
        `path`.
    """
    path = Path(path)
    if not signals and annotations is None:
        raise ConfigError("write_edf needs signals or annotations")
    n_records = 1
    specs = []  # (label, unit, pmin, pmax, dmin, dmax, samples per record, (n_records, spr) int16)
    for label, unit, fs, pmin, pmax, values in signals:
        spr = fs * record_s
        if record_s <= 0 or spr != int(spr) or len(values) % int(spr):
            raise ConfigError(f"{path}: signal {label!r} of {len(values)} samples at {fs} Hz does not fill whole "
                             f"{record_s}-s data records")
        n_records = len(values) // int(spr)
        scaled = (np.asarray(values, np.float64) - pmin) / (pmax - pmin) * 65535 - 32768
        digital = np.clip(np.round(scaled), -32768, 32767).astype("<i2").reshape(n_records, int(spr))
        specs.append((label, unit, pmin, pmax, -32768, 32767, int(spr), digital))
    if len({s[7].shape[0] for s in specs}) > 1:
        raise ConfigError(f"{path}: signals span different numbers of data records")
    if annotations is not None:
        tal = b"+0\x14\x14\x00" + b"".join(f"+{on:g}\x15{dur:g}\x14{text}\x14\x00".encode() for on, dur, text in
                                           annotations)
        if n_records != 1:  # keep it simple: every TAL in the first record, the rest hold time-keeping TALs only
            raise ConfigError(f"{path}: annotations with multi-record signals are not supported")
        spr = len(tal) // 2 + 1
        specs.append(("EDF Annotations", "", -1, 1, -32768, 32767, spr,
                      np.frombuffer(tal.ljust(2 * spr, b"\0"), "<i2").reshape(1, spr)))

    def cell(value, width: int) -> str:
        return str(value).ljust(width)[:width]

    recording = f"Startdate {start.strftime('%d-%b-%Y').upper()} X X X"
    header = (cell(0, 8) + cell("X X X X", 80) + cell(recording, 80) + cell(start.strftime("%d.%m.%y"), 8)
              + cell(start.strftime("%H.%M.%S"), 8) + cell(256 * (len(specs) + 1), 8) + cell("EDF+C", 44)
              + cell(n_records, 8) + cell(f"{record_s:g}", 8) + cell(len(specs), 4))
    fields = (16, 80, 8, 8, 8, 8, 8, 80, 8, 32)
    getters = (lambda s: s[0], lambda s: "", lambda s: s[1], lambda s: f"{s[2]:g}", lambda s: f"{s[3]:g}",
               lambda s: s[4], lambda s: s[5], lambda s: "", lambda s: s[6], lambda s: "")
    for width, get in zip(fields, getters):  # EDF stores each field for all signals before the next field
        header += "".join(cell(get(s), width) for s in specs)
    body = np.concatenate([s[7] for s in specs], axis=1).astype("<i2").tobytes()
    path.write_bytes(header.encode("ascii") + body)
    return path


def simulate_hypnogram(n_epochs: int, rng: np.random.Generator) -> list[str]:
    """R&K stage per 30-s epoch ("W", "1"-"4", "R", "M"): a Markov chain pulled towards a cycle-dependent target.

    Wake for 5-20 min, then NREM/REM cycles of 80-100 min (S3/S4 mostly in the first cycles, REM lengthening
    later), 5-15 min of final wake.
    """
    latency = int(rng.integers(10, 41))
    final_wake = int(rng.integers(10, 31))
    cycle = int(rng.integers(160, 201))
    stages, current = [], "W"
    for t in range(n_epochs):
        if t < latency or t >= n_epochs - final_wake:
            target = "W"
        else:
            k, phase = divmod((t - latency) / cycle, 1.0)
            rem_start = 0.85 - 0.12 * min(k, 3)  # REM share grows from ~15 % to ~50 % of a cycle
            deep = "4" if k == 0 else ("3" if k == 1 else "2")
            if phase < 0.05:
                target = "1"
            elif phase < 0.3 or rem_start - 0.25 <= phase < rem_start:
                target = "2"
            elif phase < rem_start - 0.25:
                target = "3" if phase < 0.37 else deep
            else:
                target = "R"
        if current != target and rng.random() < 0.35:
            current = target
        elif current != "W" and t >= latency and rng.random() < 0.015:
            current = "W"  # brief arousal
        elif current == "2" and rng.random() < 0.03:
            current = "1"
        stages.append("M" if current != "W" and rng.random() < 0.01 else current)
    return stages


def _pink(n: int, rng: np.random.Generator, fs: float = EEG_FS) -> np.ndarray:
    """Unit-RMS 1/f noise of n samples, 0.3-40 Hz."""
    freqs = np.fft.rfftfreq(n, 1 / fs)
    spectrum = (rng.normal(size=len(freqs)) + 1j * rng.normal(size=len(freqs)))
    spectrum *= np.where((freqs > 0.3) & (freqs < 40), 1 / np.sqrt(np.maximum(freqs, 0.3)), 0)
    x = np.fft.irfft(spectrum, n)
    return x / x.std()


def _band_noise(n: int, lo: float, hi: float, rng: np.random.Generator, fs: float = EEG_FS) -> np.ndarray:
    """Unit-RMS noise with a flat spectrum between lo and hi Hz (a narrow-band rhythm)."""
    freqs = np.fft.rfftfreq(n, 1 / fs)
    spectrum = (rng.normal(size=len(freqs)) + 1j * rng.normal(size=len(freqs))) * ((freqs >= lo) & (freqs <= hi))
    x = np.fft.irfft(spectrum, n)
    return x / x.std()


def _bursts(n: int, count: int, dur: tuple[float, float], rng: np.random.Generator, fs: float = EEG_FS):
    """Sum of `count` Hann-window envelopes of random duration (s) at random places; (n,) in [0, 1]."""
    env = np.zeros(n)
    for _ in range(count):
        width = int(rng.uniform(*dur) * fs)
        at = int(rng.integers(0, n - width))
        env[at:at + width] = np.maximum(env[at:at + width], np.hanning(width))
    return env


def _epoch_signals(stage: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Fpz-Cz, Pz-Oz, EOG) of one 30-s epoch in uV for an R&K stage."""
    n = EPOCH_S * EEG_FS
    t = np.arange(n) / EEG_FS
    front = 8 * _pink(n, rng)
    back = 8 * _pink(n, rng)
    eog = 10 * _pink(n, rng)
    if stage in ("W", "M"):
        alpha = _band_noise(n, 8.5, 11.5, rng) * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.1, 0.3) * t))
        back += rng.uniform(20, 35) * alpha  # eyes-closed posterior alpha
        front += rng.uniform(6, 12) * alpha + 4 * _band_noise(n, 15, 30, rng)
        for _ in range(int(rng.integers(0, 4))):  # blinks and slow saccades
            at = int(rng.integers(0, n - 60))
            eog[at:at + 60] += rng.choice([-1, 1]) * rng.uniform(80, 200) * np.hanning(60)
        if stage == "M":  # movement: large artefact over all channels
            env = _bursts(n, 2, (2, 6), rng)
            front, back = front + 150 * env * _pink(n, rng), back + 150 * env * _pink(n, rng)
            eog += 300 * env * _pink(n, rng)
    elif stage == "1":
        theta = _band_noise(n, 4, 7, rng)
        front += rng.uniform(15, 25) * theta
        back += rng.uniform(10, 20) * theta + 5 * _band_noise(n, 8.5, 11.5, rng)
        eog += rng.uniform(40, 80) * np.sin(2 * np.pi * rng.uniform(0.1, 0.3) * t + rng.uniform(0, 6.3))  # SEM
    elif stage == "2":
        front += rng.uniform(12, 20) * _band_noise(n, 3, 7, rng)
        back += rng.uniform(10, 16) * _band_noise(n, 3, 7, rng)
        spindle = _bursts(n, int(rng.integers(2, 7)), (0.5, 2.0), rng) * np.sin(2 * np.pi * rng.uniform(12, 14.5) * t)
        front += rng.uniform(25, 45) * spindle
        back += rng.uniform(15, 30) * spindle
        for _ in range(int(rng.integers(0, 3))):  # K-complex: sharp negative wave, then a slower positive one
            width = int(rng.uniform(0.6, 1.0) * EEG_FS)
            at = int(rng.integers(0, n - width))
            shape = -np.sin(np.linspace(0, 2 * np.pi, width)) * np.hanning(width)
            amp = rng.uniform(100, 200)
            front[at:at + width] += amp * shape
            back[at:at + width] += 0.4 * amp * shape
    elif stage in ("3", "4"):
        cover = rng.uniform(0.25, 0.45) if stage == "3" else rng.uniform(0.6, 0.9)
        delta = _band_noise(n, 0.5, 2.0, rng)
        level = np.convolve((rng.random(n // 50) < cover).repeat(50).astype(float), np.hanning(100) / 50, "same")
        front += rng.uniform(60, 90) * delta * (0.35 + level)
        back += rng.uniform(35, 55) * delta * (0.35 + level)
        front += 5 * _band_noise(n, 11, 15, rng)
    elif stage == "R":
        front += rng.uniform(10, 18) * _band_noise(n, 4, 7, rng)
        back += rng.uniform(8, 14) * _band_noise(n, 4, 7, rng) + 6 * _band_noise(n, 8, 10, rng)
        saw_env = _bursts(n, int(rng.integers(1, 4)), (1.0, 3.0), rng)
        saw = 2 * ((rng.uniform(2, 3.5) * t) % 1.0) - 1  # sawtooth waves, 2-3.5 Hz
        front += rng.uniform(20, 35) * saw_env * saw
        for _ in range(int(rng.integers(3, 12))):  # rapid eye movements: fast steps that drift back
            at = int(rng.integers(0, n - 150))
            step = rng.choice([-1, 1]) * rng.uniform(80, 250)
            eog[at:at + 150] += step * np.minimum(np.arange(150) / 10, 1) * np.exp(-np.arange(150) / 80)
    else:
        raise ConfigError(f"unknown R&K stage {stage!r}")
    eog += 0.3 * front  # frontal EEG (delta, K-complexes) reaches the EOG derivation
    return front, back, eog


def _slow_channels(stages: list[str], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Resp oro-nasal (arbitrary units) and EMG submental envelope (uV), both at 1 Hz."""
    n = len(stages) * EPOCH_S
    per_second = np.repeat(stages, EPOCH_S)
    rate = np.where(np.isin(per_second, ["3", "4"]), 0.22, 0.26) + np.where(per_second == "R", 0.04, 0.0)
    rate = rate + np.where(per_second == "R", 0.03, 0.005) * rng.normal(size=n)
    resp = 600 * np.sin(2 * np.pi * np.cumsum(rate)) + 50 * rng.normal(size=n)
    tone = {"W": 40.0, "M": 70.0, "1": 25.0, "2": 20.0, "3": 18.0, "4": 18.0, "R": 5.0}
    emg = np.array([tone[s] for s in per_second]) * (1 + 0.1 * rng.normal(size=n))
    return resp, np.clip(emg, 0, 100)


def generate_sleep_demo(
    out_dir: str | os.PathLike,
    n_subjects: int = 10,
    nights_per_subject: int = 1,
    hours: float = 2.0,
    seed: int = 0,
) -> Path:
    """Write demo Sleep Cassette nights to `out_dir` (atomically) and return it; reuse it if already complete.

    Args:
        out_dir: target directory, filled with ``SC4ssNE0-PSG.edf`` / ``SC4ssNEC-Hypnogram.edf`` pairs.
        n_subjects: subjects ``ss`` = 00, 01, ... (at most 100).
        nights_per_subject: nights ``N`` = 1, 2, ... per subject (at most 9).
        hours: recording length per night; the hypnogram covers it in whole 30-s epochs, the last 1-3 of them
            "Sleep stage ?".
        seed: generator seed; the same seed gives the same files.

    Raises:
        ValueError: `out_dir` already holds a demo made with other settings.
    """
    if not 1 <= n_subjects <= 100 or not 1 <= nights_per_subject <= 9:
        raise ConfigError(f"need 1-100 subjects and 1-9 nights; got {n_subjects} and {nights_per_subject}")
    n_epochs = int(hours * 3600 // EPOCH_S)
    if n_epochs < 60:
        raise ConfigError(f"hours={hours} gives {n_epochs} epochs; need at least 30 min (60 epochs)")
    settings = {"seed": seed, "n_subjects": n_subjects, "nights_per_subject": nights_per_subject, "hours": hours}
    return build_once(out_dir, settings, lambda tmp: _write_demo(tmp, n_subjects, nights_per_subject, n_epochs, seed))


def _write_demo(tmp: Path, n_subjects: int, nights_per_subject: int, n_epochs: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    nights = [(s, k) for s in range(n_subjects) for k in range(1, nights_per_subject + 1)]
    for subject, night in tqdm(nights, desc="Generating demo PSG", unit="night", leave=False):
        night_rng = np.random.default_rng(rng.integers(2**63))
        stages = simulate_hypnogram(n_epochs, night_rng)
        n_unscored = int(night_rng.integers(1, 4))
        stages[-n_unscored:] = ["?"] * n_unscored
        eeg = [_epoch_signals("W" if s == "?" else s, night_rng) for s in stages]
        front, back, eog = (np.concatenate([e[i] for e in eeg]) for i in range(3))
        resp, emg = _slow_channels(["W" if s == "?" else s for s in stages], night_rng)
        start = dt.datetime(1989, 4, 1 + subject % 28, 22, 0) + dt.timedelta(days=30 * (night - 1) + subject // 28)
        start += dt.timedelta(minutes=int(night_rng.integers(0, 60)))
        signals = [(label, unit, fs, lo, hi, values) for (label, (unit, fs, lo, hi)), values
                   in zip(CHANNELS.items(), (front, back, eog, resp, emg))]
        stem = f"SC4{subject:02d}{night}"
        write_edf(tmp / f"{stem}E0-PSG.edf", signals, EPOCH_S, start=start)
        runs, first = [], 0  # merge consecutive equal epochs into one annotation, as the real hypnograms do
        for i in range(1, len(stages) + 1):
            if i == len(stages) or stages[i] != stages[first]:
                runs.append((first * EPOCH_S, (i - first) * EPOCH_S, RK_LABELS[stages[first]]))
                first = i
        write_edf(tmp / f"{stem}EC-Hypnogram.edf", record_s=0, annotations=runs, start=start)
