"""MultimodalLM learns a question about a series through either fusion mode; predictions are written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from encoders.timeseries import PatchTransformerEncoder
from encoders.volume import ViT3DEncoder
from mmclin.contracts import ClinicalDataModule
from mmclin.errors import DataError
from mmclin.fusion import CrossAttentionFusion, SoftPromptFusion
from mmclin.models.mllm import MultimodalLM
from mmclin.tasks.qa import parse_choice


def _samples(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(256) / 64.0  # 4 s at 64 Hz
    out = []
    for i in range(n):
        high = i % 2 == 1
        freq = (8.0 if high else 1.5) + float(torch.rand(1, generator=g))
        phase = float(torch.rand(1, generator=g)) * 2 * math.pi
        series = torch.sin(2 * math.pi * freq * t + phase)[None] + 0.1 * torch.randn(1, 256, generator=g)
        out.append({"series": [series], "question": "Is the rhythm slow or fast?", "answer": "fast" if high else "slow",
                    "choices": ["slow", "fast"]})
    return out


def _fit_and_validate(model: MultimodalLM, train: list[dict], val: list[dict], epochs: int, root: Path) -> dict:
    """Fit `model` on `train` (batches of 16) and return its validation metrics on `val`; plots go under `root`."""
    train_loader = DataLoader(train, batch_size=16, shuffle=True, collate_fn=model.collator)
    val_loader = DataLoader(val, batch_size=16, collate_fn=model.collator)
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=root)
    trainer.fit(model, train_loader, val_loader)
    (metrics,) = trainer.validate(model, val_loader)
    return metrics


@pytest.mark.parametrize("fusion", [SoftPromptFusion, CrossAttentionFusion], ids=lambda c: c.__name__)
def test_learns_a_closed_question_about_a_series(fusion, tmp_path):
    L.seed_everything(0)
    encoder = PatchTransformerEncoder(n_channels=1, patch_size=16, d_model=32, n_layers=1, n_heads=2)
    tiny_lm = {"tiny": {"hidden_size": 32, "intermediate_size": 64}, "freeze": "none"}  # random init: train it
    model = MultimodalLM({"series": encoder}, lm=tiny_lm, fusion=fusion(), lr=3e-3, predictions_dir=str(tmp_path))
    metrics = _fit_and_validate(model, _samples(64, 0), _samples(32, 1), epochs=40, root=tmp_path)
    assert metrics["val/acc_likelihood"] >= 0.8, metrics  # majority baseline 0.5
    lines = (tmp_path / "val-predictions" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 32 and {"generated", "parsed", "ranked"} <= set(json.loads(lines[0]))


def test_choice_parser_has_no_order_bias():
    choices = ["sinus rhythm", "sinus bradycardia", "atrial fibrillation"]
    assert parse_choice("Sinus bradycardia.", choices) == "sinus bradycardia"
    assert parse_choice("atrial fibrillation, not sinus rhythm", choices) == "atrial fibrillation"
    assert parse_choice("no idea", choices) is None


def test_collator_batches_images_under_their_key_and_names_a_wrong_modality():
    model = MultimodalLM({"image": PatchTransformerEncoder(n_channels=3, patch_size=4, d_model=16, n_layers=1,
                                                           n_heads=2)},
                         lm={"tiny": {"hidden_size": 16, "intermediate_size": 32}})
    images = [{"image": [torch.rand(3, 8, 8)], "question": "Grade?", "answer": "mild", "choices": []}
              for _ in range(3)]
    batch = model.collator(images)
    assert batch["image"].shape == (3, 3, 8, 8) and batch["image_sample"].tolist() == [0, 1, 2]
    torch.testing.assert_close(batch["image"][1], images[1]["image"][0])
    with pytest.raises(ValueError, match="same one of the modalities"):
        model.collator(_samples(2, 0))


def test_evaluator_scores_are_logged_beside_accuracy(tmp_path):
    L.seed_everything(0)
    seen = []

    def evaluator(rows, prefix):
        seen.append(len(rows))
        return {f"{prefix}/answered_fast": sum(r["answer"] == "fast" for r in rows) / len(rows)}

    encoder = PatchTransformerEncoder(n_channels=1, patch_size=16, d_model=16, n_layers=1, n_heads=2)
    model = MultimodalLM({"series": encoder}, lm={"tiny": {"hidden_size": 16, "intermediate_size": 32}},
                         evaluator=evaluator, predictions_dir=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    (metrics,) = trainer.validate(model, DataLoader(_samples(6, 1), batch_size=4, collate_fn=model.collator))
    assert seen == [6] and metrics["val/answered_fast"] == 0.5 and "val/acc_likelihood" in metrics


class _SeriesData(ClinicalDataModule):
    """Series questions with a corpus(), batched by the model's collator (built after the tokenizer is fitted)."""

    def corpus(self, split: str = "train") -> list[str]:
        return [s["question"] for s in _samples(8, 0)] * 20

    def _loader(self, split: str, train: bool) -> DataLoader:
        return DataLoader(_samples(8, 0), batch_size=4, collate_fn=self.required_collator())


