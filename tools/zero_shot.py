"""Zero-shot classification of any image CSV with a CLIP checkpoint of ours or an open_clip directory.

Writes ``metrics.json`` (accuracy, balanced_accuracy, macro_auroc, per_class, n), ``confusion_matrix.png``
and ``predictions.csv`` (one row per image) to ``--out``.

Examples:
    # the demo test split, with the checkpoint of `lightning fit -c configs/derm-clip.yaml`
    python tools/zero_shot.py --model runs/derm-clip/lightning_logs/version_0/checkpoints/last.ckpt --out zs-demo
    # ISIC 2019 ground-truth rows (images that are missing are skipped and counted)
    python tools/zero_shot.py --model CKPT --root ../shared/data/derm_isic_sample --format isic \
        --csv ISIC_2019_Training_GroundTruth_rows.csv --image-dir full_res --on-missing skip --out zs-isic
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from datamodules.derm import DermDataModule, ImageTextDataset
from mmclin.errors import DataError, run_entry_point
from mmclin.models.clip import load_clip
from mmclin.plots import plot_confusion_matrix
from mmclin.tasks.zero_shot import classification_metrics, resolve_templates, zero_shot_classifier


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="our .ckpt or an open_clip directory (open_clip_config.json)")
    p.add_argument("--root", default=None, help="dataset directory; unset = the generated demo dataset")
    p.add_argument("--format", choices=["csv", "derm1m", "isic"], default="derm1m")
    p.add_argument("--csv", default=None, help="CSV relative to --root (default per format)")
    p.add_argument("--image-dir", default="", help="image sub-directory of --root")
    p.add_argument("--metadata-csv", default=None, help="ISIC metadata CSV (lesion ids), relative to --root")
    p.add_argument("--image-key", default="filepath", help="image column (format csv)")
    p.add_argument("--label-key", default=None, help="label column (format csv/derm1m)")
    p.add_argument("--caption-key", default=None, help="caption column (format csv; any text column will do)")
    p.add_argument("--class-map", default=None, help="JSON file mapping label values to class names for prompts")
    p.add_argument("--classes", nargs="+", default=None,
                   help="class names to choose among (default: the model's classes plus any label found)")
    p.add_argument("--templates", default=None, help="template set name (derm, plain, photo) or a text file, "
                   "one template with {} per line (default: the model's)")
    p.add_argument("--split", choices=["all", "train", "val", "test"], default=None,
                   help="rows to score (default: test for the demo, all otherwise)")
    p.add_argument("--on-missing", choices=["error", "skip"], default="error")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--precision", choices=["32", "bf16"], default="32")
    p.add_argument("--out", required=True, help="output directory")
    return p.parse_args(argv)


def _templates(arg: str | None, default) -> list[str]:
    if arg is None:
        return resolve_templates(default)
    path = Path(arg)
    if path.is_file():
        return resolve_templates([t.strip() for t in path.read_text().splitlines() if t.strip()])
    return resolve_templates(arg)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    model = load_clip(args.model)
    data = DermDataModule(root=args.root, format=args.format, csv=args.csv, image_dir=args.image_dir,
                          metadata_csv=args.metadata_csv, image_key=args.image_key, caption_key=args.caption_key,
                          label_key=args.label_key, on_missing=args.on_missing)
    table = data.read_table()
    split = args.split or ("test" if args.root is None else "all")
    if split != "all":
        table = table[table["split"] == split]
    if args.class_map:
        mapping = json.loads(Path(args.class_map).read_text())
        table = table.assign(label=table["label"].map(lambda x: mapping.get(x, x)))
    table = table[table["label"].ne("")]
    if table.empty:
        raise DataError(f"{data.csv_path}: no labelled rows to score in split '{split}'")
    classnames = args.classes or list(model.hparams.classnames or [])
    classnames += sorted(set(table["label"]) - set(classnames))
    unknown = sorted(set(table["label"]) - set(classnames))
    if unknown:
        raise DataError(f"labels {unknown} are not among --classes {classnames}")
    templates = _templates(args.templates, model.hparams.templates)

    _, eval_tf, tokenizer = model.image_text_preprocess()
    dataset = ImageTextDataset(table, classnames, eval_tf, None, str(data.csv_path))
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        classifier = zero_shot_classifier(model.model, tokenizer, classnames, templates).float()
        features, labels = [], []
        for batch in tqdm(loader, desc="zero-shot", unit="batch"):
            image, _ = model.encode(batch["image"])
            features.append(image.float())
            labels.append(batch["label"])
    scores = torch.cat(features) @ classifier
    labels = torch.cat(labels)
    metrics = classification_metrics(scores, labels, classnames)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    probs = (scores * 100).softmax(-1)
    predictions = pd.DataFrame({"path": table["path"].to_numpy(), "line": table["line"].to_numpy(),
                                "label": table["label"].to_numpy(),
                                "predicted": [classnames[i] for i in probs.argmax(-1).tolist()]})
    for c, name in enumerate(classnames):
        predictions[f"p_{name}"] = probs[:, c].numpy().round(5)
    predictions.to_csv(out / "predictions.csv", index=False)
    plot_confusion_matrix(metrics["confusion_matrix"], classnames, out / "confusion_matrix.png",
                          title=f"zero-shot, n={metrics['n']}, balanced acc {metrics['balanced_accuracy']:.3f}")
    data.skipped.to_csv(out / "skipped_rows.csv", index=False)
    metrics.update(source=str(data.csv_path), split=split, n_skipped_rows=len(data.skipped),
                   classnames=classnames, templates=templates, model=str(args.model))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    print(f"{data.csv_path} [{split}]: n={metrics['n']} scored, {len(data.skipped)} rows skipped")
    for row in data.skipped.head(5).itertuples():
        print(f"  skipped line {row.line}: {row.problem}")
    if len(data.skipped) > 5:
        print(f"  ... {len(data.skipped) - 5} more in skipped_rows.csv")
    print(f"accuracy {metrics['accuracy']:.4f}  balanced_accuracy {metrics['balanced_accuracy']:.4f}  "
          f"macro_auroc {metrics['macro_auroc']:.4f}")
    for name, row in metrics["per_class"].items():
        if row["support"]:
            print(f"  {name:<24} recall {row['recall']:.3f}  precision {row['precision']:.3f}  n={row['support']}")
    print(f"wrote {out}/metrics.json, confusion_matrix.png, predictions.csv, skipped_rows.csv")
    return metrics


if __name__ == "__main__":
    run_entry_point(main)
