"""Multiple-choice CT questions (DeepTumorVQA-style) from CT volumes and their TotalSegmentator label masks.

Writes one JSON record per line (see ``datamodules.ct_questions``; ``image_path`` and ``mask_path`` are
relative to the output file's folder when the files lie below it, absolute otherwise) and prints the number of
questions per category and subtype, and every organ that was not measured with the reason. Masks carry
TotalSegmentator v2 ``total`` label ids (``TotalSegmentator -i ct.nii.gz -o seg.nii.gz --ml``); lesions are
extra label ids given with ``--lesion-label ID:ORGAN``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from datamodules.ct_questions import DEFAULT_ORGANS, QUESTION_TYPES, TOTALSEGMENTATOR_LABELS, questions_from_files
from mmclin.errors import DataError, run_entry_point

log = logging.getLogger(__name__)

EPILOG = """examples:
  # the TotalSegmentator test case in ../shared/data (a 30-slice crop: organs are cut by the scan's edge)
  python tools/ct_vqa_from_masks.py --ct ../shared/data/ct_totalsegmentator_example/example_ct_sm.nii.gz \\
      --mask ../shared/data/ct_totalsegmentator_example/example_seg.nii.gz \\
      --organs liver spleen kidney_right kidney_left gallbladder pancreas urinary_bladder --out example.jsonl
  # every volume of a folder, masks of the same file name in another folder; demo lesion ids
  python tools/ct_vqa_from_masks.py --ct-dir DEMO/volumes --mask-dir DEMO/masks --out DEMO/all.jsonl \\
      --lesion-label 201:liver 202:spleen 203:kidney_right 204:kidney_left
"""


def _lesion_label(text: str) -> tuple[int, str]:
    label, _, organ = text.partition(":")
    if not label.isdigit() or organ not in TOTALSEGMENTATOR_LABELS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL_ID:ORGAN with a TotalSegmentator organ name, "
                                         "e.g. 23:kidney_left")
    return int(label), organ


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ct", help="CT volume (NIfTI, HU)")
    p.add_argument("--mask", help="label mask on the CT's grid (NIfTI, TotalSegmentator v2 ids)")
    p.add_argument("--ct-dir", help="folder of CT volumes *.nii.gz / *.nii (instead of --ct)")
    p.add_argument("--mask-dir", help="folder of masks named as their CT (with --ct-dir)")
    p.add_argument("--organs", nargs="+", default=list(DEFAULT_ORGANS), choices=sorted(TOTALSEGMENTATOR_LABELS),
                   metavar="ORGAN", help=f"TotalSegmentator organ names (default: {' '.join(DEFAULT_ORGANS)})")
    p.add_argument("--lesion-label", nargs="+", type=_lesion_label, default=[], metavar="ID:ORGAN",
                   help="lesion label ids and their host organs, e.g. 23:kidney_left 24:kidney_right")
    p.add_argument("--min-voxels", type=int, default=10, help="fewer voxels and an organ is not measured")
    p.add_argument("--on-missing", choices=["error", "skip"], default="error",
                   help="a CT in --ct-dir without a mask: stop, or skip it and count it")
    p.add_argument("--no-check-hu", dest="check_hu", action="store_false",
                   help="accept a CT without negative values (by default refused as not in Hounsfield units: "
                        "an 8-bit export would give wrong attenuation answers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output JSONL file")
    args = p.parse_args(argv)
    if bool(args.ct) + bool(args.ct_dir) != 1 or bool(args.ct) != bool(args.mask) or bool(args.ct_dir) != bool(
            args.mask_dir):
        p.error("give either --ct and --mask, or --ct-dir and --mask-dir")
    return args


def _pairs(ct_dir: Path, mask_dir: Path, on_missing: str) -> tuple[list[tuple[Path, Path]], int]:
    cts = sorted(p for p in ct_dir.iterdir() if p.name.endswith((".nii.gz", ".nii")))
    if not cts:
        raise DataError(f"{ct_dir}: no .nii.gz or .nii files")
    pairs, missing = [], 0
    for ct in cts:
        mask = mask_dir / ct.name
        if mask.is_file():
            pairs.append((ct, mask))
        elif on_missing == "skip":
            missing += 1
            log.warning("%s: no mask %s; skipped", ct, mask)
        else:
            raise DataError(f"{ct}: no mask {mask} (use --on-missing skip to skip such volumes)")
    return pairs, missing


def summary_table(records: list[dict]) -> str:
    """Questions per category and subtype, as text."""
    by_type = Counter(r["question_type"] for r in records)
    by_subtype = Counter((r["question_type"], r["question_subtype"]) for r in records)
    lines = [f"{'category':<20} {'subtype':<28} {'questions':>9}"]
    for qtype in QUESTION_TYPES:
        lines.append(f"{qtype:<20} {'(all)':<28} {by_type.get(qtype, 0):>9}")
        lines += [f"{'':<20} {subtype:<28} {n:>9}" for (t, subtype), n in sorted(by_subtype.items()) if t == qtype]
    letters = Counter(r["answer_letter"] for r in records)
    lines.append(f"{'total':<20} {'':<28} {len(records):>9}   answer letters "
                 + " ".join(f"{k}:{letters.get(k, 0)}" for k in "ABCD"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.ct:
        pairs, missing = [(Path(args.ct), Path(args.mask))], 0
    else:
        pairs, missing = _pairs(Path(args.ct_dir), Path(args.mask_dir), args.on_missing)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    records = []
    for ct, mask in pairs:
        found, notes = questions_from_files(ct, mask, relative_to=out.parent, organs=args.organs,
                                            lesion_labels=dict(args.lesion_label), min_voxels=args.min_voxels,
                                            seed=rng, check_hu=args.check_hu)
        records += found
        for note in notes:
            print(f"{ct.name}: {note}")
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    print(summary_table(records))
    print(f"{len(records)} questions on {len(pairs)} volume(s) -> {out}"
          + (f"; {missing} volume(s) without a mask skipped" if missing else ""))
    return records


if __name__ == "__main__":
    run_entry_point(main)
