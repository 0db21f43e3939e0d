"""ECG-QA reader: question-answer JSON over PTB-XL ECGs (Oh et al., NeurIPS 2023 Datasets and Benchmarks).

Published layout (github.com/Jwoo5/ecg-qa, v1.0.2)::

    ecgqa/ptbxl/answers_for_each_template.csv   template_id, classes ("['no', 'yes']": the template's answer set)
    ecgqa/ptbxl/{paraphrased,template}/{train,valid,test}/00000.json, 20000.json, ...

Each JSON file is a list of entries with the fields ``template_id``, ``question_id`` (shared by the paraphrases
and samples of one filled-in template question), ``sample_id`` (unique within a split), ``question_type``
(``single-verify|choose|query``, ``comparison_consecutive-verify|query``, ``comparison_irrelevant-verify|query``),
``attribute_type``, ``question``, ``answer`` (list of strings), ``ecg_id`` (one PTB-XL id, two for comparisons)
and ``attribute`` (list, None for comparisons). The 1.0.0 layout with one ``train.json`` per split is read too.
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import pandas as pd

from mmclin.errors import ConfigError, DataError

QUESTION_TYPES = (
    "single-verify", "single-choose", "single-query",
    "comparison_consecutive-verify", "comparison_consecutive-query",
    "comparison_irrelevant-verify", "comparison_irrelevant-query",
)
ENTRY_FIELDS = ("template_id", "question_id", "sample_id", "question_type", "attribute_type", "question", "answer",
                "ecg_id", "attribute")
# ECG-QA split folder -> our split name (as `read_ptbxl_database` names PTB-XL's folds).
ECGQA_SPLITS = {"train": "train", "valid": "val", "test": "test"}
ANSWERS_FILE = "answers_for_each_template.csv"
_VERIFY_DEFAULT = ["yes", "no", "not sure"]  # ECG-QA's verify answers when no answer file is at hand


def read_answer_sets(path: str | os.PathLike) -> dict[int, list[str]]:
    """Read ``answers_for_each_template.csv``: ``{template_id: answer set}``.

    Raises:
        DataError: missing file or column, or a ``classes`` cell that is not a list literal of strings.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: answer-set CSV not found")
    table = pd.read_csv(path)
    missing = [c for c in ("template_id", "classes") if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the file has {list(table.columns)}")
    sets = {}
    for line, (template_id, text) in enumerate(zip(table["template_id"], table["classes"]), 2):
        try:
            classes = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            classes = None
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise DataError(f"{path} line {line} (template_id {template_id}): classes {text!r} is not a list "
                            "literal of strings like \"['no', 'yes']\"")
        sets[int(template_id)] = classes
    return sets


def read_ecg_qa(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    database: pd.DataFrame | None = None,
    answer_sets: str | os.PathLike | dict[int, list[str]] | None = None,
    version: Literal["paraphrased", "template"] = "paraphrased",
    on_missing: Literal["error", "skip"] = "error",
) -> pd.DataFrame:
    """Read ECG-QA questions into one table, one row per sample.

    Args:
        source: the dataset directory (``ecgqa/ptbxl``, or its ``paraphrased``/``template`` folder, or one split
            folder), or a list of JSON files. A file's split is its folder name (``train|valid|test``) or, in the
            1.0.0 layout, its stem.
        database: PTB-XL table (``read_ptbxl_database``: indexed by ``ecg_id``, or with an ``ecg_id`` column);
            every question's ECGs must be in it. None skips the check.
        answer_sets: ``{template_id: answers}`` or the path of ``answers_for_each_template.csv``. None looks for
            that file beside the split folders (``ecgqa/ptbxl``); without it, verify answers are checked against
            yes/no/not sure, choose answers against the options named plus "none", and a query template's answer
            set is the answers its questions have in `source` (nothing to check against).
        version: which folder to read when `source` is ``ecgqa/ptbxl``.
        on_missing: a question naming an ECG absent from `database`: "error" raises, "skip" drops the row.

    Returns:
        Columns ``split`` (train|val|test), ``sample_id``, ``question_id``, ``template_id``, ``question_type``,
        ``attribute_type``, ``question``, ``answer`` (list[str]), ``ecg_ids`` (list[int]), ``attribute`` (list or
        None), ``choices`` (list[str]: the template's answer set; for single-choose the two options named in
        ``attribute``, plus "none" where the template allows it). ``attrs["n_skipped_missing_ecg"]`` counts rows
        dropped by ``on_missing="skip"``.

    Raises:
        DataError: unreadable JSON, an entry missing a field or with an unknown question_type or wrong number of
            ecg_ids, an answer outside its answer set, an ecg_id absent from `database` (unless skipped), a
            template absent from the answer sets. Messages name the file, sample_id, question_id and template_id.
    """
    if on_missing not in ("error", "skip") or version not in ("paraphrased", "template"):
        raise ConfigError(f"on_missing must be 'error'|'skip' and version 'paraphrased'|'template', got "
                         f"{on_missing!r}, {version!r}")
    files = _json_files(source, version)
    if isinstance(answer_sets, (str, os.PathLike)):
        answer_sets = read_answer_sets(answer_sets)
    elif answer_sets is None:
        found = _find_answer_file(files)
        answer_sets = read_answer_sets(found) if found else None
    known_ecgs = None
    if database is not None:
        known_ecgs = set(database["ecg_id"] if "ecg_id" in database.columns else database.index)
    rows, n_skipped = [], 0
    for path, split in files:
        for entry in _load_entries(path):
            row = _parse_entry(entry, path, split, answer_sets)
            absent = [e for e in row["ecg_ids"] if known_ecgs is not None and e not in known_ecgs]
            if absent and on_missing == "error":
                raise DataError(f"{_where(path, entry)}: ecg_id {absent[0] if len(absent) == 1 else absent} not in "
                                f"the PTB-XL database ({len(known_ecgs)} records); expected an ecg_id of "
                                "ptbxl_database.csv (or on_missing='skip')")
            if absent:
                n_skipped += 1
                continue
            rows.append(row)
    # Without an answer file, a query template's answer set is the answers its questions have in `source`.
    seen: dict[int, set[str]] = {}
    for row in rows:
        if row["choices"] is None:
            seen.setdefault(row["template_id"], set()).update(row["answer"])
    for row in rows:
        if row["choices"] is None:
            row["choices"] = sorted(seen[row["template_id"]])
    table = pd.DataFrame(rows, columns=["split", "sample_id", "question_id", "template_id", "question_type",
                                        "attribute_type", "question", "answer", "ecg_ids", "attribute", "choices"])
    table.attrs["n_skipped_missing_ecg"] = n_skipped
    return table


def _json_files(source: str | os.PathLike | Sequence[str | os.PathLike], version: str) -> list[tuple[Path, str]]:
    """(file, split) pairs in reading order."""
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if root.is_file():
            paths = [root]
        elif root.is_dir():
            base = root / version if (root / version).is_dir() else root
            paths = sorted((p for p in base.rglob("*.json") if base in (p.parent, p.parent.parent)),
                           key=lambda p: (str(p.parent), int(p.stem) if p.stem.isdigit() else -1, p.stem))
            if not paths:
                raise DataError(f"{root}: no ECG-QA JSON files under {base} (expected {{train,valid,test}}/*.json)")
        else:
            raise DataError(f"{root}: ECG-QA directory or JSON file not found")
    else:
        paths = [Path(p) for p in source]
        if not paths:
            raise ConfigError("source is an empty list of JSON files")
    out = []
    for path in paths:
        split = next((ECGQA_SPLITS[n] for n in (path.parent.name, path.stem) if n in ECGQA_SPLITS), None)
        if split is None:
            raise DataError(f"{path}: cannot tell the split; expected the file in a train/valid/test folder "
                            "(or named train.json/valid.json/test.json)")
        out.append((path, split))
    return out


def _find_answer_file(files: list[tuple[Path, str]]) -> Path | None:
    """``answers_for_each_template.csv`` in a folder above the first split folder (ECG-QA: ``ecgqa/ptbxl``)."""
    for parent in list(files[0][0].parents)[:4]:
        if (parent / ANSWERS_FILE).is_file():
            return parent / ANSWERS_FILE
    return None


def _load_entries(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: ECG-QA JSON file not found")
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of question entries, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(f"{path} entry {i}: expected an object with fields {list(ENTRY_FIELDS)}")
        missing = [k for k in ENTRY_FIELDS if k not in entry]
        if missing:
            raise DataError(f"{path} entry {i} (sample_id {entry.get('sample_id')}): missing field(s) {missing}")
    return entries


def _where(path: Path, entry: dict) -> str:
    return (f"{path} sample_id {entry['sample_id']} (question_id {entry['question_id']}, "
            f"template_id {entry['template_id']})")


def _parse_entry(entry: dict, path: Path, split: str, answer_sets: dict[int, list[str]] | None) -> dict:
    where = _where(path, entry)
    qtype, ecg_ids, answer = entry["question_type"], entry["ecg_id"], entry["answer"]
    if qtype not in QUESTION_TYPES:
        raise DataError(f"{where}: question_type {qtype!r}; expected one of {list(QUESTION_TYPES)}")
    n_ecgs = 1 if qtype.startswith("single") else 2
    if not (isinstance(ecg_ids, list) and len(ecg_ids) == n_ecgs and all(isinstance(e, int) for e in ecg_ids)):
        raise DataError(f"{where}: ecg_id {ecg_ids!r}; a {qtype} question takes a list of {n_ecgs} integer ecg_id(s)")
    if not (isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer)):
        raise DataError(f"{where}: answer {answer!r}; expected a non-empty list of strings")
    template_id = int(entry["template_id"])
    if answer_sets is not None and template_id not in answer_sets:
        raise DataError(f"{where}: template_id {template_id} has no answer set in {ANSWERS_FILE}")
    allowed = answer_sets[template_id] if answer_sets is not None else None
    choices = _choices(qtype, entry["attribute"], allowed)
    for admitted, what in ((allowed, "the template's answer set"), (choices, "the choices")):
        outside = [a for a in answer if admitted is not None and a not in admitted]
        if outside:
            raise DataError(f"{where}: answer {outside} not in {what} {admitted}")
    return {"split": split, "sample_id": entry["sample_id"], "question_id": entry["question_id"],
            "template_id": template_id, "question_type": qtype, "attribute_type": entry["attribute_type"],
            "question": entry["question"], "answer": list(answer), "ecg_ids": list(ecg_ids),
            "attribute": entry["attribute"], "choices": choices}


def _choices(qtype: str, attribute: list | None, allowed: list[str] | None) -> list[str] | None:
    """The answers a question admits; None when unknown (a query without an answer file)."""
    if qtype == "single-choose" and isinstance(attribute, list) and len(attribute) == 2:
        # "Which ..., A or B?": A, B (both when both are present), or "none" where the template allows it.
        extra = ["none"] if allowed is None or "none" in allowed else []
        return [str(a) for a in attribute] + extra
    if allowed is not None:
        return list(allowed)
    return list(_VERIFY_DEFAULT) if qtype.endswith("verify") else None
