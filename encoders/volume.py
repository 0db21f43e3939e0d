"""3D encoders for CT volumes: a MONAI ViT with 3D patches, and MONAI 3D ResNets/DenseNets.

Both map ``volume`` (B, C, D, H, W) to an :class:`EncoderOutput`: tokens (B, T, out_dim) in row-major
(depth, height, width) grid order, pooled (B, out_dim) = the mean token, an all-True mask and a channel_index of
-1. M3D (Bai et al. 2024) encodes 32 x 256 x 256 CT with a ViT of 4 x 16 x 16 patches (2048 tokens) and pools them
2 x 2 x 2 to 256 with :class:`mmclin.fusion.pooling.SpatialPoolProjector`; MedicalNet (Chen et al. 2019,
"Med3D") pretrained the 3D ResNets whose weights :class:`ResNet3DEncoder` loads.

Pretrained weights come from a local file only. Loading is non-strict so that heads the encoder does not use (a
classification head, MedicalNet's segmentation ``conv_seg``) can stay in the file: missing and unexpected keys are
logged, and a file that matches no weight at all is a :class:`~mmclin.errors.DataError`.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets import ViT
from monai.networks.nets.densenet import DenseNet121, DenseNet169, DenseNet201
from monai.networks.nets.resnet import ResNetFeatures
from torch import nn

from encoders.image2d import ImageBackboneEncoder, image_output, read_weights, report_key_match
from mmclin.contracts import EncoderOutput
from mmclin.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_DENSENETS = {"densenet121": DenseNet121, "densenet169": DenseNet169, "densenet201": DenseNet201}


def load_local_weights(model: nn.Module, path: str, prefix: str = "") -> tuple[list[str], list[str]]:
    """Load a local weights file into ``model`` non-strictly and report what did not match.

    Keys are read with timm's loader, which unwraps ``state_dict``/``model`` entries (MedicalNet keeps its weights
    under ``state_dict``) and strips DataParallel's ``module.`` prefix; then only keys under ``prefix`` are kept,
    with it removed (``encoders.volume.backbone.`` for an encoder inside one of our Lightning checkpoints).

    Args:
        model: the module whose own keys the file should hold (a MONAI network).
        path: ``.safetensors``, ``.pth``/``.pt``/``.ckpt`` (loaded with ``weights_only=True``).
        prefix: key prefix to select and strip; empty keeps every key.

    Returns:
        (missing_keys, unexpected_keys) as torch's ``load_state_dict`` names them. Raises DataError when no key
        matches, and torch's RuntimeError when a key matches with another shape (a different architecture).
    """
    state_dict = read_weights(path)
    if prefix:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not state_dict:
            raise DataError(f"{path}: no weight has the prefix '{prefix}'")
    n_matched = report_key_match(path, list(state_dict), list(model.state_dict()), type(model).__name__)
    result = model.load_state_dict(state_dict, strict=False)
    log.info("%s: loaded %d weights into %s", path, n_matched, type(model).__name__)
    if result.missing_keys:
        log.warning("%s: %d weights not in the file keep their initial values: %s", path, len(result.missing_keys),
                    _shorten(result.missing_keys))
    if result.unexpected_keys:
        log.warning("%s: %d weights of the file are not used: %s", path, len(result.unexpected_keys),
                    _shorten(result.unexpected_keys))
    return result.missing_keys, result.unexpected_keys


def _shorten(keys: list[str], n: int = 10) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


class ViT3DEncoder(ImageBackboneEncoder):
    """MONAI's ViT on 3D patches (no class token): the patch tokens after the final LayerNorm, and their mean.

    With ``stem_channels``, stride-2 3x3x3 convolutions (MONAI ``Convolution``: conv, instance norm, GELU) run
    before the ViT, which then embeds patches of their feature map; the token grid stays ``img_size / patch_size``.
    Such an early-convolution stem makes ViTs train more easily and see small structures that a linear patch
    embedding of a 512-voxel patch misses (Xiao et al. 2021, "Early convolutions help transformers see better").
    """

    def __init__(
        self,
        img_size: tuple[int, int, int] = (32, 256, 256),
        patch_size: tuple[int, int, int] = (4, 16, 16),
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        in_channels: int = 1,
        stem_channels: tuple[int, ...] = (),
        proj_type: Literal["conv", "perceptron"] = "conv",
        pos_embed_type: Literal["learnable", "sincos", "none"] = "learnable",
        qkv_bias: bool = False,
        dropout: float = 0.0,
        use_sdpa: bool = True,
        pretrained_path: str | None = None,
        state_dict_prefix: str = "",
        freeze: bool = False,
    ):
        """
        Args:
            img_size: input (D, H, W) in voxels; the position embedding is built for exactly this size.
            patch_size: patch (D, H, W) in voxels; must divide ``img_size``.
            hidden_size: token width.
            mlp_dim: width of each block's MLP.
            num_layers: transformer blocks.
            num_heads: attention heads; must divide ``hidden_size``.
            in_channels: image channels (1 for CT).
            stem_channels: widths of stride-2 convolutions before the ViT, e.g. ``[16, 32]``; each halves the
                feature map, so ``patch_size`` must be divisible by ``2 ** len(stem_channels)``. Empty: none.
            proj_type: patch embedding: ``conv`` or ``perceptron`` (patch flattening + linear, M3D's choice).
            pos_embed_type: ``learnable``, fixed ``sincos`` or ``none``.
            qkv_bias: bias in the attention's qkv projection.
            dropout: dropout in patch embedding, attention and MLP.
            use_sdpa: attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels)
                instead of an explicit attention matrix; same result.
            pretrained_path: local weights of a MONAI ViT (see :func:`load_local_weights`).
            state_dict_prefix: key prefix of the ViT's weights in that file, stripped on load.
            freeze: no gradients into the ViT, kept in eval mode.
        """
        super().__init__()
        if len(img_size) != 3 or len(patch_size) != 3:
            raise ConfigError(f"img_size and patch_size need 3 entries (D, H, W), got {img_size} and {patch_size}")
        if any(i % p for i, p in zip(img_size, patch_size)):
            raise ConfigError(f"patch_size {tuple(patch_size)} must divide img_size {tuple(img_size)}")
        stride = 2 ** len(stem_channels)
        if stem_channels and pretrained_path is not None:
            raise ConfigError("stem_channels with pretrained_path: a pretrained MONAI ViT has no convolution stem, "
                             "which would start random in front of it; use one or the other")
        if any(p % stride for p in patch_size):
            raise ConfigError(f"patch_size {tuple(patch_size)} must be divisible by {stride}, the downsampling of "
                             f"stem_channels {list(stem_channels)}")
        self.img_size, self.patch_size = tuple(img_size), tuple(patch_size)
        self.in_channels, self.dropout = in_channels, dropout
        widths = [in_channels, *stem_channels]
        self.stem = nn.Sequential(*(Convolution(3, c_in, c_out, strides=2, kernel_size=3, act="GELU", norm="INSTANCE")
                                    for c_in, c_out in zip(widths, widths[1:])))
        self.backbone = ViT(widths[-1], [i // stride for i in img_size], [p // stride for p in patch_size],
                            hidden_size, mlp_dim, num_layers, num_heads, proj_type=proj_type,
                            pos_embed_type=pos_embed_type, classification=False, dropout_rate=dropout,
                            spatial_dims=3, qkv_bias=qkv_bias)
        # MONAI's ViT does not pass use_flash_attention on to its blocks (MONAI 1.6); the SABlock reads it at run
        # time, and its SDPA branch is exact for this block (no saved attention, no relative positions).
        self.use_sdpa = use_sdpa
        for block in self.backbone.blocks:
            block.attn.use_flash_attention = use_sdpa
        self.out_dim = hidden_size
        if pretrained_path is not None:
            load_local_weights(self.backbone, pretrained_path, state_dict_prefix)
        if freeze:
            self.stem.requires_grad_(False)
            self.freeze_backbone()

    @property
    def grid(self) -> tuple[int, int, int]:
        """Patch grid (D / pd, H / ph, W / pw); the token count is its product."""
        return tuple(i // p for i, p in zip(self.img_size, self.patch_size))

    def forward(self, volume: torch.Tensor, lengths: torch.Tensor | None = None) -> EncoderOutput:
        """
        Args:
            volume: (B, in_channels, *img_size) float, intensities as the model was trained on (e.g. HU windowed
                and scaled to [0, 1]).
            lengths: ignored (every volume fills the grid); accepted for the batch collator's interface.

        Returns:
            EncoderOutput with tokens (B, prod(grid), hidden_size).
        """
        expected = (self.in_channels, *self.img_size)
        if volume.ndim != 5 or tuple(volume.shape[1:]) != expected:
            raise ValueError(f"volume must be (B, {', '.join(map(str, expected))}), got {tuple(volume.shape)}")
        if self.use_sdpa and self.dropout:
            # MONAI's SDPA branch applies attention dropout in eval mode too: switch it with the block's mode.
            for block in self.backbone.blocks:
                block.attn.dropout_rate = self.dropout if block.training else 0.0
        # MONAI returns (tokens after the final norm, per-block hidden states)
        tokens, _ = self.backbone(self.stem(volume))
        return image_output(tokens)


class ResNet3DEncoder(ImageBackboneEncoder):
    """A MONAI 3D CNN's last feature map as tokens: (B, C', d, h, w) -> (B, d * h * w, C'); pooled = global mean.

    ResNets are MONAI's ``ResNetFeatures``, built as MedicalNet was (stride-2 stem, shortcut type and downsample
    bias per depth), so MedicalNet files load as they are. The token grid is the input size / 32, rounded up, per
    axis; for DenseNets the transitions round down.
    """

    def __init__(
        self,
        arch: Literal["resnet10", "resnet18", "resnet34", "resnet50", "densenet121", "densenet169",
                      "densenet201"] = "resnet18",
        in_channels: int = 1,
        pretrained_path: str | None = None,
        state_dict_prefix: str = "",
        freeze: bool = False,
    ):
        """
        Args:
            arch: network; ResNets up to ``resnet50`` (MedicalNet depths) or MONAI DenseNets.
            in_channels: image channels (1 for CT; MedicalNet weights are single-channel).
            pretrained_path: local weights: a MedicalNet ``resnet_*.pth`` or a MONAI network's state dict (see
                :func:`load_local_weights`; classifier and segmentation heads are reported as unused).
            state_dict_prefix: key prefix of the network's weights in that file, stripped on load.
            freeze: no gradients into the network, kept in eval mode (BatchNorm statistics fixed).
        """
        super().__init__()
        self.arch = arch
        if arch in _DENSENETS:
            self.backbone = _DENSENETS[arch](spatial_dims=3, in_channels=in_channels, out_channels=1)
            self.out_dim = self.backbone.class_layers.out.in_features
            # Only the feature extractor runs; the classifier would be a parameter without gradient.
            self.backbone.class_layers = nn.Identity()
        elif arch.startswith("resnet"):
            self.backbone = ResNetFeatures(arch, pretrained=False, spatial_dims=3, in_channels=in_channels)
            self.out_dim = self.backbone.in_planes  # width of the last stage
        else:
            raise ConfigError(f"arch must be one of resnet10/18/34/50 or {sorted(_DENSENETS)}, got {arch!r}")
        if pretrained_path is not None:
            load_local_weights(self.backbone, pretrained_path, state_dict_prefix)
        if freeze:
            self.freeze_backbone()

    def feature_map(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> the last feature map (B, out_dim, d, h, w), before global pooling."""
        if self.arch in _DENSENETS:
            return F.relu(self.backbone.features(volume))  # DenseNet applies its last ReLU in the classifier
        return self.backbone(volume)[-1]  # ResNetFeatures returns the stem's and every stage's output

    def forward(self, volume: torch.Tensor, lengths: torch.Tensor | None = None) -> EncoderOutput:
        """
        Args:
            volume: (B, C, D, H, W) float, any size.
            lengths: ignored; accepted for the batch collator's interface.

        Returns:
            EncoderOutput with tokens (B, d * h * w, out_dim).
        """
        if volume.ndim != 5:
            raise ValueError(f"volume must be (B, C, D, H, W), got shape {tuple(volume.shape)}")
        return image_output(self.feature_map(volume).flatten(2).transpose(1, 2))
