from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import TINY_CLIP
from torch.utils.data import DataLoader

from mmclin.errors import ConfigError
from mmclin.models import clip
from mmclin.models.clip import MAX_LOGIT_SCALE, CLIPModule
from mmclin.tasks.zero_shot import zero_shot_classifier


def _batch(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "text": torch.randint(1, 49000, (n, 16), generator=g)}


def test_loss_is_symmetric_cross_entropy_over_the_batch():
    module = CLIPModule(model_config=TINY_CLIP)
    module.configure_loss()
    batch = _batch()
    loss = module.contrastive_loss(batch["image"], batch["text"])
    image, text = module.encode(batch["image"], batch["text"])
    logits = module.model.logit_scale.exp() * image @ text.T
    target = torch.arange(4)
    expected = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target))
    torch.testing.assert_close(loss, expected / 2)


def test_logit_scale_is_clamped_after_each_step():
    module = CLIPModule(model_config=TINY_CLIP)
    with torch.no_grad():
        module.model.logit_scale.fill_(10.0)
    module.on_train_batch_end(None, None, 0)
    assert module.model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)
    assert math.exp(module.model.logit_scale.item()) == pytest.approx(100)


def test_siglip_needs_a_logit_bias():
    with pytest.raises(ConfigError, match="init_logit_bias"):
        CLIPModule(model_config=TINY_CLIP, loss="siglip")
    module = CLIPModule(model_config={**TINY_CLIP, "init_logit_bias": -10.0}, loss="siglip")
    module.configure_loss()
    assert torch.isfinite(module.contrastive_loss(**{"images": _batch()["image"], "texts": _batch()["text"]}))


def test_unknown_model_name_and_missing_checkpoint_are_explained(tmp_path):
    with pytest.raises(RuntimeError, match="not found"):
        CLIPModule(model_name="No-Such-CLIP")
    with pytest.raises(FileNotFoundError, match="only local files"):
        CLIPModule(model_config=TINY_CLIP, pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConfigError, match="exactly one"):
        CLIPModule()


def test_registry_model_builds_offline():
    module = CLIPModule(model_name="ViT-B-32")
    assert tuple(module.preprocess_cfg["size"]) == (224, 224)
    assert sum(p.numel() for p in module.model.parameters()) > 100_000_000


def test_zero_shot_classes_are_built_once_per_split_end(monkeypatch, tmp_path):
    module = CLIPModule(model_config=TINY_CLIP, classnames=["melanoma", "nevus"], templates=["a photo of {}."])
    built = []
    monkeypatch.setattr(clip, "zero_shot_classifier", lambda *args, **kw: built.append(1) or zero_shot_classifier(
        *args, **kw))
    label = torch.tensor([0, 1, 0, 1])
    loader = DataLoader([_batch(4, seed) | {"label": label} for seed in range(2)], batch_size=None)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    (val,) = trainer.validate(module, loader)
    assert len(built) == 1 and (tmp_path / "plots").is_dir()  # the figures used the same class embeddings
    with torch.no_grad():
        image = torch.cat([module.encode(b["image"])[0] for b in loader])
        predicted = (image @ module.zero_shot_classes()).argmax(1)
    assert val["val/zs_acc"] == pytest.approx(float((predicted == label.repeat(2)).float().mean()))
    built.clear()
    (test,) = trainer.test(module, loader)
    assert len(built) == 1 and "test/zs_bacc" in test
