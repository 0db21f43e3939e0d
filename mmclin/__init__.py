"""mmclin: multimodal clinical models on Lightning, open_clip, MONAI and transformers."""

__version__ = "0.1.0"
