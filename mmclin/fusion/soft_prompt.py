"""Soft-prompt fusion: connector tokens replace media placeholders in a causal LM's ``inputs_embeds``.

LLaVA (Liu et al. 2023) and OpenTSLM-SoftPrompt put encoder tokens where the prompt names a medium. Here each
placeholder token stands for one whole medium (one image, one series or lead group) and is replaced by that
medium's T tokens, so any number of media of any length can be interleaved with text.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from mmclin.contracts import IGNORE_INDEX
from mmclin.errors import DataError
from mmclin.fusion.base import FusedInputs, Fusion, MediaTokens


def check_placeholder_counts(
    input_ids: Tensor,
    media_token_id: int,
    n_media: Sequence[int] | Tensor,
    attention_mask: Tensor | None = None,
) -> list[Tensor]:
    """Find the media placeholders of each row and check that each row has one per medium supplied.

    Args:
        input_ids: (B, S) token ids.
        media_token_id: id of the placeholder token that stands for one medium.
        n_media: (B,) number of media supplied for each row.
        attention_mask: (B, S) 1 for tokens, 0 for padding; placeholders in padding are not counted.

    Returns:
        For each row, a 1-D tensor of the placeholder indices in ``input_ids``.

    Raises:
        DataError: a row's placeholder count differs from its media count (the message names the row).
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids should be (B, S), got shape {tuple(input_ids.shape)}")
    if len(n_media) != input_ids.shape[0]:
        raise ValueError(f"media are given for {len(n_media)} rows but input_ids has {input_ids.shape[0]} rows")
    is_placeholder = input_ids == media_token_id
    if attention_mask is not None:
        is_placeholder &= attention_mask.bool()
    rows = []
    for row, (flags, expected) in enumerate(zip(is_placeholder, n_media)):
        found = flags.nonzero().squeeze(-1)
        if len(found) != int(expected):
            raise DataError(
                f"row {row}: {len(found)} media placeholder token(s) (id {media_token_id}) in the text but "
                f"{int(expected)} medium/media supplied; put one placeholder where each medium belongs"
            )
        rows.append(found)
    return rows


