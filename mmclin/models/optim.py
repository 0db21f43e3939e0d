"""The optimiser setup the language-model modules share: AdamW on trainable parameters, cosine with warm-up."""

from __future__ import annotations

import lightning as L
import torch
from transformers import get_cosine_schedule_with_warmup


def adamw_cosine(module: L.LightningModule, lr: float, weight_decay: float, warmup: float) -> dict:
    """`configure_optimizers` output: AdamW over the parameters that require grad, per-step cosine decay after a
    linear warm-up of `warmup` (a fraction of the total steps if < 1, else a number of steps)."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = max(1, int(module.trainer.estimated_stepping_batches))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(warmup * total) if warmup < 1 else int(warmup), total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
