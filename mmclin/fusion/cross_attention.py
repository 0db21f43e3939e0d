"""Cross-attention fusion: gated cross-attention blocks run before chosen decoder layers of a causal LM.

Flamingo (Alayrac et al. 2022) inserts tanh-gated cross-attention before LM layers, gates at 0 so the frozen LM is
untouched at the start. Two changes here, for clinical series: every medium (series, lead group, image) keeps
its identity through a learned medium-index embedding (and optional channel/lead embedding) on its tokens, and
text attends to *every* medium placed at or before it, not only the latest one (Flamingo) nor a stack of all
series averaged into one medium (OpenTSLM-Flamingo).

The blocks are attached with forward pre-hooks, not by replacing layers: the LM's layer classes, its
state-dict keys (pretrained loading, ``save_pretrained``, peft target names) and the layer return types stay as
they are. HF layer signatures take no media, so media reach the blocks through :meth:`CrossAttentionFusion.media`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mmclin.errors import ConfigError
from mmclin.fusion.base import FusedInputs, Fusion, MediaTokens
from mmclin.fusion.soft_prompt import check_placeholder_counts
from mmclin.llm import lm_layers

NEVER = torch.iinfo(torch.long).max  # media position of an absent medium: no text position reaches it


class GatedCrossAttentionBlock(nn.Module):
    """Text attends to the media tokens placed at or before it; both residual branches are tanh-gated.

    ``x = x + tanh(alpha_attn) * attn(LN(x), media)``, then ``x = x + tanh(alpha_ff) * FF(LN(x))``, with
    ``alpha_*`` initialised to 0 so the block is the identity until trained (Flamingo, Alayrac et al. 2022).
    With both the gate and the attention starting from nothing, a small model can sit at that saddle for a whole
    run (the gate's gradient is the product with untrained attention, and the attention's is scaled by the gate);
    ``gate_init`` > 0 starts the attention branch open, for LMs trained from scratch.
    """

    def __init__(
        self,
        d_model: int,
        d_media: int,
        n_heads: int,
        ff_mult: int = 4,
        max_media: int = 32,
        n_channels: int = 0,
        gate_init: float = 0.0,
    ):
        """
        Args:
            d_model: width of the LM's hidden states.
            d_media: width of the media tokens (connector output).
            n_heads: attention heads; must divide ``d_model``.
            ff_mult: hidden width of the feed-forward branch, as a multiple of ``d_model``.
            max_media: most media per sample; size of the medium-index embedding.
            n_channels: size of the per-token channel/lead embedding; 0 for none.
            gate_init: initial ``alpha_attn``; 0 (Flamingo) leaves a pretrained LM untouched at the start.
        """
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(f"d_model ({d_model}) should be divisible by n_heads ({n_heads})")
        if min(d_model, d_media, n_heads, ff_mult, max_media) < 1 or n_channels < 0:
            raise ConfigError("d_model, d_media, n_heads, ff_mult and max_media should be >= 1, n_channels >= 0")
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(d_model)
        self.media_norm = nn.LayerNorm(d_media)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(d_media, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)
        self.ff = nn.Sequential(nn.LayerNorm(d_model), Mlp(d_model, ff_mult * d_model, act_layer=nn.GELU, bias=False))
        self.alpha_attn = nn.Parameter(torch.full((1,), float(gate_init)))
        self.alpha_ff = nn.Parameter(torch.zeros(1))
        # Attention over a set of keys ignores their order: without these, two media of equal content, or the
        # same media swapped, would read the same to the text.
        self.medium_embed = nn.Embedding(max_media, d_media)
        self.channel_embed = nn.Embedding(n_channels, d_media) if n_channels else None
        for embedding in (self.medium_embed, self.channel_embed):
            if embedding is not None:
                nn.init.normal_(embedding.weight, std=0.02)

    def forward(
        self,
        x: Tensor,
        text_positions: Tensor,
        media: Tensor | None = None,
        media_mask: Tensor | None = None,
        media_positions: Tensor | None = None,
        channel_ids: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            x: (B, S, d_model) hidden states of the text.
            text_positions: (B, S) long, position of each text token (the LM's position ids).
            media: (B, M, T, d_media) media tokens, padded; None when there are no media.
            media_mask: (B, M, T) bool, True for valid media tokens; an absent medium has none.
            media_positions: (B, M) long, text position at which each medium is placed.
            channel_ids: (B, M, T) long channel/lead index of each media token (needs ``n_channels``).

        Returns:
            (B, S, d_model); text that sees no medium gets only the feed-forward branch.
        """
        if media is not None and (media_mask is None or media_positions is None):
            raise ValueError("media need media_mask (B, M, T) and media_positions (B, M)")
        if media is not None and media.shape[1] * media.shape[2] > 0:
            n_media = media.shape[1]
            if n_media > self.medium_embed.num_embeddings:
                raise ValueError(f"{n_media} media per sample but max_media={self.medium_embed.num_embeddings}")
            media = media + self.medium_embed.weight[:n_media, None, :]
            if channel_ids is not None:
                if self.channel_embed is None:
                    raise ValueError("channel_ids given but the block was built with n_channels=0")
                media = media + self.channel_embed(channel_ids)
            keys, values = self.to_kv(self.media_norm(media.flatten(1, 2))).chunk(2, dim=-1)
            queries = self.to_q(self.norm(x))
            # Text at position p sees every token of every medium placed at or before p.
            visible = (media_positions[:, None, :, None] <= text_positions[:, :, None, None]) & media_mask[:, None]
            visible = visible.flatten(2)  # (B, S, M * T)
            sees_media = visible.any(-1, keepdim=True)
            # SDPA returns NaN for a row whose keys are all masked; let such rows see every key and zero them after.
            attended = F.scaled_dot_product_attention(
                self._heads(queries), self._heads(keys), self._heads(values), attn_mask=(visible | ~sees_media)[:, None]
            )
            attended = self.to_out(attended.transpose(1, 2).flatten(2)).masked_fill(~sees_media, 0.0)
            x = x + torch.tanh(self.alpha_attn) * attended
        return x + torch.tanh(self.alpha_ff) * self.ff(x)

    def _heads(self, tokens: Tensor) -> Tensor:
        """(B, N, d_model) -> (B, n_heads, N, d_model / n_heads)."""
        return tokens.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)


