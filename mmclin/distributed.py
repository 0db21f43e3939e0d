"""Evaluation under several processes that gives the one-process figures.

Evaluation loaders shard a split round-robin without padding (rank r holds items r, r + W, r + 2W, ...; see
:func:`datamodules.loaders.split_loader`), so no study is counted twice; these helpers put the ranks' results
back in the split's own order, which seeded bootstrap intervals and prediction files depend on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch


def interleave(parts: Sequence[Sequence]) -> list:
    """The split's order from per-rank lists of a round-robin shard: ``parts[r][j]`` is item ``j * W + r``."""
    return [part[j] for j in range(max(map(len, parts), default=0)) for part in parts if j < len(part)]


def gather_in_order(module: L.LightningModule, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's rows of `local` (tensors whose first dimension is this rank's items), in the split's order.

    Ranks may hold different numbers of rows (the shards are not padded): each pads to the longest for the
    all-gather, and the padding is dropped before the rows are interleaved.
    """
    if module.trainer.world_size == 1:
        return local
    rows = len(next(iter(local.values())))
    sizes = module.all_gather(torch.tensor(rows, device=module.device)).flatten().tolist()
    longest = max(sizes)
    padded = {k: torch.cat([v, v.new_zeros((longest - len(v), *v.shape[1:]))]) for k, v in local.items()}
    gathered = module.all_gather(padded)  # (world, longest, ...)
    order = interleave([[rank * longest + j for j in range(n)] for rank, n in enumerate(sizes)])
    return {k: v.flatten(0, 1)[order] for k, v in gathered.items()}


def gather_rows(module: L.LightningModule, rows: list[dict], directory: Path, prefix: str = "") -> list[dict]:
    """Every rank's evaluation `rows` (JSON objects, this rank's shard) in the split's order, the same on every
    rank: each rank writes ``<directory>/<prefix>rank<r>.jsonl`` and, after a barrier, reads them all."""
    directory.mkdir(parents=True, exist_ok=True)
    part = directory / f"{prefix}rank{module.global_rank}.jsonl"
    part.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    world = module.trainer.world_size
    if world == 1:
        return list(rows)
    module.trainer.strategy.barrier()
    parts = [directory / f"{prefix}rank{r}.jsonl" for r in range(world)]
    return interleave([[json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()] for p in parts])
