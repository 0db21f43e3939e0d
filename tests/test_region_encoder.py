"""RegionEncoder: region statistics match a direct computation, its head learns regions from masks, and through
MultimodalLM a question about which region holds a lesion is learnt."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from encoders.regions import N_REGION_FEATURES, RegionEncoder, region_statistics
from encoders.timeseries import PatchTransformerEncoder
from encoders.volume import ViT3DEncoder
from mmclin.models.mllm import MultimodalLM

TINY_LM = {"tiny": {"hidden_size": 32, "intermediate_size": 64}, "freeze": "none"}


def _vit(size: int = 16) -> ViT3DEncoder:
    return ViT3DEncoder(img_size=(size,) * 3, patch_size=(4, 4, 4), hidden_size=32, mlp_dim=64, num_layers=1,
                        num_heads=2)


def test_region_statistics_match_numpy_on_the_eroded_mask():
    g = torch.Generator().manual_seed(0)
    volume = torch.zeros(1, 1, 10, 10, 10)
    volume[0, 0, 2:8, 2:8, 2:8] = 0.5 + 0.02 * torch.randn(6, 6, 6, generator=g)
    volume[0, 0, 4:6, 4:6, 4:6] = 0.3  # a hypodense focus inside the region
    volume[0, 0, 2, 2:8, 2:8] = 0.2  # partial-volume border: eroded away
    masks = torch.zeros(1, 2, 10, 10, 10, dtype=torch.bool)
    masks[0, 0, 2:8, 2:8, 2:8] = True  # region 1 stays empty: an absent organ
    stats = region_statistics(volume, masks)
    assert stats.shape == (1, 2, N_REGION_FEATURES)
    inner = volume[0, 0, 3:7, 3:7, 3:7].double()
    deviation = inner - inner.mean()
    std = deviation.pow(2).mean().sqrt()
    expected = [torch.log(torch.tensor(216 / 1000)), inner.mean(), torch.log(std), deviation.pow(3).mean() / std ** 3]
    torch.testing.assert_close(stats[0, 0], torch.stack(expected).float())
    assert stats[0, 0, 3] < -1  # the focus is darker than the parenchyma: the histogram skews left
    torch.testing.assert_close(stats[0, 1], torch.log(torch.tensor([1e-6, 1.0, 1e-4, 1.0])) * torch.tensor(
        [1.0, 0.0, 1.0, 0.0]))  # absent: log 1e-6 size, mean 0, log 1e-4 spread, no skew
    homogeneous = volume.clone()
    homogeneous[0, 0, 4:6, 4:6, 4:6] = 0.5
    plain = region_statistics(homogeneous, masks)[0, 0]
    assert plain[2] < stats[0, 0, 2] - 1 and abs(plain[3]) < 1  # the focus raises the spread and the skew
    with pytest.raises(ValueError, match="same grid"):
        region_statistics(volume, masks[..., :5])


def test_region_encoder_adds_region_logits_and_statistics_to_the_backbone_output():
    encoder = RegionEncoder(_vit(), regions=["liver", "spleen"], width=4, dilations=(1, 2))
    volume = torch.rand(2, 1, 16, 16, 16)
    out = encoder(volume)
    plain = encoder.backbone(volume)
    torch.testing.assert_close(out.tokens, plain.tokens)  # the LM reads the wrapped encoder's tokens
    assert encoder.grid == (4, 4, 4) and encoder.out_dim == 32
    assert out.region_logits.shape == (2, 2, 8, 8, 8) and out.regions.shape == (2, 2, N_REGION_FEATURES)
    standardised = encoder.standardise(out.regions.flatten(1))
    torch.testing.assert_close(out.pooled, encoder.project(standardised))  # the summary of the regions
    assert encoder(volume[:1]).pooled.shape == (1, 32)  # one volume: the running statistics standardise
    with pytest.raises(ValueError, match="distinct"):
        RegionEncoder(_vit(), regions=["liver", "liver"])
    with pytest.raises(ValueError, match="at least one region"):
        RegionEncoder(_vit(), regions=[])


def test_mllm_needs_each_region_among_its_aux_classes_with_masks_on_the_grid():
    encoder = RegionEncoder(_vit(), regions=["right"], width=4, dilations=(1,))
    with pytest.raises(ValueError, match=r"regions \['right'\], which must be aux_classes too"):
        MultimodalLM({"volume": encoder}, lm=TINY_LM, aux_classes=["left"], aux_level="medium")
    model = MultimodalLM({"volume": encoder}, lm=TINY_LM, aux_classes=["left", "right", "left_lesion",
                                                                       "right_lesion"], aux_level="medium")
    batch = model.collator(_organ_samples(2, 0))
    with torch.no_grad():
        _, loss = model.batch_media(batch, aux_loss=True)
        region = model._region_loss("volume", encoder(batch["volume"]).region_logits, batch["volume_targets"])
    assert 0 < region < loss  # the findings' BCE plus the region head's Dice + BCE
    with pytest.raises(ValueError, match="dense masks on the volume's grid"):
        model.batch_media(batch | {"volume_targets": batch["volume_targets"][..., :7]}, aux_loss=True)
    series = PatchTransformerEncoder(n_channels=1, patch_size=16, d_model=16, n_layers=1, n_heads=2)
    MultimodalLM({"series": series}, lm=TINY_LM)  # encoders without regions need nothing of the kind


def test_region_head_trains_faster_then_stays_fixed_after_head_steps():
    encoder = RegionEncoder(_vit(), regions=["right"], width=4, dilations=(1,), head_lr_scale=5.0, head_steps=2)
    model = MultimodalLM({"volume": encoder}, lm=TINY_LM, lr=1e-3, aux_classes=["right"], aux_level="medium")
    model.trainer = type("Trainer", (), {"estimated_stepping_batches": 10})()
    optimizer = model.configure_optimizers()["optimizer"]
    head = {id(p) for p in encoder.segmenter.parameters()}
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 5e-3]
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == head
    assert not head & {id(p) for p in optimizer.param_groups[0]["params"]}
    volume = torch.rand(1, 1, 16, 16, 16)
    learning = [encoder(volume).region_logits.requires_grad for _ in range(3)]
    assert learning == [True, True, False] and int(encoder.state_dict()["head_steps_done"]) == 2
    encoder.eval()
    assert not encoder(volume).region_logits.requires_grad and int(encoder.head_steps_done) == 2


def _organ_samples(n: int, seed: int) -> list[dict]:
    """16^3 volumes with two "organs" of random size and attenuation (the right one denser); a hypo- or
    hyperdense 3^3 focus sits in one of them (or in none); targets: organ masks (focus included) and focus masks."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        volume = 0.02 * torch.randn(1, 16, 16, 16, generator=g)
        organs = torch.zeros(2, 16, 16, 16, dtype=torch.bool)
        corners = [(1, 2, 1), (8, 2, 8)]
        for k, (z, y, x) in enumerate(corners):  # a box of side 6 or 7
            side = int(torch.randint(6, 8, (1,), generator=g))
            organs[k, z:z + side, y:y + side, x:x + side] = True
            volume[0][organs[k]] += 0.3 + 0.3 * k + 0.1 * float(torch.rand(1, generator=g))  # told apart by density
        foci = torch.zeros(2, 16, 16, 16, dtype=torch.bool)
        host = i % 3  # 2: no focus
        if host < 2:
            z, y, x = (c + 2 for c in corners[host])
            foci[host, z:z + 3, y:y + 3, x:x + 3] = True
            volume[0][foci[host]] += 0.15 if i % 2 else -0.15
        answer = ["left organ", "right organ", "neither"][host]
        out.append({"volume": [volume], "volume_targets": [torch.cat([organs, foci])],
                    "question": "Which organ holds a lesion?", "answer": answer,
                    "choices": ["left organ", "right organ", "neither"]})
    return out


def test_region_encoder_learns_which_organ_holds_a_lesion(tmp_path):
    L.seed_everything(0)
    encoder = RegionEncoder(_vit(), regions=["left", "right"], width=8, dilations=(1, 2), stride=1,
                            head_lr_scale=5.0)
    model = MultimodalLM({"volume": encoder}, lm=TINY_LM, lr=3e-3, aux_level="medium", aux_tokens=True,
                         aux_classes=["left", "right", "left_lesion", "right_lesion"], predictions_dir=str(tmp_path))
    train, val = _organ_samples(96, 0), _organ_samples(48, 1)
    trainer = L.Trainer(accelerator="cpu", max_epochs=30, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(train, batch_size=16, shuffle=True, collate_fn=model.collator))
    (metrics,) = trainer.validate(model, DataLoader(val, batch_size=16, collate_fn=model.collator))
    assert metrics["val/aux_auroc/left_lesion"] > 0.9, metrics  # chance 0.5
    assert metrics["val/aux_auroc/right_lesion"] > 0.9, metrics
    assert metrics["val/acc_likelihood"] >= 0.7, metrics  # majority answer 1/3
    assert min(metrics["val/region_dice/left"], metrics["val/region_dice/right"]) > 0.9  # the organs are found
