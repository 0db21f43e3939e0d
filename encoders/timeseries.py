"""Time-series encoders (ECG, PSG): a channel-patch transformer and a 1D ResNet.

Both map ``series`` (B, C, L) with optional ``lengths`` (B,) to an :class:`EncoderOutput`: tokens (B, T, D),
pooled (B, D) and a validity mask (B, T). Samples past an item's length never reach its valid tokens, its
pooled vector or its z-normalisation statistics, so a batch padded with anything gives each item the
outputs it would get alone.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import AttentionRope, Mlp, freq_bands
from torch import nn

from mmclin.contracts import Encoder, EncoderOutput
from mmclin.errors import ConfigError


def _check_input(series: torch.Tensor, lengths: torch.Tensor | None, max_channels: int, exact: bool) -> torch.Tensor:
    """Validate ``series`` (B, C, L) and return ``lengths`` (B,) long on its device (all L when None)."""
    if series.ndim != 3:
        raise ValueError(f"series must be (B, C, L), got shape {tuple(series.shape)}")
    b, c, length = series.shape
    if (exact and c != max_channels) or c > max_channels:
        expected = f"{max_channels}" if exact else f"at most {max_channels}"
        raise ValueError(f"series has {c} channels but the encoder was built for {expected}")
    if lengths is None:
        return torch.full((b,), length, dtype=torch.long, device=series.device)
    if lengths.shape != (b,) or lengths.is_floating_point():
        raise ValueError(f"lengths must be integer of shape ({b},), got {lengths.dtype} {tuple(lengths.shape)}")
    if bool((lengths < 1).any()) or bool((lengths > length).any()):
        raise ValueError(f"lengths must lie in [1, {length}] (the series length), got {lengths.tolist()}")
    return lengths.to(device=series.device, dtype=torch.long)


def _valid_positions(length: int, n_valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, length) bool, True before each item's ``n_valid`` (B,) positions."""
    return (torch.arange(length, device=n_valid.device) < n_valid[:, None]).unsqueeze(1)


def _masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the valid tokens: tokens (B, T, D), mask (B, T) -> (B, D)."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1)


