"""Lightning modules, one per file."""

from mmclin.models.clip import CLIPModule

__all__ = ["CLIPModule"]
