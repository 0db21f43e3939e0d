"""Contrastive losses beyond open_clip's: image-text-label contrast for data whose captions come from labels."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss


class UniCLLoss(ClipLoss):
    """UniCL (Yang et al., "Unified Contrastive Learning in Image-Text-Label Space", CVPR 2022): CLIP's InfoNCE in
    both directions, with every pair of the global batch that shares a label counted as a positive (soft targets
    spread evenly over them) instead of as a negative.

    Where captions are written from a handful of diagnoses (HAM10000: seven), a batch holds many images of one
    class; CLIP's loss pushes each away from the other captions of its own class, a contradiction the model can
    only resolve through incidental caption details. Rows with label -1 (unknown) have their own pair as their only
    positive, as in CLIP. Features and labels are gathered across processes as open_clip's ``ClipLoss`` does.
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                labels: torch.Tensor, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            image_features: (B, D) L2-normalised, this process's batch.
            text_features: (B, D) L2-normalised, paired row by row with the images.
            logit_scale: the learned temperature (already exponentiated, as open_clip passes it).
            labels: (B,) long class of each pair, -1 where unknown.
        """
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale,
                                                            logit_bias=logit_bias)
        every = labels
        if self.world_size > 1:
            gathered = [torch.empty_like(labels) for _ in range(self.world_size)]
            dist.all_gather(gathered, labels)
            every = torch.cat(gathered)
        rows = labels if self.local_loss else every
        targets = ((rows[:, None] == every[None, :]) & (rows[:, None] >= 0)).float()
        own = self.get_ground_truth(image_features.device, logits_per_image.shape[0])
        targets[torch.arange(len(rows), device=targets.device), own] = 1.0
        targets = targets / targets.sum(1, keepdim=True)
        return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2