def splice_media(
    input_ids: Tensor,
    embed_tokens: nn.Module,
    media_token_id: int,
    media: list[list[Tensor]] | Tensor,
    media_mask: Tensor | None = None,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    padding_side: Literal["right", "left"] = "right",
) -> FusedInputs:
    """Replace each media placeholder with its medium's tokens and re-pad the batch.

    The j-th placeholder of a row takes the row's j-th medium. Masked-out media tokens are dropped, so a row
    grows by the number of valid tokens of its media, minus one per placeholder. transformers' LLaVA expects
    its processor to have repeated the placeholder once per image token already; our media lengths are known
    only after encoding, so the expansion happens here.

    Args:
        input_ids: (B, S) token ids with one ``media_token_id`` per medium; padding on either side.
        embed_tokens: the LM's input embedding (``lm.get_input_embeddings()``), mapping ids to width D.
        media_token_id: id of the placeholder token.
        media: per row, a list of media tokens (T_i, D); or a padded (B, M, T, D) tensor with ``media_mask``.
        media_mask: (B, M, T) bool, True for valid tokens of padded ``media``; a medium with no valid token is
            absent. Required with a padded tensor, ignored with lists.
        attention_mask: (B, S) 1 for tokens, 0 for padding; None means no padding.
        labels: (B, S) labels of the text (answer token ids, -100 for the prompt and padding), as
            :class:`mmclin.tasks.qa.QACollator` gives them.
        padding_side: where the output rows are padded: ``right`` for training, ``left`` for batched generation.

    Returns:
        :class:`~mmclin.fusion.base.FusedInputs`: inputs_embeds (B, S', D), attention_mask, position_ids and
        labels (B, S').

    Raises:
        DataError: a row's placeholder count differs from its media count.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side should be 'right' or 'left', got {padding_side!r}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} != input_ids {tuple(input_ids.shape)}")
    media = _media_lists(media, media_mask)
    placeholders = check_placeholder_counts(input_ids, media_token_id, [len(m) for m in media], attention_mask)

    text_embeds = embed_tokens(input_ids)
    rows_embeds, rows_labels = [], []
    for row in range(input_ids.shape[0]):
        keep = attention_mask[row].bool()
        # Cut the row's tokens (padding dropped) into text runs around the placeholders.
        embeds, row_labels = [], []
        start = 0
        for index, medium in zip(placeholders[row].tolist() + [input_ids.shape[1]], media[row] + [None]):
            run = keep[start:index]
            embeds.append(text_embeds[row, start:index][run])
            if labels is not None:
                row_labels.append(labels[row, start:index][run])
            if medium is not None:
                if medium.ndim != 2 or medium.shape[-1] != text_embeds.shape[-1]:
                    raise ValueError(
                        f"row {row}: a medium should be (T, {text_embeds.shape[-1]}), got {tuple(medium.shape)}"
                    )
                embeds.append(medium.to(text_embeds))
                if labels is not None:
                    row_labels.append(labels.new_full((len(medium),), IGNORE_INDEX))
            start = index + 1
        rows_embeds.append(torch.cat(embeds))
        if labels is not None:
            rows_labels.append(torch.cat(row_labels))

    lengths = [len(e) for e in rows_embeds]
    width = max(lengths)
    out_embeds = text_embeds.new_zeros(len(lengths), width, text_embeds.shape[-1])
    out_mask = attention_mask.new_zeros(len(lengths), width)
    out_labels = None if labels is None else labels.new_full((len(lengths), width), IGNORE_INDEX)
    for row, length in enumerate(lengths):
        span = slice(0, length) if padding_side == "right" else slice(width - length, width)
        out_embeds[row, span] = rows_embeds[row]
        out_mask[row, span] = 1
        if out_labels is not None:
            out_labels[row, span] = rows_labels[row]
    position_ids = (out_mask.long().cumsum(-1) - 1).clamp(min=0)
    return FusedInputs(out_embeds, out_mask, position_ids, out_labels)


def _media_lists(media: list[list[Tensor]] | Tensor, media_mask: Tensor | None) -> list[list[Tensor]]:
    """Media of each row as a list of (T_i, D) tensors, valid tokens only."""
    if not isinstance(media, Tensor):
        return [list(row) for row in media]
    if media.ndim != 4:
        raise ValueError(f"padded media should be (B, M, T, D), got shape {tuple(media.shape)}")
    if media_mask is None or media_mask.shape != media.shape[:3]:
        got = None if media_mask is None else tuple(media_mask.shape)
        raise ValueError(
            f"padded media {tuple(media.shape)} need a media_mask of shape {tuple(media.shape[:3])}, got {got}"
        )
    media_mask = media_mask.bool()
    return [
        [medium[valid] for medium, valid in zip(row, row_mask) if valid.any()]
        for row, row_mask in zip(media, media_mask)
    ]


class SoftPromptFusion(Fusion):
    """Each ``<media>`` placeholder's embedding replaced by its medium's connector tokens (:func:`splice_media`).

    No parameters of its own: the connector's tokens are the LM's input, so the LM reads them as it reads text.
    """

    @contextlib.contextmanager
    def fuse(self, lm: nn.Module, input_ids: Tensor, attention_mask: Tensor, media: MediaTokens, media_token_id: int,
             labels: Tensor | None = None, padding_side: Literal["right", "left"] = "right") -> Iterator[FusedInputs]:
        """See :meth:`Fusion.fuse`; rows grow by their media's valid tokens, less one per placeholder."""
        yield splice_media(input_ids, lm.get_input_embeddings(), media_token_id, media.tokens, media.mask,
                           attention_mask, labels, padding_side)
