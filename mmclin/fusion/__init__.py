"""Connectors from encoder tokens to a language model's width, and the ways to fuse them into the LM."""

from mmclin.fusion.base import FusedInputs, Fusion, MediaTokens
from mmclin.fusion.cross_attention import CrossAttentionFusion
from mmclin.fusion.pooling import SpatialPoolProjector
from mmclin.fusion.projector import MLPProjector, PerceiverResampler
from mmclin.fusion.soft_prompt import SoftPromptFusion

__all__ = [
    "CrossAttentionFusion",
    "FusedInputs",
    "Fusion",
    "MLPProjector",
    "MediaTokens",
    "PerceiverResampler",
    "SoftPromptFusion",
    "SpatialPoolProjector",
]