class _LesionData(ClinicalDataModule):
    @property
    def aux_classes(self) -> list[str]:
        return ["lesion"]


def test_tokenizer_fitted_on_the_corpus_is_shorter_and_comes_back_from_the_checkpoint(tmp_path):
    L.seed_everything(0)
    encoder = PatchTransformerEncoder(n_channels=1, patch_size=16, d_model=16, n_layers=1, n_heads=2)
    tiny_lm = {"tiny": {"hidden_size": 16, "intermediate_size": 32}, "freeze": "none"}
    model = MultimodalLM({"series": encoder}, lm=tiny_lm, tokenizer_vocab=300)
    question = "Is the rhythm slow or fast?"
    n_bytes = len(model.tokenizer(question)["input_ids"])
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=_SeriesData())
    tok = model.tokenizer
    assert len(tok) <= 300 and model.lm.get_input_embeddings().num_embeddings == len(tok)
    assert len(tok(question)["input_ids"]) < n_bytes / 3  # whole words are tokens now
    text = "Ünseen text: 12.5 mm <media> ok"  # any text still round-trips (byte fallback)
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=False) == "<s>" + text
    assert model.media_token_id == tok.convert_tokens_to_ids("<media>") and model.collator.tokenizer is tok

    encoder = PatchTransformerEncoder(n_channels=1, patch_size=16, d_model=16, n_layers=1, n_heads=2)
    loaded = MultimodalLM.load_from_checkpoint(trainer.checkpoint_callback.best_model_path, weights_only=False,
                                               encoders={"series": encoder})
    assert loaded.tokenizer.get_vocab() == tok.get_vocab()
    batch = model.collator(_samples(2, 1))
    model.eval()
    with torch.no_grad():
        expected = model.lm_forward(batch["input_ids"], batch["attention_mask"], model.batch_media(batch))[0].logits
        got = loaded.lm_forward(batch["input_ids"], batch["attention_mask"], loaded.batch_media(batch))[0].logits
    torch.testing.assert_close(got, expected)

    # `lightning predict --ckpt_path`: the fitted tokenizer arrives after setup connected the data; batches use it
    fresh = MultimodalLM({"series": PatchTransformerEncoder(n_channels=1, patch_size=16, d_model=16, n_layers=1,
                                                            n_heads=2)}, lm=tiny_lm, tokenizer_vocab=300)
    rows = trainer.predict(fresh, datamodule=_SeriesData(), ckpt_path=trainer.checkpoint_callback.best_model_path,
                           weights_only=False)  # (the encoders given as objects are pickled in its settings)
    assert fresh.tokenizer.get_vocab() == tok.get_vocab() and len(rows[0]) == 4


def test_tokenizer_vocab_needs_a_tiny_lm_and_a_corpus():
    encoder = PatchTransformerEncoder(n_channels=1, patch_size=16, d_model=16, n_layers=1, n_heads=2)
    with pytest.raises(ValueError, match="random-init LM"):
        MultimodalLM({"series": encoder}, lm={"source": "/nonexistent"}, tokenizer_vocab=300)
    model = MultimodalLM({"series": encoder}, lm={"tiny": {"hidden_size": 16, "intermediate_size": 32}},
                         tokenizer_vocab=300)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="corpus"):
        trainer.fit(model, DataLoader(_samples(4, 0), batch_size=4, collate_fn=model.collator))


