"""A recording's length against the length a model was trained on: refuse, crop, window or pad, never as it comes.

A model trained on 10-s ECGs takes a 2-s or a 10-min one only through an explicit policy, a datamodule setting
(``duration_policy``) that checkpoints and exports record with the rest of the preprocessing, so that
``mmclin predict`` and ``lightning predict`` apply the training run's choice:

- ``refuse`` (default): a DataError naming the record, its duration and the expected one;
- ``crop``: the expected duration taken from the start or the centre (``crop_at``) of a longer record;
- ``window``: a longer record cut into consecutive windows of the expected duration, one prediction each (rows
  carry the window's ``span_s``); when the duration is not a whole number of windows the last window ends at the
  record's end and overlaps the one before, so no sample is left out. Windows are views of the record and go
  through the model in batches, so memory stays bounded by the batch, not by the record;
- ``pad``: a shorter record zero-padded at its end (0 mV: the isoelectric line) up to the expected duration,
  when it holds at least :data:`MIN_PAD_SHARE` of it.

A record the policy does not cover (shorter than the duration under ``crop`` or ``window``, longer under ``pad``)
is refused. A record within :data:`DURATION_TOLERANCE` of the expected duration is taken as it is under every
policy (resampling and rounding move a length by a sample or two).
"""

from __future__ import annotations

import os
from typing import Literal, get_args

import numpy as np

from mmclin.errors import ConfigError, DataError

DurationPolicy = Literal["refuse", "crop", "window", "pad"]
POLICIES = get_args(DurationPolicy)
DURATION_TOLERANCE = 0.02  # of the expected duration
MIN_PAD_SHARE = 0.5  # `pad` fills at most half of the expected duration with zeros


def check_duration_settings(duration_s: float | None, policy: str, crop_at: str) -> None:
    """Raises ConfigError naming the setting when `duration_s`, `duration_policy` or `crop_at` is not valid."""
    if duration_s is not None and (isinstance(duration_s, bool) or not isinstance(duration_s, (int, float))
                                   or not np.isfinite(duration_s) or duration_s <= 0):
        raise ConfigError(f"duration_s={duration_s!r}: the records' duration in seconds (> 0), or null for any")
    if policy not in POLICIES:
        raise ConfigError(f"duration_policy={policy!r}: expected one of {list(POLICIES)}")
    if crop_at not in ("start", "centre"):
        raise ConfigError(f"crop_at={crop_at!r}: expected 'start' or 'centre'")


def fit_duration(signal: np.ndarray, fs: float, duration_s: float | None, policy: DurationPolicy, record: str,
                 crop_at: Literal["start", "centre"] = "start") -> list[tuple[float, np.ndarray]]:
    """The model inputs one record gives under `policy` (see the module docstring).

    Args:
        signal: (C, L) samples at `fs`.
        fs: sampling rate, Hz.
        duration_s: the duration the model takes, s; None takes the record as it is.
        policy: ``refuse`` | ``crop`` | ``window`` | ``pad``.
        record: the record's name, for messages.
        crop_at: where ``crop`` takes its window: ``start`` or ``centre`` of the record.

    Returns:
        ``(start_s, (C, n))`` pairs in time order; one pair except under ``window``. Crops and windows are views
        of `signal`; a padded record is a new array.

    Raises:
        DataError: a record of another duration that the policy does not cover, naming both durations.
    """
    length = signal.shape[-1]
    if duration_s is None:
        return [(0.0, signal)]
    n = round(duration_s * fs)
    if abs(length - n) <= DURATION_TOLERANCE * n:
        return [(0.0, signal)]
    have = f"{record}: {length / fs:.2f} s ({length} samples at {fs:g} Hz); the model takes {duration_s:g}-s records"
    if length > n and policy == "crop":
        start = 0 if crop_at == "start" else (length - n) // 2
        return [(start / fs, signal[..., start:start + n])]
    if length > n and policy == "window":
        starts = list(range(0, length - n + 1, n))
        if starts[-1] + n < length:
            starts.append(length - n)
        return [(s / fs, signal[..., s:s + n]) for s in starts]
    if length < n and policy == "pad":
        if length < MIN_PAD_SHARE * n:
            raise DataError(f"{have} (duration_policy 'pad' pads records of at least {MIN_PAD_SHARE * duration_s:g} s "
                            "only)")
        return [(0.0, np.pad(signal, [(0, 0)] * (signal.ndim - 1) + [(0, n - length)]))]
    if length > n:
        raise DataError(f"{have} (duration_policy {policy!r}; 'crop' or 'window' would take it)")
    if length >= MIN_PAD_SHARE * n:
        raise DataError(f"{have} (duration_policy {policy!r}; 'pad' would take it)")
    raise DataError(f"{have} (duration_policy {policy!r}; too short even for 'pad', which pads records of at least "
                    f"{MIN_PAD_SHARE * duration_s:g} s)")


class WindowedStudies:
    """Mixin for a datamodule whose ``study_items`` may give several samples of one study (the windows of a long
    record under ``duration_policy: window``): its ``study_item`` is the one sample of a study that gives one."""

    def study_item(self, path: str | os.PathLike, question: str | None = None,
                   choices: list[str] | None = None) -> dict:
        """The one sample of a study (its ``study_items``).

        Raises:
            DataError: as ``study_items``, or a record that ``window`` splits into several samples.
        """
        items = self.study_items(path, question, choices)
        if len(items) > 1:
            raise DataError(f"{path}: {len(items)} windows under duration_policy 'window'; predict them with "
                            "study_items (mmclin predict and lightning predict do)")
        return items[0]


def fit_dataset_record(signal: np.ndarray, fs: float, duration_s: float | None, policy: DurationPolicy, record: str,
                       crop_at: Literal["start", "centre"] = "start") -> np.ndarray:
    """The one model input of a dataset record (a question is asked of the whole record, so it cannot be split):
    :func:`fit_duration`'s, as its own array (a crop no longer holds the whole record in memory).

    Raises:
        DataError: as :func:`fit_duration`, or a record that `window` would split into several windows.
    """
    windows = fit_duration(signal, fs, duration_s, policy, record, crop_at)
    if len(windows) > 1:
        raise DataError(f"{record}: {signal.shape[-1] / fs:.2f} s, {len(windows)} windows of {duration_s:g} s; a "
                        "dataset record answers its questions whole, so duration_policy 'window' splits only studies "
                        "to predict ('crop' or 'pad' fit dataset records)")
    return np.ascontiguousarray(windows[0][1])
