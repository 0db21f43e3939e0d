"""Connectors from encoder tokens to a language model's width, and the ways to fuse them into the LM."""

from mmclin.fusion.pooling import SpatialPoolProjector
from mmclin.fusion.projector import MLPProjector, PerceiverResampler

__all__ = ["MLPProjector", "PerceiverResampler", "SpatialPoolProjector"]
