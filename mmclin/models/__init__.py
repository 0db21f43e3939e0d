"""Lightning modules, one per file."""

from mmclin.models.clip import CLIPModule
from mmclin.models.mllm import MultimodalLM

__all__ = ["CLIPModule", "MultimodalLM"]
