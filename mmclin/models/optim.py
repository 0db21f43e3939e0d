"""The optimiser setup the language-model modules share: AdamW on trainable parameters, cosine with warm-up."""

from __future__ import annotations

import lightning as L
import torch
from transformers import get_cosine_schedule_with_warmup

from mmclin.contracts import Encoder


def adamw_cosine(module: L.LightningModule, lr: float, weight_decay: float, warmup: float) -> dict:
    """`configure_optimizers` output: AdamW over the parameters that require grad, per-step cosine decay after a
    linear warm-up of `warmup` (a fraction of the total steps if < 1, else a number of steps).

    An encoder's :meth:`~mmclin.contracts.Encoder.scaled_parameters` (e.g. the region head of
    :class:`encoders.regions.RegionEncoder`) train at `lr` times their scale, under the same schedule.
    """
    groups, seen = [], set()
    for sub in module.modules():
        if not isinstance(sub, Encoder):
            continue
        for part, scale in sub.scaled_parameters():
            params = [p for p in part.parameters() if p.requires_grad and id(p) not in seen]
            seen.update(map(id, params))
            groups.append({"params": params, "lr": lr * scale})
    groups.insert(0, {"params": [p for p in module.parameters() if p.requires_grad and id(p) not in seen]})
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)
    total = max(1, int(module.trainer.estimated_stepping_batches))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(warmup * total) if warmup < 1 else int(warmup), total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