@dataclass
class _Media:
    """Media of the current batch, read by every block during one LM forward or ``generate``."""

    tokens: Tensor  # (B, M, T, d_media)
    mask: Tensor  # (B, M, T) bool
    positions: Tensor  # (B, M) long
    channel_ids: Tensor | None  # (B, M, T) long


class CrossAttentionFusion(Fusion):
    """Gated cross-attention blocks run before every ``every_n``-th decoder layer of the LM (:meth:`attach`).

    Layers ``every_n - 1, 2 * every_n - 1, ...`` get a block (OpenFlamingo's ``cross_attn_every_n_layers``). The
    placeholders stay in the text, and text attends to the tokens of every medium placed at or before it. The blocks
    are the only new parameters, so ``fusion.parameters()`` is what to train with a frozen LM. Keep the fusion as an
    attribute beside the LM (e.g. of the LightningModule) so it is moved, saved and loaded with it.
    """

    def __init__(
        self,
        every_n: int = 1,
        gate_init: float = 0.0,
        n_heads: int | None = None,
        ff_mult: int = 4,
        max_media: int = 32,
        n_channels: int = 0,
    ):
        """
        Args:
            every_n: a block before every n-th decoder layer.
            gate_init: initial attention gate ``alpha_attn`` of every block: 0 (Flamingo) for a pretrained LM; > 0
                for an LM trained from scratch, which can otherwise stay at the closed-gate saddle
                (see :class:`GatedCrossAttentionBlock`).
            n_heads: attention heads of the blocks; default the LM's ``num_attention_heads``.
            ff_mult: feed-forward width of the blocks, as a multiple of the LM's hidden size.
            max_media: most media per sample.
            n_channels: size of the optional per-token channel/lead embedding; 0 for none.
        """
        super().__init__()
        if every_n < 1:
            raise ConfigError(f"every_n should be >= 1 (a block before every n-th decoder layer), got {every_n}")
        self.every_n, self.gate_init, self.n_heads = every_n, gate_init, n_heads
        self.ff_mult, self.max_media, self.n_channels = ff_mult, max_media, n_channels
        self.blocks = nn.ModuleDict()  # block to run before each decoder layer, by layer index (from `attach`)
        self._media: _Media | None = None
        self._handles: list[RemovableHandle] = []

    def attach(self, lm: nn.Module, media_width: int) -> None:
        """Create a block for every ``every_n``-th decoder layer of `lm` and hook it in before the layer, on the
        device and in the dtype of the LM's first parameter.

        Args:
            lm: a transformers decoder-only LM.
            media_width: width of the media tokens.
        """
        if self.blocks:
            raise RuntimeError("this CrossAttentionFusion is attached to an LM already; build one per model")
        layers = lm_layers(lm)
        if self.every_n > len(layers):
            raise ConfigError(f"every_n should be in 1..{len(layers)} (the number of decoder layers), got "
                              f"{self.every_n}")
        config = lm.config.get_text_config()
        parameter = next(lm.parameters())
        for index in range(self.every_n - 1, len(layers), self.every_n):
            block = GatedCrossAttentionBlock(
                config.hidden_size, media_width, self.n_heads or config.num_attention_heads, self.ff_mult,
                self.max_media, self.n_channels, self.gate_init,
            ).to(device=parameter.device, dtype=parameter.dtype)
            self.blocks[str(index)] = block
            self._handles.append(layers[index].register_forward_pre_hook(_PreHook(self, block), with_kwargs=True))

    @contextlib.contextmanager
    def fuse(self, lm: nn.Module, input_ids: Tensor, attention_mask: Tensor, media: MediaTokens, media_token_id: int,
             labels: Tensor | None = None, padding_side: Literal["right", "left"] = "right") -> Iterator[FusedInputs]:
        """See :meth:`Fusion.fuse`; the text goes to the LM as it is (placeholders included, padding kept), and
        the blocks read the media while the block lasts."""
        positions = placeholder_positions(input_ids, media_token_id, media.present, attention_mask)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with self.media(media.tokens, media.mask, positions):
            yield FusedInputs(lm.get_input_embeddings()(input_ids), attention_mask, position_ids, labels)

    def set_media(self, tokens: Tensor, mask: Tensor, positions: Tensor, channel_ids: Tensor | None = None) -> None:
        """Media for the next LM forward passes; :meth:`media` sets them for a block and restores the previous.

        Args:
            tokens: (B, M, T, d_media) media tokens, padded.
            mask: (B, M, T) bool, True for valid tokens; a medium without valid tokens is absent.
            positions: (B, M) long, the LM position id of each medium's placeholder
                (see :func:`placeholder_positions`); text at position p sees media placed at or before p.
            channel_ids: (B, M, T) long channel/lead index of each token, when the blocks have ``n_channels``.
        """
        if tokens.ndim != 4:
            raise ValueError(f"media tokens should be (B, M, T, d_media), got shape {tuple(tokens.shape)}")
        if mask.shape != tokens.shape[:3]:
            raise ValueError(f"media mask should be {tuple(tokens.shape[:3])}, got {tuple(mask.shape)}")
        if positions.shape != tokens.shape[:2]:
            raise ValueError(f"media positions should be {tuple(tokens.shape[:2])}, got {tuple(positions.shape)}")
        if channel_ids is not None and channel_ids.shape != tokens.shape[:3]:
            raise ValueError(f"channel_ids should be {tuple(tokens.shape[:3])}, got {tuple(channel_ids.shape)}")
        self._media = _Media(tokens, mask.bool(), positions.long(), channel_ids)

    @contextlib.contextmanager
    def media(
        self, tokens: Tensor, mask: Tensor, positions: Tensor, channel_ids: Tensor | None = None
    ) -> Iterator[None]:
        """``with fusion.media(...): lm(...)`` or ``lm.generate(...)``; arguments as in :meth:`set_media`."""
        previous = self._media
        self.set_media(tokens, mask, positions, channel_ids)
        try:
            yield
        finally:
            self._media = previous

    def detach_hooks(self) -> None:
        """Take the blocks out of the LM again; the LM then runs as before :meth:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _before_layer(self, block: GatedCrossAttentionBlock, layer: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook of a decoder layer: run ``block`` on the layer's hidden states."""
        hidden_states = args[0] if args else kwargs["hidden_states"]
        # transformers 5 passes each layer the position ids of the tokens in this call (offset by the cache
        # length during cached generation); `cache_position` no longer exists.
        positions = kwargs.get("position_ids")
        if positions is None:
            raise RuntimeError(
                f"{type(layer).__name__} is called without position_ids, so cross-attention cannot tell where each "
                "text token is; this LM family is not supported"
            )
        if positions.ndim != 2:
            raise RuntimeError(f"expected (B, S) position_ids in {type(layer).__name__}, got {tuple(positions.shape)}")
        batch = hidden_states.shape[0]
        media = self._media
        if media is not None and media.tokens.shape[0] != batch:
            raise RuntimeError(
                f"media are set for {media.tokens.shape[0]} samples but the LM runs {batch} (beam search and "
                "num_return_sequences expand the batch: repeat_interleave the media to match)"
            )
        dtype = block.alpha_attn.dtype
        out = block(
            hidden_states.to(dtype),
            positions.expand(batch, -1),
            *(() if media is None else (media.tokens.to(dtype), media.mask, media.positions, media.channel_ids)),
        ).to(hidden_states.dtype)
        if args:
            return (out, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": out}


def attach_cross_attention(
    lm: nn.Module,
    d_media: int,
    every_n: int = 1,
    n_heads: int | None = None,
    ff_mult: int = 4,
    max_media: int = 32,
    n_channels: int = 0,
    gate_init: float = 0.0,
) -> CrossAttentionFusion:
    """A :class:`CrossAttentionFusion` with these settings, attached to `lm` for media of width `d_media`.

    Returns:
        The fusion holding the blocks; set media with :meth:`CrossAttentionFusion.media` around LM calls.
    """
    fusion = CrossAttentionFusion(every_n, gate_init, n_heads, ff_mult, max_media, n_channels)
    fusion.attach(lm, d_media)
    return fusion


class _PreHook:
    """Calls the fusion's hook with the block; a plain object so the LM holds no module reference to the fusion."""

    def __init__(self, fusion: CrossAttentionFusion, block: GatedCrossAttentionBlock):
        self.fusion, self.block = fusion, block

    def __call__(self, layer: nn.Module, args: tuple, kwargs: dict):
        return self.fusion._before_layer(self.block, layer, args, kwargs)


def placeholder_positions(
    input_ids: Tensor, media_token_id: int, media_present: Tensor, attention_mask: Tensor | None = None
) -> Tensor:
    """Position of each medium's placeholder, in the LM's position-id coordinates.

    Positions count the unpadded tokens of a row, as transformers' ``generate`` does (its position ids are
    ``attention_mask.cumsum(-1) - 1``), so they hold for left and right padding alike. With left padding outside
    ``generate``, pass the LM the same position ids (``FusedInputs.position_ids`` are built the same way).

    Args:
        input_ids: (B, S) token ids with one placeholder per present medium.
        media_token_id: id of the placeholder token.
        media_present: (B, M) bool; the j-th placeholder of a row belongs to its j-th present medium.
        attention_mask: (B, S) 1 for tokens, 0 for padding; None means no padding.

    Returns:
        (B, M) long positions; absent media get a position no text reaches.

    Raises:
        DataError: a row's placeholder count differs from its number of present media.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    media_present = media_present.bool()
    found = check_placeholder_counts(input_ids, media_token_id, media_present.sum(-1), attention_mask)
    token_positions = attention_mask.long().cumsum(-1) - 1
    positions = torch.full(media_present.shape, NEVER, dtype=torch.long, device=input_ids.device)
    for row, indices in enumerate(found):
        positions[row, media_present[row]] = token_positions[row, indices]
    return positions
