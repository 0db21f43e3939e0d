"""Radiology report readers for the layouts the datasets ship in; each returns `Report` records.

- IU-Xray (Open-i chest X-ray collection, Demner-Fushman et al., JAMIA 2016) as redistributed on Kaggle:
  ``indiana_reports.csv`` (uid, MeSH, Problems, image, indication, comparison, findings, impression) and
  ``indiana_projections.csv`` (uid, filename, projection); images under ``images/images_normalized/``.
- R2Gen's ``annotation.json`` (Chen et al., EMNLP 2020): ``{"train"|"val"|"test": [{id, report, image_path,
  split}]}`` for its IU-Xray and MIMIC-CXR releases. Its reports carry no headers and are taken as findings.
- MIMIC-CXR free-text reports (Johnson et al., Sci Data 2019): ``files/pXX/p<subject>/s<study>.txt`` with
  ``FINDINGS:`` / ``IMPRESSION:`` headers, and ``mimic-cxr-2.0.0-split.csv(.gz)`` (dicom_id, study_id,
  subject_id, split), whose ``validate`` split is called ``val`` here. Images are
  ``files/pXX/p<subject>/s<study>/<dicom_id>.jpg`` (MIMIC-CXR-JPG) or ``.dcm`` (MIMIC-CXR).

Bad input raises `DataError` naming the file, row and id. File-level faults (missing file or column, a JSON
that is not R2Gen's) always raise; a report-level fault (empty report, no findings and no impression, bytes
that are not UTF-8, an image that is not under the image root, a study missing from the split CSV) raises
with ``on_error="raise"`` or, with ``on_error="skip"``, is left out and listed in ``ReadResult.skipped``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from mmclin.errors import ConfigError, DataError
from mmclin.reports.sections import Report, compose_report, parse_sections

log = logging.getLogger(__name__)

IU_REPORT_COLUMNS = ("uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression")
IU_PROJECTION_COLUMNS = ("uid", "filename", "projection")
MIMIC_SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
MIMIC_SPLITS = {"train": "train", "validate": "val", "test": "test"}
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by errors="surrogateescape"


@dataclass
class ReadResult:
    """Reports read, and the ones left out with ``on_error="skip"`` as (where, why). Iterates over reports."""

    reports: list[Report] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __iter__(self) -> Iterator[Report]:
        return iter(self.reports)

    def __len__(self) -> int:
        return len(self.reports)

    def __getitem__(self, i: int) -> Report:
        return self.reports[i]


# How the caller's user says "skip bad reports"; a datamodule passes its own option's spelling.
SKIP_HINT = "--on-error skip / on_error='skip'"


class _Collector:
    """Collects reports; a report-level fault raises or is recorded as skipped."""

    def __init__(self, source: Path, on_error: str, skip_hint: str = SKIP_HINT):
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.source, self.on_error, self.skip_hint, self.result = source, on_error, skip_hint, ReadResult()

    def fault(self, where: str, why: str) -> None:
        if self.on_error == "raise":
            raise DataError(f"{where}: {why} ({self.skip_hint} leaves such reports out, counted)")
        self.result.skipped.append((where, why))

    def done(self) -> ReadResult:
        if self.result.skipped:
            log.warning("%s: skipped %d report(s), kept %d; first: %s", self.source, len(self.result.skipped),
                        len(self.result.reports), "; ".join(f"{w}: {y}" for w, y in self.result.skipped[:3]))
        return self.result


def _read_text(path: Path) -> str:
    """Text decoded as UTF-8 with undecodable bytes kept as surrogates, so a bad row can be named, not guessed."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return path.read_bytes().decode("utf-8", errors="surrogateescape")


def _bad_bytes(value: str) -> str | None:
    m = _UNDECODABLE.search(value)
    return None if m is None else f"byte 0x{ord(m.group()) - 0xDC00:02x} at character {m.start()} is not UTF-8"


def _read_csv(path: Path, required: tuple[str, ...], keep_bad_bytes: bool = False) -> pd.DataFrame:
    """A CSV as strings. With `keep_bad_bytes`, bytes that are not UTF-8 stay in their cells as surrogates (the
    row can then be named); otherwise they fail the file (the MIMIC split CSV is ASCII ids, and large)."""
    if not path.is_file():
        raise DataError(f"{path}: CSV file not found")
    try:
        if keep_bad_bytes:  # the C parser cannot take surrogates
            frame = pd.read_csv(io.StringIO(_read_text(path)), dtype=str, keep_default_na=False, engine="python")
        else:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 ({err})") from err
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataError(f"{path}: not a readable CSV ({err})") from err
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the file has {list(frame.columns)}, expected "
                        f"{list(required)}")
    return frame


