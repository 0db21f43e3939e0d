"""Connectors: encoder tokens ``(B, T, D_enc)`` with a mask ``(B, T)`` to LM-width tokens and their mask."""

from __future__ import annotations

import torch
from timm.layers import get_act_layer
from torch import nn
from torchvision.ops import MLP
from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

from mmclin.errors import ConfigError


def _check_tokens(tokens: torch.Tensor, mask: torch.Tensor | None, in_dim: int, owner: str) -> None:
    if tokens.ndim != 3 or tokens.shape[-1] != in_dim:
        raise ValueError(f"{owner}: tokens must be (B, T, {in_dim}), got {tuple(tokens.shape)}")
    if mask is not None and mask.shape != tokens.shape[:2]:
        raise ValueError(f"{owner}: mask must be (B, T) = {tuple(tokens.shape[:2])}, got {tuple(mask.shape)}")


class MLPProjector(nn.Module):
    """Per-token MLP to the LM width, as LLaVA-1.5 (Linear-GELU-Linear); the token count is kept."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int | None = None,
        n_layers: int = 2,
        activation: str = "gelu",
    ):
        """
        Args:
            in_dim: encoder token width.
            out_dim: LM hidden size.
            hidden_dim: width of the inner layers; default `out_dim` (LLaVA-1.5).
            n_layers: number of Linear layers (1: a linear projection).
            activation: timm activation name between layers (``gelu``, ``silu``, ``relu``, ...).
        """
        super().__init__()
        if n_layers < 1:
            raise ConfigError(f"MLPProjector: n_layers must be >= 1, got {n_layers}")
        self.in_dim, self.out_dim = in_dim, out_dim
        hidden_dim = hidden_dim or out_dim
        self.mlp = MLP(in_dim, [hidden_dim] * (n_layers - 1) + [out_dim], activation_layer=get_act_layer(activation))

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            tokens: (B, T, in_dim) encoder tokens.
            mask: (B, T) bool, True for real tokens; passed through.

        Returns:
            (B, T, out_dim) tokens and the mask unchanged.
        """
        _check_tokens(tokens, mask, self.in_dim, type(self).__name__)
        return self.mlp(tokens), mask


class PerceiverResampler(nn.Module):
    """Flamingo's perceiver resampler: a fixed number of learned latents read any number of input tokens.

    Each layer lets the latents attend to ``[inputs; latents]`` (pre-norm, SDPA), padded inputs masked out, then a
    feed-forward block (4x width). The attention matrix is ``n_latents x (T + n_latents)``, so memory grows only
    linearly with T, through the inputs' keys and values. Inputs are an unordered set to the resampler: position
    information must already be in the encoder tokens.

    The layers are transformers' ``Idefics2PerceiverResampler`` (the same design, with a padding mask and the SDPA
    and flash-attention backends); this wrapper adds the projections in and out and a random latent init.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        n_latents: int = 32,
        depth: int = 2,
        n_heads: int = 4,
        head_dim: int | None = None,
        hidden_dim: int | None = None,
        activation: str = "gelu",
    ):
        """
        Args:
            in_dim: encoder token width.
            out_dim: LM hidden size.
            n_latents: number of output tokens.
            depth: number of attention + feed-forward layers.
            n_heads: attention heads.
            head_dim: width of one head; default ``hidden_dim // n_heads``.
            hidden_dim: width the resampler works at; default `in_dim` (Flamingo resamples at the vision width,
                which keeps it small next to a wide LM).
            activation: transformers activation name in the feed-forward block.
        """
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        if head_dim is None:
            if hidden_dim % n_heads:
                raise ConfigError(f"PerceiverResampler: hidden_dim={hidden_dim} must be divisible by n_heads={n_heads}")
            head_dim = hidden_dim // n_heads
        if min(n_latents, depth, n_heads, head_dim) < 1:
            raise ConfigError("PerceiverResampler: n_latents, depth, n_heads and head_dim must be >= 1")
        self.in_dim, self.out_dim, self.n_latents = in_dim, out_dim, n_latents
        self.proj_in = nn.Linear(in_dim, hidden_dim) if hidden_dim != in_dim else nn.Identity()
        config = Idefics2PerceiverConfig(
            hidden_size=hidden_dim,
            hidden_act=activation,
            resampler_n_latents=n_latents,
            resampler_depth=depth,
            resampler_n_heads=n_heads,
            resampler_head_dim=head_dim,
            num_key_value_heads=n_heads,
            attn_implementation="sdpa",
        )
        self.resampler = Idefics2PerceiverResampler(config)
        # Idefics2 starts every latent at 1 (its pretrained weights replace them); identical latents would all
        # read the same thing. Flamingo draws them from N(0, 1).
        nn.init.normal_(self.resampler.latents)
        # The resampler ends in an RMSNorm (unit scale); a linear map lets training match the LM's embedding scale.
        self.proj_out = nn.Linear(hidden_dim, out_dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            tokens: (B, T, in_dim) encoder tokens.
            mask: (B, T) bool, True for real tokens; None: all real.

        Returns:
            (B, n_latents, out_dim) tokens and a (B, n_latents) all-True mask.
        """
        _check_tokens(tokens, mask, self.in_dim, type(self).__name__)
        batch = tokens.shape[0]
        if mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        latents = self.resampler(context=self.proj_in(tokens), attention_mask=mask.to(torch.bool))
        out_mask = torch.ones(batch, self.n_latents, dtype=torch.bool, device=tokens.device)
        return self.proj_out(latents), out_mask
