"""Lightning modules, one per file."""

from mmclin.models.clip import CLIPModule
from mmclin.models.mllm import MultimodalLM
from mmclin.models.mmedpo import MMedPO

__all__ = ["CLIPModule", "MMedPO", "MultimodalLM"]