def _blob_samples(n: int, seed: int) -> list[dict]:
    """8^3 volumes with a bright 2^3 cube where the answer says (every third volume has none); targets mark it."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        volume, target = 0.1 * torch.randn(1, 8, 8, 8, generator=g), torch.zeros(1, 8, 8, 8, dtype=torch.bool)
        z, y, x = (int(v) for v in torch.randint(0, 7, (3,), generator=g))
        if i % 3:
            volume[0, z:z + 2, y:y + 2, x:x + 2] += 1.0
            target[0, z:z + 2, y:y + 2, x:x + 2] = True
        out.append({"volume": [volume], "volume_targets": [target], "question": "Where is the blob?",
                    "answer": "none" if i % 3 == 0 else "top" if z < 4 else "bottom",
                    "choices": ["top", "bottom", "none"]})
    return out


def test_dense_aux_targets_teach_the_encoder_where_a_finding_is(tmp_path):
    L.seed_everything(0)
    encoder = ViT3DEncoder(img_size=(8, 8, 8), patch_size=(2, 2, 2), hidden_size=32, mlp_dim=64, num_layers=1,
                           num_heads=2)
    tiny_lm = {"tiny": {"hidden_size": 32, "intermediate_size": 64}, "freeze": "none"}
    model = MultimodalLM({"volume": encoder}, lm=tiny_lm, lr=3e-3, aux_classes=["blob"],
                         predictions_dir=str(tmp_path))
    samples = _blob_samples(3, 0)
    batch = model.collator(samples)
    assert batch["volume_targets"].shape == (3, 1, 8, 8, 8)
    del samples[1]["volume_targets"]
    with pytest.raises(DataError, match="2 volume_targets for 3 volume media"):
        model.collator(samples)
    metrics = _fit_and_validate(model, _blob_samples(64, 0), _blob_samples(32, 1), epochs=15, root=tmp_path)
    assert metrics["val/aux_auroc_token/blob"] > 0.9, metrics  # chance 0.5: the head finds the cube's patches
    assert metrics["val/aux_auroc/blob"] > 0.9  # and tells the volumes with a cube from those without
    assert metrics["val/aux_loss"] < 0.3


def test_aux_targets_must_fit_the_encoder_and_match_the_datamodules_classes():
    encoder = PatchTransformerEncoder(n_channels=1, patch_size=16, d_model=16, n_layers=1, n_heads=2)
    tiny_lm = {"tiny": {"hidden_size": 16, "intermediate_size": 32}}
    with pytest.raises(ValueError, match="no token grid"):
        MultimodalLM({"series": encoder}, lm=tiny_lm, aux_classes=["lesion"])
    with pytest.raises(ValueError, match="aux_tokens needs aux_classes"):
        MultimodalLM({"series": encoder}, lm=tiny_lm, aux_tokens=True)
    model = MultimodalLM({"series": encoder}, lm=tiny_lm, aux_classes=["lesion"], aux_level="medium")
    batch = model.collator(_samples(2, 0)) | {"series_targets": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match=r"series_targets \(2, 3\): expected \(N, 1\), one row per medium"):
        model.batch_media(batch, aux_loss=True)
    _, loss = model.batch_media(batch | {"series_targets": torch.ones(2, 1)}, aux_loss=True)
    assert loss.ndim == 0 and loss > 0
    masks = torch.zeros(2, 1, 4, 4, 4)
    masks[:, :, 1, 2, 3] = 1  # masks count as "present anywhere"
    torch.testing.assert_close(model.batch_media(batch | {"series_targets": masks}, aux_loss=True)[1], loss)
    encoder = ViT3DEncoder(img_size=(8, 8, 8), patch_size=(4, 4, 4), hidden_size=16, mlp_dim=32, num_layers=1,
                           num_heads=2)
    model = MultimodalLM({"volume": encoder}, lm=tiny_lm, aux_classes=["liver", "lesion"])
    model.trainer = type("Trainer", (), {"datamodule": _LesionData()})()
    with pytest.raises(ValueError, match=r"aux_classes \['liver', 'lesion'\] need .* it has \['lesion'\]"):
        model.setup("fit")


def test_finding_tokens_carry_the_heads_probabilities_to_the_lm():
    encoder = ViT3DEncoder(img_size=(8, 8, 8), patch_size=(4, 4, 4), hidden_size=16, mlp_dim=32, num_layers=1,
                           num_heads=2)
    model = MultimodalLM({"volume": encoder}, lm={"tiny": {"hidden_size": 16, "intermediate_size": 32}},
                         aux_classes=["liver", "lesion"], aux_tokens=True)
    samples = _blob_samples(2, 0)
    tokens, mask, _ = model.encode_media(model.collator(samples))  # no targets needed
    assert tokens.shape == (2, 8 + 2, 16) and mask.all()
    with torch.no_grad():
        model.aux_heads["volume"].weight.zero_()
        model.aux_heads["volume"].bias.copy_(torch.tensor([-30.0, 30.0]))  # liver absent, lesion present
        tokens, _, _ = model.encode_media(model.collator(samples))
    absent, present = model.aux_embeddings.detach()
    torch.testing.assert_close(tokens[:, -2], absent[0].expand(2, -1))
    torch.testing.assert_close(tokens[:, -1], present[1].expand(2, -1))
