"""Spatial pooling connector: average neighbouring grid tokens, then project to the LM width.

M3D-LaMed (Bai et al. 2024, "M3D: Advancing 3D Medical Image Analysis with Multi-Modal Large Language Models")
lays the 2048 ViT tokens of a 32 x 256 x 256 CT back on their 8 x 16 x 16 patch grid, average-pools 2 x 2 x 2
blocks to 256 tokens and maps them to the LM with an MLP. The same works on 2D grids (4x fewer tokens at 2 x 2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmclin.errors import ConfigError
from mmclin.fusion.projector import MLPProjector, _check_tokens

_POOLS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def spatial_pool(tokens: torch.Tensor, grid: tuple[int, ...], kernel: tuple[int, ...]) -> torch.Tensor:
    """Average non-overlapping ``kernel`` blocks of tokens laid out row-major on ``grid``.

    Args:
        tokens: (B, T, D) with T = prod(grid), the last grid axis varying fastest.
        grid: token grid, 1 to 3 axes, e.g. (D', H', W').
        kernel: block size per grid axis; each must divide its axis.

    Returns:
        (B, T / prod(kernel), D), row-major on the pooled grid.
    """
    b, t, d = tokens.shape
    if t != math.prod(grid):
        raise ValueError(f"{t} tokens do not fill the grid {tuple(grid)} of {math.prod(grid)} tokens")
    x = tokens.transpose(1, 2).reshape(b, d, *grid)
    x = _POOLS[len(grid)](x, kernel_size=kernel, stride=kernel)
    return x.flatten(2).transpose(1, 2)


class SpatialPoolProjector(nn.Module):
    """Spatial average pooling of grid tokens, then a per-token MLP (or linear map) to the LM width (M3D-LaMed)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        grid: tuple[int, ...],
        kernel: int | tuple[int, ...] = 2,
        mlp: bool = True,
        activation: str = "gelu",
    ):
        """
        Args:
            in_dim: encoder token width.
            out_dim: LM hidden size.
            grid: the encoder's token grid, e.g. ``ViT3DEncoder.grid`` (8, 16, 16) or a 2D (14, 14).
            kernel: pooling block, one size for every axis or one per axis (``[1, 2, 2]`` keeps thin slabs).
            mlp: Linear-GELU-Linear as M3D; False: a single linear map.
            activation: timm activation name inside the MLP.
        """
        super().__init__()
        grid = tuple(int(g) for g in grid)
        kernel = (int(kernel),) * len(grid) if isinstance(kernel, int) else tuple(int(k) for k in kernel)
        if not 1 <= len(grid) <= 3 or min(grid) < 1:
            raise ConfigError(f"SpatialPoolProjector: grid must have 1 to 3 positive sizes, got {grid}")
        if len(kernel) != len(grid) or min(kernel) < 1 or any(g % k for g, k in zip(grid, kernel)):
            raise ConfigError(f"SpatialPoolProjector: kernel {kernel} must have one positive size per grid axis and "
                             f"divide the grid {grid}")
        self.in_dim, self.out_dim, self.grid, self.kernel = in_dim, out_dim, grid, kernel
        self.out_grid = tuple(g // k for g, k in zip(grid, kernel))
        self.n_tokens = math.prod(self.out_grid)
        self.proj = MLPProjector(in_dim, out_dim, n_layers=2 if mlp else 1, activation=activation)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            tokens: (B, prod(grid), in_dim) encoder tokens, row-major on the grid.
            mask: (B, prod(grid)) bool; every token must be valid (a grid has no padding). None: all valid.

        Returns:
            (B, n_tokens, out_dim) tokens and a (B, n_tokens) all-True mask.
        """
        _check_tokens(tokens, mask, self.in_dim, type(self).__name__)
        if tokens.shape[1] != math.prod(self.grid):
            raise ValueError(f"SpatialPoolProjector: got {tokens.shape[1]} tokens but the grid {self.grid} has "
                             f"{math.prod(self.grid)}")
        if mask is not None and not bool(mask.all()):
            raise ValueError("SpatialPoolProjector: the mask marks padded tokens, but pooling needs the full grid")
        pooled, _ = self.proj(spatial_pool(tokens, self.grid, self.kernel))
        out_mask = torch.ones(tokens.shape[0], self.n_tokens, dtype=torch.bool, device=tokens.device)
        return pooled, out_mask
