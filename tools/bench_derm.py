"""``python tools/bench.py derm-data``: is the loader the bottleneck of derm CLIP on HAM10000?

Side by side in one run, on the training split of configs/derm-clip.yaml + configs/overlays/ham10000.yaml: the
rate at which its DataLoader delivers augmented, tokenised batches (no model), with 0 workers and with the config's
workers, and the rate of the model's training steps on batches already in memory (forward, backward, AdamW).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from mmclin.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]


def images_per_s(batches, n_batches: int, batch_size: int, warmup: int = 2) -> float:
    """Images per second over `n_batches` after `warmup` batches of an iterator."""
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(n_batches):
        next(iterator)
    return n_batches * batch_size / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> str:
    cli = build_cli(["-c", str(ROOT / "configs" / "derm-clip.yaml"), "-c", str(ROOT / "configs" / "overlays" /
                    "ham10000.yaml"), "--data.init_args.root", args.root, "--trainer.logger", "false"], run=False)
    data, model = cli.datamodule, cli.model
    data.trainer = None
    data.setup("fit")
    train_tf, _, tokenizer = model.image_text_preprocess()
    from datamodules.derm import ImageTextDataset

    dataset = ImageTextDataset(data.datasets["train"].table, data.classnames, train_tf, tokenizer)
    batch_size = data.hparams.batch_size
    rows = []
    for workers in sorted({0, data.hparams.num_workers}):
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
        rows.append((f"loader, {workers} worker(s)", images_per_s(loader, args.batches, batch_size)))
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)))
    model.configure_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seconds = []
    for _ in range(args.batches + 2):
        start = time.perf_counter()
        loss = model.contrastive_loss(batch["image"], batch["text"], batch["label"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - start)
    rows.append(("training step (fp32), batches in memory", batch_size / statistics.median(seconds[2:])))
    table = ["| what | images/s |", "|---|---:|", *[f"| {name} | {rate:.0f} |" for name, rate in rows]]
    step = rows[-1][1]
    loader = rows[-2][1]
    verdict = ("the loader is not the bottleneck" if loader > 2 * step else
               "the loader is close to the step rate: more workers or cached decoding would help")
    size = "x".join(map(str, model.preprocess_cfg["size"])) if isinstance(model.preprocess_cfg["size"], (list, tuple)) \
        else model.preprocess_cfg["size"]
    return "\n".join([*table, "", f"- Training split of HAM10000 ({len(dataset)} photographs, 200x150 JPEG), the "
                      f"overlay's transforms at {size} px and batch {batch_size}; "
                      f"{args.batches} timed batches after 2 warm-up ones.",
                      f"- The config's loader delivers {loader / step:.1f}x the images a training step consumes: "
                      f"{verdict}.", "- Reproduce: `python tools/bench.py derm-data`."])
