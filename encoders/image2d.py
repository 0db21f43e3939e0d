"""2D image encoders (fundus and dermatology photographs): any timm model, or an open_clip visual tower.

Both map ``images`` (B, C, H, W), normalised as their backbone expects, to an :class:`EncoderOutput`: patch tokens
(B, T, D) in row-major grid order (T = grid height x grid width), pooled (B, D), an all-True mask and a
channel_index of -1. :class:`ImageBackboneEncoder` (freezing) and :func:`image_output` are shared with the volume
encoders.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from open_clip.transformer import VisionTransformer
from timm.models import load_state_dict
from torch import nn

from mmclin.contracts import Encoder, EncoderOutput
from mmclin.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def image_output(tokens: torch.Tensor, pooled: torch.Tensor | None = None) -> EncoderOutput:
    """EncoderOutput for a grid of tokens (B, T, D): every token valid, none tied to one channel.

    ``pooled`` (B, D) defaults to the mean token.
    """
    mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    channel_index = torch.full((tokens.shape[1],), -1, dtype=torch.long, device=tokens.device)
    return EncoderOutput(tokens, tokens.mean(1) if pooled is None else pooled, mask, channel_index)


def check_weights_file(path: str) -> Path:
    """``path`` as a Path when it is an existing local file; FileNotFoundError otherwise."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"pretrained weights '{path}' not found (only local files are loaded)")
    return Path(path)


def read_weights(path: str) -> dict:
    """The state dict of a local weights file, read by timm's loader (``weights_only=True`` for pickles).

    Raises:
        CheckpointError: the file cannot be read, or its pickle holds objects other than tensors (refused, as for
            checkpoints: see :func:`mmclin.checkpoints.load_refusal`).
    """
    from mmclin.checkpoints import load_refusal

    file = check_weights_file(path)
    try:
        return load_state_dict(str(file))
    except Exception as err:  # noqa: BLE001 -- garbage bytes can fail anywhere in the unpickler or safetensors
        raise load_refusal(file, err) from None


def report_key_match(path: str, checkpoint_keys: Sequence[str], model_keys: Sequence[str], owner: str) -> int:
    """Number of checkpoint keys the model has; a DataError naming the file when there are none."""
    matched = set(checkpoint_keys) & set(model_keys)
    if not matched:
        raise DataError(f"{path}: none of its {len(checkpoint_keys)} weights matches {owner} (checkpoint keys start "
                        f"{sorted(checkpoint_keys)[:3]}, the model's {sorted(model_keys)[:3]}); wrong architecture, "
                        "or a key prefix to strip?")
    return len(matched)


class ImageBackboneEncoder(Encoder):
    """Base of the image and volume encoders: a ``backbone`` module, optionally frozen.

    A frozen backbone has no trainable parameter and stays in eval mode whatever ``train()`` is asked, so its
    BatchNorm statistics and dropout do not change while the rest of a model trains.
    """

    backbone: nn.Module
    out_dim: int
    frozen: bool = False

    def freeze_backbone(self) -> None:
        """Stop gradients into the backbone and keep it in eval mode."""
        self.backbone.requires_grad_(False)
        self.frozen = True
        self.backbone.eval()

    def train(self, mode: bool = True) -> ImageBackboneEncoder:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self


