"""The fusion contract: how a batch's media tokens enter a causal LM.

A :class:`Fusion` is built from its own settings (a config's ``fusion: {class_path, init_args}``), handed the LM
once the model has built it (:meth:`Fusion.attach`), and then asked for one thing: the LM's inputs for a batch of
text with media (:meth:`Fusion.fuse`), a context inside which the LM is called. Training, validation, choice
scoring, MMedPO's preference scoring and cached generation all go through that one call, so a new fusion is a new
class, not an edit of the models.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, NamedTuple

from torch import Tensor, nn


class MediaTokens(NamedTuple):
    """A batch's media at the LM's width, as the connectors give them; each sample's media in text order.

    Attributes:
        tokens: (B, M, T, D) float, padded.
        mask: (B, M, T) bool, True for valid tokens.
        present: (B, M) bool, True for a medium the sample has; a sample's j-th present medium belongs to its j-th
            ``<media>`` placeholder.
    """

    tokens: Tensor
    mask: Tensor
    present: Tensor


@dataclass
class FusedInputs:
    """What :meth:`Fusion.fuse` yields; pass the fields to an HF causal LM's forward (or ``generate``).

    Attributes:
        inputs_embeds: (B, S', D) the text's embeddings, with whatever the fusion put into them.
        attention_mask: (B, S') long, 1 for tokens, 0 for padding.
        position_ids: (B, S') long, counted over the unpadded tokens of each row (0 at padding), as transformers'
            ``generate`` derives them from the attention mask.
        labels: (B, S') long, the given text labels at their new positions (-100 where nothing is to be predicted);
            None when no labels were given.
    """

    inputs_embeds: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    labels: Tensor | None = None


class Fusion(nn.Module, ABC):
    """Base of the ways media tokens enter a causal LM (soft prompt, gated cross-attention, ...).

    Its parameters, if any, are the fusion's own (the LM's stay the LM's), saved under the model's ``fusion.``.
    """

    def attach(self, lm: nn.Module, media_width: int) -> None:
        """Called once by the model, right after it has built the LM: create what depends on it; default nothing.

        Args:
            lm: the transformers causal LM (possibly a peft model).
            media_width: width D of the media tokens (the connectors map to the LM's hidden size).
        """

    @abstractmethod
    def fuse(self, lm: nn.Module, input_ids: Tensor, attention_mask: Tensor, media: MediaTokens, media_token_id: int,
             labels: Tensor | None = None,
             padding_side: Literal["right", "left"] = "right") -> AbstractContextManager[FusedInputs]:
        """``with fusion.fuse(...) as fused: lm(**fields)`` or ``lm.generate(...)``: the LM's inputs for text
        with media, valid for the LM calls made inside the block (every step of a cached generation included).

        Args:
            lm: the LM the model calls (``lm.get_input_embeddings()`` embeds the text).
            input_ids: (B, S) token ids with one ``media_token_id`` placeholder per present medium.
            attention_mask: (B, S) 1 for tokens, 0 for padding.
            media: the batch's media tokens (B, M, T, D).
            media_token_id: id of the placeholder token.
            labels: (B, S) labels of the text (-100 for the prompt and padding), or None.
            padding_side: where rows are padded if the fusion changes their lengths: ``right`` for a forward pass,
                ``left`` for ``generate`` (which continues every row after the last column).

        Raises:
            DataError: a row's placeholder count differs from its number of present media.
        """
