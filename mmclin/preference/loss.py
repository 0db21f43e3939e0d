"""Weighted DPO loss (Rafailov et al. 2023) with label smoothing (conservative DPO, Mitchell 2023), as TRL's
``sigmoid`` loss type computes it, with MMedPO's per-pair clinical weights (Zhu et al. 2024).

TRL's loss is a method of its ``DPOTrainer``, bound to that trainer's batches and models; the formula is what
we share, written against sequence log-probabilities so both fusions of our model use it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mmclin.errors import ConfigError


class DPOOutput(NamedTuple):
    loss: torch.Tensor  # scalar
    losses: torch.Tensor  # (B,) per pair, before weighting
    chosen_rewards: torch.Tensor  # (B,) beta * (log pi - log ref) of the chosen answer
    rejected_rewards: torch.Tensor  # (B,)


def normalise_weights(weights: torch.Tensor) -> torch.Tensor:
    """Weights divided by their batch mean (MMedPO normalises clinical relevance per batch), so the loss scale
    does not depend on how costly a batch's mistakes happen to be."""
    return weights / weights.mean().clamp(min=1e-8)


def weighted_dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                      reference_rejected: torch.Tensor, weights: torch.Tensor | None = None, beta: float = 0.1,
                      label_smoothing: float = 0.0) -> DPOOutput:
    """Mean over pairs of ``w_i * l_i`` with
    ``l_i = -(1 - eps) log sigmoid(beta * m_i) - eps log sigmoid(-beta * m_i)`` and the margin
    ``m_i = (log pi(c) - log pi(r)) - (log ref(c) - log ref(r))`` of sequence log-probabilities.

    Args:
        policy_chosen, policy_rejected, reference_chosen, reference_rejected: (B,) summed answer-token log-probs.
        weights: (B,) clinical weights, normalised to mean 1 over the batch; None for uniform.
        beta: DPO's KL temperature.
        label_smoothing: eps, the assumed rate of flipped preference labels (0: plain DPO).
    """
    if not 0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    margin = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    w = torch.ones_like(losses) if weights is None else normalise_weights(weights.to(losses))
    return DPOOutput((w * losses).mean(), losses, beta * (policy_chosen - reference_chosen).detach(),
                     beta * (policy_rejected - reference_rejected).detach())