class TimmImageEncoder(ImageBackboneEncoder):
    """Any timm model as a token encoder: ``forward_features`` gives the tokens, ``forward_head`` the pooled vector.

    ViT-style models (those with ``num_prefix_tokens``) drop their class/register tokens; CNN feature maps
    (B, C, h, w), or (B, h, w, C) for NHWC models such as Swin, are flattened row-major. ``pooled`` is
    ``forward_head(pre_logits=True)`` (class token or global pool, as the model was built), or the mean token for
    the few models whose pre-logits width differs from the token width (e.g. MobileNetV3's conv head).
    """

    def __init__(
        self,
        model_name: str,
        pretrained_path: str | None = None,
        img_size: int | tuple[int, int] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        freeze: bool = False,
    ):
        """
        Args:
            model_name: timm architecture name (``vit_base_patch16_224``, ``resnet50``, ``convnext_tiny``...).
            pretrained_path: local weights file (``.safetensors``/``.pth``/``.bin``, timm key layout, e.g. a timm Hub
                repo's ``model.safetensors``). Loaded the timm way (``pretrained_cfg_overlay``): the classifier is
                dropped, a ViT's position embedding is resampled to ``img_size``, the stem adapted to ``in_chans``.
            img_size: input size for models built for one (ViT position embeddings); CNNs take any size, and for
                them it only sets :attr:`grid`. None: the architecture's default.
            model_kwargs: further ``timm.create_model`` arguments (``depth``, ``in_chans``, ``drop_path_rate``,
                ``global_pool``...).
            freeze: no gradients into the model, kept in eval mode.
        """
        super().__init__()
        kwargs = dict(model_kwargs or {})
        for reserved in ("pretrained", "num_classes", "img_size", "pretrained_cfg_overlay"):
            if reserved in kwargs:
                raise ConfigError(f"model_kwargs must not set '{reserved}': the encoder sets it")
        state_dict = None
        if pretrained_path is not None:
            # timm's loader unwraps 'state_dict'/'model'/EMA entries and strips DDP 'module.' prefixes.
            state_dict = read_weights(pretrained_path)
            checkpoint_keys = list(state_dict)
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"state_dict": state_dict})
        size_kwargs = {} if img_size is None else {"img_size": img_size}
        try:
            self.backbone = timm.create_model(model_name, num_classes=0, **size_kwargs, **kwargs)
        except TypeError as err:
            if not size_kwargs or "img_size" not in str(err):
                raise
            # CNNs have no img_size argument: any input size works, and img_size then only sets the grid.
            self.backbone = timm.create_model(model_name, num_classes=0, **kwargs)
        if state_dict is not None:
            # timm loads non-strictly once it drops the classifier: make sure the file was not ignored wholesale.
            report_key_match(pretrained_path, checkpoint_keys, list(self.backbone.state_dict()), model_name)
            # The model keeps its pretrained_cfg: let it name the file instead of holding a second copy of the weights.
            self.backbone.pretrained_cfg.update(state_dict=None, file=str(pretrained_path))
        self.model_name = model_name
        self.num_prefix_tokens = getattr(self.backbone, "num_prefix_tokens", 0)
        self.channels_last = str(getattr(self.backbone, "output_fmt", "NCHW")) == "NHWC"
        self.out_dim = self.backbone.num_features
        self.head_pools = getattr(self.backbone, "head_hidden_size", self.out_dim) == self.out_dim
        patch_embed = getattr(self.backbone, "patch_embed", None)
        size = getattr(patch_embed, "img_size", None) or img_size or self.backbone.pretrained_cfg["input_size"][1:]
        self.img_size = tuple(size) if isinstance(size, Sequence) else (size, size)
        if freeze:
            self.freeze_backbone()

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (rows, columns) of an ``img_size`` input: the size over the final feature reduction."""
        reduction = self.backbone.feature_info[-1]["reduction"]
        return tuple(math.ceil(s / reduction) for s in self.img_size)

    def forward(self, images: torch.Tensor, lengths: torch.Tensor | None = None) -> EncoderOutput:
        """
        Args:
            images: (B, C, H, W) float, normalised with the model's mean and std.
            lengths: ignored (every image fills its grid); accepted for the batch collator's interface.

        Returns:
            EncoderOutput with tokens (B, h * w, out_dim) and pooled (B, out_dim).
        """
        if images.ndim != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        features = self.backbone.forward_features(images)
        if features.ndim == 4:
            tokens = features.flatten(1, 2) if self.channels_last else features.flatten(2).transpose(1, 2)
        else:
            tokens = features[:, self.num_prefix_tokens:]
        pooled = self.backbone.forward_head(features, pre_logits=True) if self.head_pools else None
        return image_output(tokens, pooled)


class OpenCLIPVisualEncoder(ImageBackboneEncoder):
    """The visual tower of an open_clip ViT: its patch tokens (after ``ln_post``, at the tower width).

    Built from one of our CLIP checkpoints (a Lightning ``.ckpt`` or an exported open_clip directory), an open_clip
    model name or ``local-dir:PATH``, or an inline config. The tower runs with ``output_tokens=True`` and returns
    (pooled, tokens); ``pooled`` there is the CLIP image embedding at ``embed_dim``, so the output's pooled vector
    is the mean patch token instead, at the token width (use ``CLIPModule.encode`` for CLIP embeddings).
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        model_name: str | None = None,
        model_config: dict | None = None,
        pretrained: str | None = None,
        freeze: bool = True,
    ):
        """
        Args:
            checkpoint: a CLIPModule checkpoint or open_clip export directory (see ``mmclin.models.clip.load_clip``).
            model_name: open_clip registry name (``ViT-B-16``) or ``local-dir:PATH``.
            model_config: inline open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``).
            pretrained: local weights file for the whole CLIP model, with ``model_name`` or ``model_config``.
            freeze: no gradients into the tower, kept in eval mode (open_clip's ``lock``).
        """
        super().__init__()
        # Imported here: mmclin.models pulls in Lightning and the LM stack, which the timm encoder does not need.
        from mmclin.models.clip import load_clip
        from mmclin.models.open_clip_build import build_open_clip

        if sum(x is not None for x in (checkpoint, model_name, model_config)) != 1:
            raise ConfigError("give exactly one of checkpoint, model_name and model_config")
        if checkpoint is not None:
            if pretrained is not None:
                raise ConfigError("pretrained applies to model_name/model_config; a checkpoint carries its weights")
            module = load_clip(checkpoint)
            visual, self.preprocess_cfg = module.model.visual, module.preprocess_cfg
        else:
            parts = build_open_clip(model_name, model_config, pretrained)
            visual, self.preprocess_cfg = parts.model.visual, parts.preprocess_cfg
        if not isinstance(visual, VisionTransformer):
            raise ConfigError(f"OpenCLIPVisualEncoder needs an open_clip VisionTransformer tower, got "
                             f"{type(visual).__name__}; for timm towers use TimmImageEncoder")
        visual.output_tokens = True
        self.backbone = visual
        # Without an attentional pooler and with pool_type 'none', open_clip returns the class token too.
        self.drop_class_token = visual.attn_pool is None and visual.pool_type == "none"
        self.out_dim = visual.ln_post.normalized_shape[0]
        if freeze:
            visual.lock()
            self.freeze_backbone()

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, columns); the token count when the tower has no attentional pooler."""
        return tuple(self.backbone.grid_size)

    def forward(self, images: torch.Tensor, lengths: torch.Tensor | None = None) -> EncoderOutput:
        """
        Args:
            images: (B, 3, H, W) float, preprocessed as ``preprocess_cfg`` says (size, mean, std).
            lengths: ignored; accepted for the batch collator's interface.

        Returns:
            EncoderOutput with tokens (B, rows * columns, out_dim) and their mean as pooled.
        """
        if images.ndim != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        _, tokens = self.backbone(images)
        return image_output(tokens[:, 1:] if self.drop_class_token else tokens)
