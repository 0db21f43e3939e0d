"""The optimiser setup the language-model modules share: AdamW on trainable parameters, cosine with warm-up."""

from __future__ import annotations

import lightning as L
import torch
from transformers import get_cosine_schedule_with_warmup

from mmclin.contracts import Encoder


def adamw_cosine(
    module: L.LightningModule,
    lr: float,
    weight_decay: float,
    warmup: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    decay_1d: bool = True,
    fused: bool | None = None,
) -> dict:
    """`configure_optimizers` output: AdamW over the parameters that require grad, per-step cosine decay after a
    linear warm-up.

    An encoder's :meth:`~mmclin.contracts.Encoder.scaled_parameters` (e.g. the region head of
    :class:`encoders.regions.RegionEncoder`) train at `lr` times their scale, under the same schedule.

    Args:
        module: the module to train, attached to its trainer (the total step count comes from it).
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup: linear warm-up length: a fraction of the total steps if < 1, else a number of steps.
        betas: AdamW betas.
        eps: AdamW epsilon.
        decay_1d: decay 1-D parameters (gains, biases, scalars such as a logit scale) too; False exempts them, as
            open_clip_train does. timm's ``param_groups_weight_decay`` has that rule but groups a whole module, so
            it is applied here within each learning-rate group.
        fused: AdamW's fused kernel (one pass over all tensors); None leaves the choice to torch.
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
    if not decay_1d:
        names = {id(p): name for name, p in module.named_parameters()}
        split = []
        for group in groups:
            flat = {id(p) for p in group["params"] if p.ndim <= 1 or names[id(p)].endswith(".bias")}
            split += [{**group, "params": [p for p in group["params"] if id(p) in flat], "weight_decay": 0.0},
                      {**group, "params": [p for p in group["params"] if id(p) not in flat]}]
        groups = split
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps,
                                  weight_decay=weight_decay, fused=fused)
    total = max(1, int(module.trainer.estimated_stepping_batches))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(warmup * total) if warmup < 1 else int(warmup), total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