def _images(names: list[str], image_root: Path | None) -> tuple[list[str], str | None]:
    if image_root is None:
        return names, None
    paths = [image_root / n for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    return [str(p) for p in paths], (f"image(s) {missing} not found" if missing else None)


def _checked(sections: dict[str, str | None]) -> str | None:
    """Why the sections do not make a report, or None."""
    if not sections["findings"] and not sections["impression"]:
        return "no findings and no impression"
    return None


def read_iu_xray(reports_csv: str | os.PathLike, projections_csv: str | os.PathLike | None = None,
                 image_root: str | os.PathLike | None = None,
                 on_error: Literal["raise", "skip"] = "raise", skip_hint: str = SKIP_HINT) -> ReadResult:
    """IU-Xray reports from ``indiana_reports.csv`` with their images from ``indiana_projections.csv``.

    Args:
        reports_csv: ``indiana_reports.csv``.
        projections_csv: ``indiana_projections.csv``; default: beside the reports CSV when it is there.
        image_root: folder of the PNGs (``images/images_normalized``); given, every image must exist there.
        on_error: a bad report raises ``DataError`` ("raise") or is left out and listed ("skip").
        skip_hint: the option that skips bad reports, as the caller's user spells it (named in the error).

    Returns:
        Reports in CSV order with id = uid, text = the sections under their headers (`compose_report`),
        images = filenames (frontal first, as the projections CSV lists them), split None (IU has none).
    """
    reports_csv = Path(reports_csv)
    table = _read_csv(reports_csv, IU_REPORT_COLUMNS, keep_bad_bytes=True)
    if projections_csv is None and (reports_csv.parent / "indiana_projections.csv").is_file():
        projections_csv = reports_csv.parent / "indiana_projections.csv"
    images: dict[str, list[str]] = {}
    if projections_csv is not None:
        projections = _read_csv(Path(projections_csv), IU_PROJECTION_COLUMNS, keep_bad_bytes=True)
        for row in projections.itertuples():
            images.setdefault(row.uid.strip(), []).append(row.filename.strip())
    out = _Collector(reports_csv, on_error, skip_hint)
    seen = set()
    for i, row in enumerate(table.to_dict("records"), start=1):
        uid = row["uid"].strip()
        where = f"{reports_csv} row {i} (uid {uid or '?'})"
        if not uid:
            out.fault(where, "empty uid")
            continue
        if uid in seen:
            out.fault(where, f"uid {uid} appears twice (the first row is kept)")
            continue
        seen.add(uid)
        bad = next((f"column {c}: {b}" for c in IU_REPORT_COLUMNS if (b := _bad_bytes(row[c]))), None)
        if bad:
            out.fault(where, bad)
            continue
        sections = {name: " ".join(row[name].split()) or None
                    for name in ("indication", "comparison", "findings", "impression")}
        problem = _checked(sections)
        paths, missing = _images(images.get(uid, []), Path(image_root) if image_root else None)
        if problem or missing:
            out.fault(where, problem or missing)
            continue
        mesh = [t.strip() for t in row["MeSH"].split(";") if t.strip()]
        out.result.reports.append(Report(id=uid, text=compose_report(sections), sections=sections, images=paths,
                                         split=None, source=where, mesh=mesh))
    return out.done()


def read_r2gen(annotation_json: str | os.PathLike, image_root: str | os.PathLike | None = None,
               on_error: Literal["raise", "skip"] = "raise") -> ReadResult:
    """Reports of R2Gen's ``annotation.json`` (IU-Xray or MIMIC-CXR release).

    Args:
        annotation_json: the file.
        image_root: R2Gen's ``image_dir`` (``images/`` for IU, ``files/`` for MIMIC); given, every
            ``image_path`` must exist under it.
        on_error: a bad entry raises ``DataError`` ("raise") or is left out and listed ("skip").

    Returns:
        Reports in file order (split by split) with the split of the key they are listed under.
    """
    path = Path(annotation_json)
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not JSON ({err})") from err
    if not isinstance(data, dict) or not data or not set(data) <= {"train", "val", "test"} or not all(
            isinstance(v, list) for v in data.values()):
        keys = list(data) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: expected R2Gen's {{'train'|'val'|'test': [entries]}}, got {keys}")
    out = _Collector(path, on_error)
    for split, entries in data.items():
        for i, entry in enumerate(entries):
            where = f"{path} [{split}][{i}]"
            if not isinstance(entry, dict) or "id" not in entry or "report" not in entry:
                out.fault(where, "entry without 'id' and 'report'")
                continue
            where += f" (id {entry['id']})"
            report = entry["report"] if isinstance(entry["report"], str) else ""
            image_names = entry.get("image_path", [])
            if entry.get("split", split) != split:
                out.fault(where, f"split {entry['split']!r} listed under {split!r}")
                continue
            bad = _bad_bytes(report)
            if bad or not report.strip():
                out.fault(where, bad or "empty report")
                continue
            sections = parse_sections(report, headerless="findings")
            problem = _checked(sections)
            paths, missing = _images([str(n) for n in image_names], Path(image_root) if image_root else None)
            if problem or missing:
                out.fault(where, problem or missing)
                continue
            out.result.reports.append(Report(id=str(entry["id"]), text=report.strip(), sections=sections,
                                             images=paths, split=split, source=where))
    return out.done()


def read_mimic_reports(root: str | os.PathLike, split_csv: str | os.PathLike | None = None,
                       image_root: str | os.PathLike | None = None, image_ext: str = ".jpg",
                       on_error: Literal["raise", "skip"] = "raise") -> ReadResult:
    """MIMIC-CXR reports from ``root/files/pXX/p<subject>/s<study>.txt``.

    Args:
        root: folder holding ``files/`` (``mimic-cxr-reports``).
        split_csv: ``mimic-cxr-2.0.0-split.csv(.gz)``; default: in `root` when it is there. Given, each study
            takes its split and its images (dicom ids) from it, and a study missing from it is a fault.
        image_root: folder holding the image ``files/`` tree; given, every image must exist there.
        image_ext: ``.jpg`` (MIMIC-CXR-JPG) or ``.dcm`` (MIMIC-CXR).
        on_error: a bad report raises ``DataError`` ("raise") or is left out and listed ("skip").

    Returns:
        Reports sorted by path, id = the study ("s50414267"), text = the file verbatim (stripped).
    """
    root = Path(root)
    files = sorted((root / "files").glob("p*/p*/s*.txt"))
    if not files:
        raise DataError(f"{root}: no reports files/pXX/p<subject>/s<study>.txt found")
    if split_csv is None:
        split_csv = next((root / n for n in ("mimic-cxr-2.0.0-split.csv", "mimic-cxr-2.0.0-split.csv.gz")
                          if (root / n).is_file()), None)
    studies: dict[str, dict] = {}
    if split_csv is not None:
        table = _read_csv(Path(split_csv), MIMIC_SPLIT_COLUMNS)
        for i, row in enumerate(table.itertuples(), start=1):
            split = MIMIC_SPLITS.get(row.split.strip())
            if split is None:
                raise DataError(f"{split_csv} row {i} (study {row.study_id}): split {row.split!r}; expected one of "
                                f"{list(MIMIC_SPLITS)}")
            study = studies.setdefault(row.study_id.strip(), {"subject": row.subject_id.strip(), "split": split,
                                                              "dicoms": []})
            if study["split"] != split or study["subject"] != row.subject_id.strip():
                raise DataError(f"{split_csv} row {i} (study {row.study_id}): subject/split disagree with an earlier "
                                f"row of the same study")
            study["dicoms"].append(row.dicom_id.strip())
    out = _Collector(root, on_error)
    for path in files:
        where, study_id, subject_id = str(path), path.stem[1:], path.parent.name[1:]
        text = _read_text(path)
        bad = _bad_bytes(text)
        if bad or not text.strip():
            out.fault(where, bad or "empty report")
            continue
        sections = parse_sections(text, headerless=None)
        problem = _checked(sections)
        if problem:
            out.fault(where, f"{problem} (no FINDINGS: or IMPRESSION: header)")
            continue
        split, names = None, []
        if split_csv is not None:
            study = studies.get(study_id)
            if study is None:
                out.fault(where, f"study {study_id} is not in {split_csv}")
                continue
            if study["subject"] != subject_id:
                out.fault(where, f"study {study_id} belongs to subject {study['subject']} in {split_csv}")
                continue
            split = study["split"]
            names = [f"files/{path.parent.parent.name}/p{subject_id}/s{study_id}/{d}{image_ext}"
                     for d in study["dicoms"]]
        paths, missing = _images(names, Path(image_root) if image_root else None)
        if missing:
            out.fault(where, missing)
            continue
        out.result.reports.append(Report(id=path.stem, text=text.strip(), sections=sections, images=paths,
                                         split=split, source=where))
    return out.done()


FORMATS = ("iu-csv", "r2gen", "mimic")


def content_key(sections: dict[str, str | None]) -> str:
    """A report's findings + impression, lower-cased with punctuation and white space folded: templated normal
    reports (IU-Xray has many word-for-word copies) share one key."""
    text = " | ".join(sections.get(name) or "" for name in ("findings", "impression"))
    return " ".join(re.sub(r"[^\w|]+", " ", text.lower()).split())


def split_studies(ids: list[str], val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0,
                  groups: list[str] | None = None) -> dict[str, str]:
    """Study id -> train / val / test: a seeded permutation of the sorted distinct groups, cut by the fractions.

    Args:
        ids: study ids.
        val_fraction: share of the studies in validation.
        test_fraction: share of the studies in test.
        seed: permutation seed.
        groups: one key per id (e.g. :func:`content_key`): studies of one key stay on one side, so a report
            identical to a training report is never tested. Default: every study its own group.
    """
    groups = list(ids) if groups is None else list(groups)
    if len(groups) != len(ids):
        raise ConfigError(f"split_studies: {len(ids)} ids but {len(groups)} group keys")
    members: dict[str, set[str]] = {}
    for sid, key in zip(ids, groups):
        members.setdefault(key, set()).add(sid)
    keys = sorted(members)
    order = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    n = len({*ids})
    n_test, n_val = round(test_fraction * n), round(val_fraction * n)
    split_of, taken = {}, 0
    for key in order:  # fill test, then val, with whole groups; the rest trains
        split = "test" if taken < n_test else "val" if taken < n_test + n_val else "train"
        for sid in members[key]:
            split_of[sid] = split
        taken += len(members[key])
    return split_of


def duplicate_groups(keys: list[str]) -> dict[str, int]:
    """``{"n_groups", "n_reports"}``: groups of two or more reports with the same key, and the reports in them."""
    counts = [c for c in pd.Series(keys, dtype=object).value_counts().tolist() if c > 1]
    return {"n_groups": len(counts), "n_reports": int(sum(counts))}


def read_reports(path: str | os.PathLike, format: Literal["iu-csv", "r2gen", "mimic"],
                 image_root: str | os.PathLike | None = None, on_error: Literal["raise", "skip"] = "raise",
                 split: str | None = None) -> ReadResult:
    """Any of the three layouts by name; `path` may be the file or its folder.

    Args:
        path: ``indiana_reports.csv`` or its folder; ``annotation.json`` or its folder; the MIMIC reports root.
        format: "iu-csv", "r2gen" or "mimic".
        image_root: see the readers; given, images must exist.
        on_error: "raise" or "skip".
        split: keep only reports of this split (train / val / test). A corpus without splits (IU-Xray) is split
            by study with :func:`split_studies` and its defaults, identical reports kept together
            (:func:`content_key`), as ``ReportErrorDataModule`` does with its own.
    """
    path = Path(path)
    if format == "iu-csv":
        result = read_iu_xray(path / "indiana_reports.csv" if path.is_dir() else path, image_root=image_root,
                              on_error=on_error)
    elif format == "r2gen":
        result = read_r2gen(path / "annotation.json" if path.is_dir() else path, image_root=image_root,
                            on_error=on_error)
    elif format == "mimic":
        result = read_mimic_reports(path, image_root=image_root, on_error=on_error)
    else:
        raise ConfigError(f"unknown report format {format!r}; choose one of {list(FORMATS)}")
    if split is not None:
        if all(r.split is None for r in result.reports):
            split_of = split_studies([r.id for r in result.reports],
                                     groups=[content_key(r.sections) for r in result.reports])
            result.reports = [r for r in result.reports if split_of[r.id] == split]
        else:
            result.reports = [r for r in result.reports if r.split == split]
    return result
