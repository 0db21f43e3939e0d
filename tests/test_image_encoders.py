"""Image encoders (3D CT ViT/ResNet, timm, open_clip visual tower) and the spatial pooling connector, on tiny
random-init models."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import lightning as L
import pytest
import timm
import torch
from conftest import TINY_CLIP
from jsonargparse import ArgumentParser
from monai.networks.nets import DenseNet
from safetensors.torch import save_file
from torch import nn

import encoders.volume as volume_module
from encoders.image2d import OpenCLIPVisualEncoder, TimmImageEncoder
from encoders.volume import ResNet3DEncoder, ViT3DEncoder
from mmclin.errors import DataError
from mmclin.fusion.pooling import SpatialPoolProjector, spatial_pool
from mmclin.models.clip import CLIPModule

TINY_VIT3D = dict(img_size=(16, 32, 32), patch_size=(4, 8, 8), hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2)


def _assert_image_output(out, batch: int, n_tokens: int, width: int) -> None:
    assert out.tokens.shape == (batch, n_tokens, width) and out.pooled.shape == (batch, width)
    assert out.mask.dtype == torch.bool and out.mask.shape == (batch, n_tokens) and bool(out.mask.all())
    assert out.channel_index.tolist() == [-1] * n_tokens


# -- 3D ViT --------------------------------------------------------------------------------------------------
def test_vit3d_gives_one_token_per_patch_and_their_mean():
    torch.manual_seed(0)
    encoder = ViT3DEncoder(**TINY_VIT3D)
    assert encoder.grid == (4, 4, 4) and encoder.out_dim == 32
    volume = torch.randn(2, 1, 16, 32, 32)
    out = encoder(volume, lengths=torch.tensor([32, 32]))  # lengths are ignored for images
    _assert_image_output(out, 2, 64, 32)
    torch.testing.assert_close(out.pooled, out.tokens.mean(1))
    out.pooled.sum().backward()
    assert encoder.backbone.patch_embedding.patch_embeddings.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 32, 32\)"):
        encoder(torch.randn(2, 1, 16, 32, 24))


def test_vit3d_sdpa_matches_explicit_attention_and_is_deterministic_in_eval():
    torch.manual_seed(0)
    fast = ViT3DEncoder(**TINY_VIT3D, dropout=0.3, use_sdpa=True).eval()
    slow = ViT3DEncoder(**TINY_VIT3D, dropout=0.3, use_sdpa=False).eval()
    slow.load_state_dict(fast.state_dict())
    assert all(block.attn.use_flash_attention for block in fast.backbone.blocks)
    volume = torch.randn(2, 1, 16, 32, 32)
    first = fast(volume).tokens
    torch.testing.assert_close(first, slow(volume).tokens)
    torch.testing.assert_close(first, fast(volume).tokens)  # no attention dropout in eval mode
    fast.train()
    assert not torch.allclose(fast(volume).tokens, first)


def test_vit3d_tokens_are_row_major_on_the_patch_grid():
    # Without blocks a token is its own patch's embedding: the order SpatialPoolProjector relies on shows.
    encoder = ViT3DEncoder(**{**TINY_VIT3D, "num_layers": 0}).eval()
    volume = torch.randn(1, 1, 16, 32, 32)
    changed = volume.clone()
    changed[..., 4:8, 16:24, 24:32] += 1  # the patch at grid (d, h, w) = (1, 2, 3)
    moved = (encoder(changed).tokens - encoder(volume).tokens).abs().sum(-1)[0]
    assert moved.nonzero().flatten().tolist() == [1 * 16 + 2 * 4 + 3]


def test_vit3d_with_a_convolution_stem_keeps_the_token_grid():
    encoder = ViT3DEncoder(**TINY_VIT3D, stem_channels=(4, 8))
    assert encoder.grid == (4, 4, 4) and len(encoder.stem) == 2
    out = encoder(torch.randn(2, 1, 16, 32, 32))
    _assert_image_output(out, 2, 64, 32)
    out.pooled.sum().backward()
    assert encoder.stem[0].conv.weight.grad.abs().sum() > 0
    # the token at grid (d, h, w) still sees its own patch first: a change there moves it most
    encoder = ViT3DEncoder(**{**TINY_VIT3D, "num_layers": 0}, stem_channels=(4,)).eval()
    volume = torch.randn(1, 1, 16, 32, 32)
    changed = volume.clone()
    changed[..., 4:8, 16:24, 24:32] += 1
    moved = (encoder(changed).tokens - encoder(volume).tokens).abs().sum(-1)[0]
    assert int(moved.argmax()) == 1 * 16 + 2 * 4 + 3
    with pytest.raises(ValueError, match="divisible by 8"):
        ViT3DEncoder(**{**TINY_VIT3D, "patch_size": (4, 8, 8)}, stem_channels=(4, 8, 8))
    with pytest.raises(ValueError, match="no convolution stem"):
        ViT3DEncoder(**TINY_VIT3D, stem_channels=(4,), pretrained_path="weights.pt")
    frozen = ViT3DEncoder(**TINY_VIT3D, stem_channels=(4,), freeze=True)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_frozen_encoder_has_no_trainable_weights_and_stays_in_eval():
    encoder = ViT3DEncoder(**TINY_VIT3D, freeze=True)
    encoder.train()
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not any(m.training for m in encoder.backbone.modules())


def test_vit3d_tokens_pool_to_an_eighth_through_the_connector():
    encoder = ViT3DEncoder(**TINY_VIT3D)
    connector = SpatialPoolProjector(encoder.out_dim, 48, grid=encoder.grid, kernel=2)
    out = encoder(torch.randn(2, 1, 16, 32, 32))
    tokens, mask = connector(out.tokens, out.mask)
    assert tokens.shape == (2, 8, 48) and mask.shape == (2, 8) and bool(mask.all())
    assert connector.out_grid == (2, 2, 2)


# -- spatial pooling ---------------------------------------------------------------------------------------
def test_spatial_pool_averages_each_2x2x2_block():
    tokens = torch.randn(2, 64, 3)
    pooled = spatial_pool(tokens, (4, 4, 4), (2, 2, 2))
    assert pooled.shape == (2, 8, 3)
    grid = tokens.view(2, 4, 4, 4, 3)  # row-major (d, h, w)
    for d in range(2):
        for h in range(2):
            for w in range(2):
                block = grid[:, 2 * d:2 * d + 2, 2 * h:2 * h + 2, 2 * w:2 * w + 2].reshape(2, 8, 3).mean(1)
                torch.testing.assert_close(pooled[:, d * 4 + h * 2 + w], block)
    # with a single identity linear map the connector returns exactly the block means
    connector = SpatialPoolProjector(3, 3, grid=[4, 4, 4], kernel=2, mlp=False)
    linear = connector.proj.mlp[0]
    with torch.no_grad():
        linear.weight.copy_(torch.eye(3))
        linear.bias.zero_()
    out, mask = connector(tokens, torch.ones(2, 64, dtype=torch.bool))
    torch.testing.assert_close(out, pooled)
    assert mask.shape == (2, 8) and bool(mask.all())


def test_spatial_pool_on_2d_grids_and_per_axis_kernels():
    tokens = torch.arange(16.0).view(1, 16, 1)  # a 4 x 4 grid numbered row by row
    assert spatial_pool(tokens, (4, 4), (2, 2)).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    connector = SpatialPoolProjector(8, 4, grid=(2, 4, 4), kernel=(1, 2, 2))
    out, _ = connector(torch.randn(3, 32, 8))
    assert out.shape == (3, 8, 4) and connector.out_grid == (2, 2, 2)


def test_spatial_pool_rejects_tokens_that_do_not_fill_the_grid():
    connector = SpatialPoolProjector(8, 4, grid=(4, 4, 4))
    with pytest.raises(ValueError, match=r"63 tokens.*\(4, 4, 4\).*64"):
        connector(torch.randn(1, 63, 8))
    with pytest.raises(ValueError, match="padded"):
        connector(torch.randn(1, 64, 8), torch.arange(64)[None] < 60)
    with pytest.raises(ValueError, match="divide"):
        SpatialPoolProjector(8, 4, grid=(3, 4, 4), kernel=2)


def test_spatial_pool_connector_builds_from_a_config_as_the_mllm_does():
    parser = ArgumentParser()
    parser.add_argument("--connector", type=Callable[[int, int], nn.Module])
    config = parser.parse_object({"connector": {"class_path": "mmclin.fusion.pooling.SpatialPoolProjector",
                                                "init_args": {"grid": [8, 16, 16], "kernel": 2}}})
    build = parser.instantiate(config).connector
    connector = build(32, 64)  # MultimodalLM calls it with (encoder width, LM width)
    assert (connector.in_dim, connector.out_dim, connector.grid, connector.n_tokens) == (32, 64, (8, 16, 16), 256)


# -- 3D ResNet ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet10() -> ResNet3DEncoder:
    torch.manual_seed(0)
    return ResNet3DEncoder("resnet10").eval()


@torch.no_grad()
def test_resnet3d_tokens_are_the_last_feature_map(resnet10):
    volume = torch.randn(2, 1, 2, 16, 64)
    out = resnet10(volume)
    _assert_image_output(out, 2, 2, 512)  # grid ceil((2, 16, 64) / 32) = (1, 1, 2)
    feature_map = resnet10.backbone(volume)[-1]
    torch.testing.assert_close(out.tokens[:, 1], feature_map[:, :, 0, 0, 1])
    torch.testing.assert_close(out.pooled, feature_map.mean((2, 3, 4)))


@torch.no_grad()
def test_densenet3d_tokens_follow_its_last_relu(monkeypatch):
    # A full DenseNet121 takes seconds per 3D forward on a CPU; the same class with one transition does not.
    tiny = functools.partial(DenseNet, init_features=8, growth_rate=4, block_config=(1, 1))
    monkeypatch.setitem(volume_module._DENSENETS, "densenet121", tiny)
    encoder = ResNet3DEncoder("densenet121").eval()
    assert encoder.out_dim == (8 + 4) // 2 + 4  # block 1 adds 4 channels, the transition halves, block 2 adds 4
    assert not any("class_layers" in name for name, _ in encoder.named_parameters())
    volume = torch.randn(2, 1, 16, 16, 32)
    out = encoder(volume)
    _assert_image_output(out, 2, 2 * 2 * 4, 10)  # stem and pool /4, one transition /2
    feature_map = torch.relu(encoder.backbone.features(volume))
    torch.testing.assert_close(out.tokens[:, 5], feature_map[:, :, 0, 1, 1])  # (d, h, w) = (0, 1, 1)
    assert bool((out.tokens >= 0).all())


@torch.no_grad()
def test_resnet3d_loads_medicalnet_style_weights(resnet10, tmp_path, caplog):
    weights = {f"module.{k}": v for k, v in resnet10.backbone.state_dict().items()}
    weights["module.conv_seg.0.weight"] = torch.zeros(1)  # MedicalNet's segmentation head, unused here
    path = tmp_path / "resnet_10.pth"
    torch.save({"state_dict": weights}, path)
    with caplog.at_level(logging.WARNING, logger="encoders.volume"):
        loaded = ResNet3DEncoder("resnet10", pretrained_path=str(path)).eval()
    assert "1 weights of the file are not used: conv_seg.0.weight" in caplog.text
    volume = torch.randn(2, 1, 2, 16, 64)
    torch.testing.assert_close(loaded(volume).tokens, resnet10(volume).tokens)


def test_resnet3d_loads_from_a_prefixed_checkpoint_and_explains_mismatches(resnet10, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({f"encoders.volume.backbone.{k}": v.contiguous() for k, v in resnet10.backbone.state_dict().items()},
              path)
    loaded = ResNet3DEncoder("resnet10", pretrained_path=str(path), state_dict_prefix="encoders.volume.backbone.",
                             freeze=True)
    torch.testing.assert_close(loaded.backbone.conv1.weight, resnet10.backbone.conv1.weight)
    with pytest.raises(DataError, match="model.safetensors: none of its .* weights matches"):
        ResNet3DEncoder("resnet10", pretrained_path=str(path))  # the prefix was not stripped
    with pytest.raises(FileNotFoundError, match="only local files"):
        ResNet3DEncoder("resnet10", pretrained_path=str(tmp_path / "missing.pth"))


# -- timm --------------------------------------------------------------------------------------------------
TINY_TIMM_VIT = {"depth": 1, "reg_tokens": 2}  # class token + 2 register tokens precede the patch tokens


def test_timm_vit_drops_prefix_tokens_and_pools_the_class_token():
    encoder = TimmImageEncoder("vit_tiny_patch16_224", img_size=32, model_kwargs=TINY_TIMM_VIT)
    assert encoder.grid == (2, 2) and encoder.num_prefix_tokens == 3
    images = torch.randn(2, 3, 32, 32)
    out = encoder(images)
    _assert_image_output(out, 2, 4, 192)
    features = encoder.backbone.forward_features(images)
    torch.testing.assert_close(out.tokens, features[:, 3:])
    torch.testing.assert_close(out.pooled, features[:, 0])
    out.tokens.sum().backward()
    assert encoder.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def test_timm_vit_loads_a_local_checkpoint_the_timm_way(tmp_path):
    reference = timm.create_model("vit_tiny_patch16_224", img_size=32, **TINY_TIMM_VIT).eval()  # with its head
    path = tmp_path / "model.safetensors"
    save_file(reference.state_dict(), path)
    encoder = TimmImageEncoder("vit_tiny_patch16_224", pretrained_path=str(path), img_size=32,
                               model_kwargs=TINY_TIMM_VIT).eval()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(encoder(images).tokens, reference.forward_features(images)[:, 3:])
    # a larger input: timm resamples the position embedding from the checkpoint's 2 x 2 grid
    larger = TimmImageEncoder("vit_tiny_patch16_224", pretrained_path=str(path), img_size=48,
                              model_kwargs=TINY_TIMM_VIT)
    assert larger.grid == (3, 3) and larger(torch.randn(1, 3, 48, 48)).tokens.shape == (1, 9, 192)
    torch.testing.assert_close(larger.backbone.cls_token, reference.cls_token)
    save_file({"backbone.cls_token": reference.cls_token.detach()}, tmp_path / "other.safetensors")
    with pytest.raises(DataError, match="other.safetensors: none of its 1 weights"):
        TimmImageEncoder("vit_tiny_patch16_224", pretrained_path=str(tmp_path / "other.safetensors"), img_size=32,
                         model_kwargs=TINY_TIMM_VIT)


@torch.no_grad()
def test_timm_cnn_flattens_its_feature_map_row_major():
    encoder = TimmImageEncoder("resnet18", img_size=64).eval()
    assert encoder.grid == (2, 2) and encoder.out_dim == 512
    images = torch.randn(2, 3, 64, 64)
    out = encoder(images)
    _assert_image_output(out, 2, 4, 512)
    feature_map = encoder.backbone.forward_features(images)
    torch.testing.assert_close(out.tokens[:, 1], feature_map[:, :, 0, 1])  # row 0, column 1
    torch.testing.assert_close(out.tokens[:, 2], feature_map[:, :, 1, 0])
    torch.testing.assert_close(out.pooled, feature_map.mean((2, 3)))  # global average pool


# -- open_clip visual tower -----------------------------------------------------------------------------------
def test_open_clip_visual_encoder_from_our_clip_checkpoint(tmp_path):
    module = CLIPModule(model_config=TINY_CLIP)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    path = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(path)
    encoder = OpenCLIPVisualEncoder(checkpoint=str(path))
    encoder.train()
    assert encoder.grid == (4, 4) and encoder.out_dim == 32  # image 32, patch 8
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.backbone.training
    images = torch.randn(2, 3, 32, 32)
    out = encoder(images)
    _assert_image_output(out, 2, (32 // 8) ** 2, 32)
    # the same patch tokens as open_clip's own intermediate-feature API (final LayerNorm, class token split off)
    visual = module.model.visual.eval()
    expected = visual.forward_intermediates(images, indices=1, normalize_intermediates=True, output_fmt="NLC",
                                            intermediates_only=True)["image_intermediates"][0]
    torch.testing.assert_close(out.tokens, expected)
    torch.testing.assert_close(out.pooled, expected.mean(1))


def test_open_clip_visual_encoder_from_a_config_trains_and_needs_one_source():
    encoder = OpenCLIPVisualEncoder(model_config=TINY_CLIP, freeze=False)
    encoder(torch.randn(1, 3, 32, 32)).pooled.sum().backward()
    assert encoder.backbone.conv1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="exactly one"):
        OpenCLIPVisualEncoder(model_name="ViT-B-32", model_config=TINY_CLIP)