class _RotaryBlock(nn.Module):
    """Pre-norm transformer block whose attention rotates q and k by the time-patch index (RoFormer)."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        # timm's attention applies the rotary embedding and runs F.scaled_dot_product_attention.
        self.attn = AttentionRope(d_model, n_heads, num_prefix_tokens=0, attn_drop=dropout, proj_drop=dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = Mlp(d_model, int(d_model * mlp_ratio), drop=dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask)
        return x + self.mlp(self.norm2(x))


class PatchTransformerEncoder(Encoder):
    """Per-channel patches (one strided conv shared by all leads) + lead embedding + transformer.

    Tokens are channel-major: token ``c * T + t`` is patch ``t`` of channel ``c``. Positions are computed from
    the patch index at run time (sinusoidal added to tokens, or rotary inside attention), so no parameter
    depends on the series length (OpenTSLM's learned table stops at 4096 samples).

    Mask rule: an item of ``n`` valid samples has ``ceil(max(n - patch_size, 0) / stride) + 1`` valid patches
    per channel, the fewest that cover every valid sample; the last patch is zero-filled past ``n``.
    """

    def __init__(
        self,
        n_channels: int,
        patch_size: int = 25,
        stride: int | None = None,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        positions: Literal["sinusoidal", "rotary"] = "sinusoidal",
        normalize: bool = True,
        max_channels: int | None = None,
        eps: float = 1e-5,
        window: int | None = None,
        max_time_tokens: int | None = None,
    ):
        """
        Args:
            n_channels: leads/channels the encoder expects (12 for PTB-XL).
            patch_size: samples per patch (25 = 0.25 s at 100 Hz).
            stride: samples between patch starts; None means ``patch_size`` (no overlap). At most ``patch_size``.
            d_model: token width ``D``.
            n_layers: transformer blocks.
            n_heads: attention heads; must divide ``d_model``.
            mlp_ratio: MLP hidden width as a multiple of ``d_model``.
            dropout: dropout in attention and MLP.
            positions: ``sinusoidal`` (added to tokens) or ``rotary`` (q/k rotated by the time-patch index).
            normalize: z-normalise each channel over its valid samples; the output then carries mean and std.
            max_channels: size of the lead-embedding table; when set, series may have any channel count up to
                it (channel ``c`` keeps embedding ``c``); None means exactly ``n_channels``.
            eps: floor on the std used for dividing, so a flat lead gives zeros, not NaN.
            window: attend within blocks of this many time patches (all leads of those patches), the blocks of
                every second layer shifted by half a window so information crosses block borders (Swin's shifted
                windows, Liu et al. 2021). Attention memory then grows linearly with the series length instead of
                quadratically (12 leads x 64k samples at patch 64 are 12k tokens: a 12k x 12k attention matrix per
                head without it). None: every token attends to every token. A series of at most `window` patches
                is encoded exactly as without a window. Sinusoidal positions only.
            max_time_tokens: a series of more patches per lead than this has them average-pooled (over valid
                patches) to this many before attention, so the encoder's memory stops growing with the length;
                positions then count pooled tokens. None: one token per patch. Sinusoidal positions only.
        """
        super().__init__()
        stride = patch_size if stride is None else stride
        if n_channels < 1:
            raise ConfigError(f"n_channels must be >= 1, got {n_channels}")
        if patch_size < 1 or not 1 <= stride <= patch_size:
            raise ConfigError(f"need patch_size >= 1 and 1 <= stride <= patch_size, got {patch_size=} {stride=}")
        if positions not in ("sinusoidal", "rotary"):
            raise ConfigError(f"positions must be 'sinusoidal' or 'rotary', got {positions!r}")
        if d_model % n_heads:
            raise ConfigError(f"d_model ({d_model}) should be divisible by n_heads ({n_heads})")
        if positions == "sinusoidal" and d_model % 2:
            raise ConfigError(f"sinusoidal positions need an even d_model, got {d_model}")
        if positions == "rotary" and (d_model // n_heads) % 2:
            raise ConfigError(f"rotary positions need an even head width d_model / n_heads, got {d_model // n_heads}")
        if max_channels is not None and max_channels < n_channels:
            raise ConfigError(f"max_channels ({max_channels}) must be >= n_channels ({n_channels})")
        if window is not None and (window < 2 or positions != "sinusoidal"):
            raise ConfigError(f"window={window}: needs at least 2 time patches and sinusoidal positions (got "
                              f"positions={positions!r})")
        self.window = window
        if max_time_tokens is not None and (max_time_tokens < 1 or positions != "sinusoidal"):
            raise ConfigError(f"max_time_tokens={max_time_tokens}: needs at least 1 token and sinusoidal positions "
                              f"(got positions={positions!r})")
        self.max_time_tokens = max_time_tokens
        self.n_channels, self.patch_size, self.stride = n_channels, patch_size, stride
        self.positions, self.normalize, self.eps = positions, normalize, eps
        self.max_channels = max_channels
        self.out_dim = d_model
        self.n_heads = n_heads
        self.patch_embed = nn.Conv1d(1, d_model, patch_size, stride)
        self.channel_embed = nn.Embedding(max_channels or n_channels, d_model)
        if positions == "sinusoidal":
            layer = nn.TransformerEncoderLayer(
                d_model, n_heads, int(d_model * mlp_ratio), dropout, activation="gelu", batch_first=True,
                norm_first=True,
            )
            # Nested tensors are off for norm_first layers anyway; saying so avoids PyTorch's warning.
            self.blocks = nn.TransformerEncoder(layer, n_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)
        else:
            self.blocks = nn.ModuleList(_RotaryBlock(d_model, n_heads, mlp_ratio, dropout) for _ in range(n_layers))
            self.norm = nn.LayerNorm(d_model)

    def _pooled(self, tokens: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, T, D) patch tokens averaged over their valid patches into `max_time_tokens` time bins, and the
        valid bins per item."""
        b, c, t, d = tokens.shape
        valid = (torch.arange(t, device=tokens.device) < counts[:, None]).to(tokens.dtype)  # (B, T)
        summed = F.adaptive_avg_pool1d((tokens * valid[:, None, :, None]).reshape(b * c, t, d).transpose(1, 2),
                                       self.max_time_tokens)  # (B * C, D, T')
        share = F.adaptive_avg_pool1d(valid[:, None, :], self.max_time_tokens)[:, 0]  # valid fraction (B, T')
        pooled = summed.reshape(b, c, d, -1).transpose(2, 3) / share.clamp_min(1e-6)[:, None, :, None]
        return torch.where(share[:, None, :, None] > 0, pooled, 0.0), (share > 0).sum(-1)

    def _windowed(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The transformer over (B, C, T, D) tokens in blocks of `window` time patches, shifted by half a window
        on every second layer; returns (B, C * T, D)."""
        b, c, t, _ = tokens.shape
        for i, layer in enumerate(self.blocks.layers):
            shift = (self.window // 2) * (i % 2)
            x, keep, _ = _blocked(tokens, valid, self.window, shift)
            # A block of padding only would give attention nothing to attend to (NaN): let it see itself.
            empty = ~keep.any(-1)
            keep = keep.clone()
            keep[empty, 0] = True
            x = layer(x, src_key_padding_mask=~keep)
            tokens = _unblocked(x, b, c, t, self.window, shift)
        return self.blocks.norm(tokens.reshape(b, c * t, -1))

    def token_counts(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid patches per channel for ``lengths`` (B,) valid samples -> (B,) long (see the mask rule)."""
        return (lengths - self.patch_size).clamp_min(0).add(self.stride - 1).div(self.stride, rounding_mode="floor") + 1

    def forward(self, series: torch.Tensor, lengths: torch.Tensor | None = None) -> EncoderOutput:
        """
        Args:
            series: (B, C, L) float.
            lengths: (B,) long, valid samples per item; None means all L.

        Returns:
            EncoderOutput with tokens (B, C*T, D), mask (B, C*T), channel_index (C*T,) and, when normalising,
            mean and std (B, C).
        """
        lengths = _check_input(series, lengths, self.max_channels or self.n_channels, self.max_channels is None)
        b, c, length = series.shape
        valid = _valid_positions(length, lengths)
        # where(), not multiply: NaN or inf in the padding must not reach the sums.
        x = torch.where(valid, series, 0.0)
        mean = std = None
        if self.normalize:
            n = lengths[:, None].to(x.dtype)
            mean = x.sum(-1) / n
            centred = torch.where(valid, x - mean[..., None], 0.0)
            std = (centred.pow(2).sum(-1) / n).sqrt()
            x = centred / std.clamp_min(self.eps)[..., None]
        counts = self.token_counts(lengths)
        n_patches = int(counts.max())
        needed = (n_patches - 1) * self.stride + self.patch_size
        x = F.pad(x, (0, needed - length)) if needed > length else x[..., :needed]
        tokens = self.patch_embed(x.reshape(b * c, 1, needed)).reshape(b, c, -1, n_patches).transpose(2, 3)
        if self.max_time_tokens is not None and n_patches > self.max_time_tokens:
            tokens, counts = self._pooled(tokens, counts)
            n_patches = tokens.shape[2]
        tokens = tokens + self.channel_embed.weight[:c, None, :]
        time_index = torch.arange(n_patches, device=series.device, dtype=torch.float32)
        mask = (time_index < counts[:, None]).repeat(1, c)  # (B, C*T), channel-major like the tokens
        # timm's freq_bands(dim, step=2) are the Transformer/RoPE frequencies 1 / 10000 ** (2i / dim).
        if self.positions == "sinusoidal":
            angles = time_index[:, None] * freq_bands(self.out_dim, step=2, device=series.device)
            tokens = tokens + torch.cat([angles.sin(), angles.cos()], -1).to(tokens.dtype)
            if self.window is None or n_patches <= self.window:
                tokens = self.blocks(tokens.reshape(b, c * n_patches, -1), src_key_padding_mask=~mask)
            else:
                tokens = self._windowed(tokens, mask.reshape(b, c, n_patches))
        else:
            # Rotate by the time index only, so tokens of different leads at the same time share a phase.
            head_dim = self.out_dim // self.n_heads
            angles = time_index.repeat(c)[:, None] * freq_bands(head_dim, step=2, device=series.device)
            # timm's default (interleaved) layout pairs features (2i, 2i+1), so each angle appears twice.
            rope = torch.cat([angles.sin().repeat_interleave(2, -1), angles.cos().repeat_interleave(2, -1)], -1)
            tokens = tokens.reshape(b, c * n_patches, -1)
            for block in self.blocks:
                tokens = block(tokens, rope, mask[:, None, None, :])
            tokens = self.norm(tokens)
        tokens = torch.where(mask[..., None], tokens, 0.0)
        channel_index = torch.arange(c, device=series.device).repeat_interleave(n_patches)
        return EncoderOutput(tokens, _masked_mean(tokens, mask), mask, channel_index, mean, std)


def _blocked(x: torch.Tensor, valid: torch.Tensor, window: int, shift: int):
    """(B, C, T, D) tokens and (B, C, T) validity -> (B * K, C * window, D) blocks of `window` time patches
    starting `shift` patches early (padding masked), their key-padding mask, and K."""
    b, c, t, d = x.shape
    k = -(-(t + shift) // window)
    pad = (shift, k * window - t - shift)
    x = F.pad(x, (0, 0, *pad)).reshape(b, c, k, window, d).permute(0, 2, 1, 3, 4).reshape(b * k, c * window, d)
    valid = F.pad(valid, pad).reshape(b, c, k, window).permute(0, 2, 1, 3).reshape(b * k, c * window)
    return x, valid, k


def _unblocked(x: torch.Tensor, b: int, c: int, t: int, window: int, shift: int) -> torch.Tensor:
    k = x.shape[0] // b
    x = x.reshape(b, k, c, window, -1).permute(0, 2, 1, 3, 4).reshape(b, c, k * window, -1)
    return x[:, :, shift:shift + t]


class _BasicBlock1d(nn.Module):
    """conv-bn-relu-conv-bn + shortcut, relu (He et al. 2016), re-zeroing positions past each item's length."""

    def __init__(self, in_width: int, out_width: int, kernel_size: int, stride: int):
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv1d(in_width, out_width, kernel_size, stride, pad, bias=False)
        self.bn1 = nn.BatchNorm1d(out_width)
        self.conv2 = nn.Conv1d(out_width, out_width, kernel_size, 1, pad, bias=False)
        self.bn2 = nn.BatchNorm1d(out_width)
        self.shortcut = nn.Identity()
        if stride != 1 or in_width != out_width:
            self.shortcut = nn.Sequential(nn.Conv1d(in_width, out_width, 1, stride, bias=False),
                                          nn.BatchNorm1d(out_width))

    def forward(self, x: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
        """x: (B, W_in, L_in); n_valid: (B,) valid output positions -> (B, W_out, ceil(L_in / stride))."""
        out = F.relu(self.bn1(self.conv1(x)))
        valid = _valid_positions(out.shape[-1], n_valid)
        out = out * valid
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x)) * valid


class ResNet1dEncoder(Encoder):
    """Basic-block 1D ResNet for ECG, the strong PTB-XL baseline family (Strodthoff et al. 2021, resnet1d).

    Written with torch.nn: timm's ResNets are 2D only, and MONAI's ``ResNet(spatial_dims=1)`` cannot re-zero
    padded positions between layers, which is what keeps padding out of the valid outputs here.

    Mask rule: with ``total_stride = stem_stride * 2 ** (len(widths) - 1)``, an item of ``n`` valid samples has
    ``ceil(n / total_stride)`` valid tokens of ``ceil(L / total_stride)``. Padding never reaches valid tokens in
    eval mode; in training, BatchNorm's batch statistics still count the (zeroed) padded positions.
    """

    def __init__(
        self,
        n_channels: int = 12,
        widths: tuple[int, ...] = (64, 128, 256, 256),
        blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2),
        kernel_size: int = 5,
        stem_stride: int = 2,
        d_model: int | None = None,
    ):
        """
        Args:
            n_channels: leads/channels the encoder expects.
            widths: feature width of each stage; stages after the first halve the length.
            blocks_per_stage: basic blocks in each stage, one entry per width.
            kernel_size: odd conv kernel length, so padding keeps lengths at ``ceil(L / stride)``.
            stem_stride: stride of the stem conv.
            d_model: project the final width to this token width; None keeps ``widths[-1]``.
        """
        super().__init__()
        if n_channels < 1:
            raise ConfigError(f"n_channels must be >= 1, got {n_channels}")
        if not widths or len(widths) != len(blocks_per_stage):
            raise ConfigError(f"widths and blocks_per_stage need the same non-zero length: {widths} {blocks_per_stage}")
        if min(widths) < 1 or min(blocks_per_stage) < 1:
            raise ConfigError(f"widths and blocks_per_stage must be positive: {widths} {blocks_per_stage}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd and positive, got {kernel_size}")
        if stem_stride < 1:
            raise ConfigError(f"stem_stride must be >= 1, got {stem_stride}")
        self.n_channels = n_channels
        self.stem = nn.Sequential(
            nn.Conv1d(n_channels, widths[0], kernel_size, stem_stride, kernel_size // 2, bias=False),
            nn.BatchNorm1d(widths[0]),
            nn.ReLU(),
        )
        self.strides = [stem_stride]  # total stride after the stem and after each block
        blocks, in_width = [], widths[0]
        for stage, (width, n_blocks) in enumerate(zip(widths, blocks_per_stage)):
            for i in range(n_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(_BasicBlock1d(in_width, width, kernel_size, stride))
                self.strides.append(self.strides[-1] * stride)
                in_width = width
        self.blocks = nn.ModuleList(blocks)
        self.total_stride = self.strides[-1]
        self.proj = nn.Linear(widths[-1], d_model) if d_model else nn.Identity()
        self.out_dim = d_model or widths[-1]

    def token_counts(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid tokens for ``lengths`` (B,) valid samples -> (B,) long: ``ceil(n / total_stride)``."""
        return -(-lengths // self.total_stride)

    def forward(self, series: torch.Tensor, lengths: torch.Tensor | None = None) -> EncoderOutput:
        """
        Args:
            series: (B, C, L) float.
            lengths: (B,) long, valid samples per item; None means all L.

        Returns:
            EncoderOutput with tokens (B, ceil(L / total_stride), out_dim), channel_index all -1, no mean/std.
        """
        lengths = _check_input(series, lengths, self.n_channels, exact=True)
        x = torch.where(_valid_positions(series.shape[-1], lengths), series, 0.0)
        # Odd kernels with padding k // 2 give ceil(L / s) outputs, and ceil(ceil(n / a) / b) == ceil(n / (a * b)),
        # so each layer's valid length follows from its total stride. Re-zeroing after every layer makes the
        # padded region look exactly like the conv's own zero padding of an unpadded item.
        x = self.stem(x)
        x = x * _valid_positions(x.shape[-1], -(-lengths // self.strides[0]))
        for block, stride in zip(self.blocks, self.strides[1:]):
            x = block(x, -(-lengths // stride))
        tokens = self.proj(x.transpose(1, 2))
        mask = torch.arange(tokens.shape[1], device=x.device) < self.token_counts(lengths)[:, None]
        tokens = torch.where(mask[..., None], tokens, 0.0)
        channel_index = torch.full((tokens.shape[1],), -1, dtype=torch.long, device=x.device)
        return EncoderOutput(tokens, _masked_mean(tokens, mask), mask, channel_index)
