"""Table helpers the image families share (dermatology, fundus): split names, image checks and the seeded split.

Their tables have one row per image with at least ``path``, ``line`` (the 1-based line in the source file, header =
line 1, so that errors can name the row), ``group`` (lesion/patient id, or "") and ``split`` (a given split, or "").
"""

from __future__ import annotations

import logging
import os
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image

from mmclin.errors import DataError

log = logging.getLogger(__name__)

SPLIT_ALIASES = {
    "train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"
}


def check_images(table: pd.DataFrame, source: str, on_missing: Literal["error", "skip"], verify: bool = False):
    """Drop or reject rows whose image is missing (or, with `verify`, does not decode).

    Returns the kept rows and a table of the skipped ones (``line``, ``path``, ``problem``). With
    ``on_missing='error'`` the first bad row raises a DataError such as ``ISIC.csv line 17: image 'x.jpg' not found``.
    """
    bad: list[tuple[int, str]] = []
    for i, (path, line) in enumerate(zip(table["path"], table["line"])):
        problem = None
        if not os.path.isfile(path):
            problem = f"image '{path}' not found"
        elif verify:
            try:
                with Image.open(path) as im:
                    im.verify()
            except Exception as e:  # PIL raises many types for corrupt files
                problem = f"image '{path}' cannot be decoded ({type(e).__name__}: {e})"
        if problem:
            if on_missing == "error":
                raise DataError(f"{source} line {line}: {problem} (set on_missing: skip to drop such rows)")
            bad.append((i, problem))
    if bad:
        log.warning("%s: skipped %d of %d rows with missing or unreadable images", source, len(bad), len(table))
    keep = np.ones(len(table), bool)
    keep[[i for i, _ in bad]] = False
    skipped = table.iloc[[i for i, _ in bad]][["line", "path"]].assign(problem=[p for _, p in bad])
    return table[keep].reset_index(drop=True), skipped.reset_index(drop=True)


def split_table(table: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    """Fill the ``split`` column: keep a given split, else a seeded split by group (lesion/patient) id.

    Rows that share a group always land in the same split; rows without a group are their own group.
    """
    table = table.copy()
    if table["split"].ne("").all():
        unknown = sorted(set(table["split"]) - set(SPLIT_ALIASES))
        if unknown:
            raise DataError(f"unknown split value(s) {unknown}; expected one of {sorted(SPLIT_ALIASES)}")
        table["split"] = table["split"].map(SPLIT_ALIASES)
        return table
    groups = np.where(table["group"].eq(""), "__row" + table["line"].astype(str), table["group"])
    unique = np.unique(groups)
    order = np.random.default_rng(seed).permutation(len(unique))
    n_test, n_val = round(len(unique) * test_fraction), round(len(unique) * val_fraction)
    assign = np.empty(len(unique), dtype=object)
    assign[order[:n_test]] = "test"
    assign[order[n_test:n_test + n_val]] = "val"
    assign[order[n_test + n_val:]] = "train"
    table["split"] = assign[np.searchsorted(unique, groups)]
    return table
