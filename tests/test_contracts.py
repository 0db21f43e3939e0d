"""The contracts of mmclin.contracts: every datamodule keeps them, and a new dataset, encoder and model kind plug in as
subclasses defined here, without an edit of any project file (docs/architecture.md's recipes)."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import datamodules
import mmclin.trusted
from encoders.timeseries import PatchTransformerEncoder
from mmclin.contracts import ClinicalDataModule, Encoder, EncoderOutput, QADataModule, Servable
from mmclin.export import export_module, load_exported, load_own_tensors, reference_outputs
from mmclin.models.mllm import MultimodalLM

TINY_LM = {"tiny": {"hidden_size": 32, "intermediate_size": 64}, "freeze": "none"}


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


for _module in pkgutil.iter_modules(datamodules.__path__):  # every datamodule family
    importlib.import_module(f"datamodules.{_module.name}")
PROJECT_DATAMODULES = sorted({c for c in _subclasses(ClinicalDataModule) if c.__module__.startswith("datamodules.")},
                             key=lambda c: c.__name__)
STUDY_PARAMETERS = ["self", "path", "question", "choices"]


def test_every_datamodule_family_is_a_clinical_datamodule():
    families = {c for c in _subclasses(L.LightningDataModule) if c.__module__.startswith("datamodules.")}
    assert len(families) >= 8 and families == set(PROJECT_DATAMODULES)


@pytest.mark.parametrize("cls", PROJECT_DATAMODULES, ids=lambda c: c.__name__)
def test_datamodule_keeps_the_contract(cls):
    """One signature per hook name; the declared hooks answer with the declared types without any data read."""
    for hook in ("study_item", "study_items"):
        assert list(inspect.signature(getattr(cls, hook)).parameters)[:4] == STUDY_PARAMETERS, hook
    for hook in ("connect", "read_study_items", "baselines", "lesion_masks", "corpus", "study_collate"):
        base = list(inspect.signature(getattr(ClinicalDataModule, hook)).parameters)
        assert list(inspect.signature(getattr(cls, hook)).parameters)[:len(base)] == base, hook
    if cls.__name__ == "PreferenceDataModule":  # its hooks are its base's (tests/test_mmedpo.py)
        return
    data = cls()
    assert data.selection_metric is None or data.selection_metric.startswith("val/")
    assert isinstance(data.aux_classes, list) and isinstance(data.choices, list)
    data.connect(collator=list)
    assert data.study_collate() is list
    if issubclass(cls, QADataModule):
        assert data.required_collator() is list


# -- a new dataset ---------------------------------------------------------------------------------------------
class ToySeries(Dataset):
    """Two-channel series; the answer says whether channel 0 rises or falls (it is only in the series)."""

    def __init__(self, n: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.slopes = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
        self.noise = 0.1 * torch.randn(n, 2, 64, generator=generator)

    def __len__(self) -> int:
        return len(self.slopes)

    def __getitem__(self, i: int) -> dict:
        series = self.noise[i].clone()
        series[0] += self.slopes[i] * torch.linspace(-1, 1, 64)
        answer = "rises" if self.slopes[i] > 0 else "falls"
        return {"series": [series], "question": "Does the first channel rise or fall?", "answer": answer,
                "choices": ["rises", "falls"], "meta": {"index": i}}


class ToyQADataModule(QADataModule):
    """A new dataset: only its samples, its loader and how it reads one study of a user's."""

    def __init__(self, batch_size: int = 16, num_workers: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.datasets = {"train": ToySeries(64, 0), "val": ToySeries(32, 1), "test": ToySeries(32, 2)}

    @property
    def choices(self) -> list[str]:
        return ["rises", "falls"]

    def study_item(self, path: str | os.PathLike, question: str | None = None,
                   choices: list[str] | None = None) -> dict:
        series = torch.load(path, weights_only=True)
        return {"series": [series], "question": question or "Does the first channel rise or fall?", "answer": "",
                "choices": list(choices or self.choices), "meta": {"input": str(path)}}

    def _loader(self, split: str, train: bool) -> DataLoader:
        return self.model_batches(self.datasets[split], split, train, "toy", "series")


# -- a new encoder -----------------------------------------------------------------------------------------------
class ToyMLPEncoder(Encoder):
    """A new encoder: each channel's whole series through an MLP, one token per channel."""

    def __init__(self, length: int = 64, out_dim: int = 16):
        super().__init__()
        self.out_dim = out_dim
        self.mlp = nn.Sequential(nn.Linear(length, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, series: torch.Tensor, lengths: torch.Tensor | None = None) -> EncoderOutput:
        tokens = self.mlp(series)  # (B, C, D)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(tokens, tokens.mean(1), mask, torch.arange(tokens.shape[1], device=tokens.device))


def _fit(model: L.LightningModule, data: L.LightningDataModule, tmp_path, epochs: int) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    return trainer


def test_a_new_dataset_and_encoder_train_a_multimodal_lm_and_serve_a_study(tmp_path):
    L.seed_everything(0)
    data = ToyQADataModule()
    model = MultimodalLM({"series": ToyMLPEncoder()}, lm=TINY_LM, lr=3e-3, max_new_tokens=3)
    trainer = _fit(model, data, tmp_path, epochs=30)
    accuracy = trainer.validate(model, datamodule=data, verbose=False)[0]["val/acc_likelihood"]
    assert accuracy >= 0.8  # the answer is only in the series; chance is 0.5
    study = tmp_path / "study.pt"
    torch.save(ToySeries(1, 5)[0]["series"][0], study)
    model.connect_data(data)  # as `mmclin predict` does
    [row] = model.predict_step(model.study_batch(data.study_items(study)), 0)
    assert row["ranked"] in ("rises", "falls")


def test_an_encoder_outside_the_contract_is_one_line():
    with pytest.raises(ValueError, match=r"encoders \{'series': 'Linear'\}: an encoder subclasses"):
        MultimodalLM({"series": nn.Linear(4, 4)}, lm=TINY_LM)


def test_a_datamodule_without_a_connected_collator_says_so():
    with pytest.raises(ValueError, match="ToyQADataModule batches with the model's collator, and none is connected"):
        ToyQADataModule().train_dataloader()


# -- a new model kind --------------------------------------------------------------------------------------------
class ToySlopeClassifier(Servable, L.LightningModule):
    """A new model kind: a linear read-out of a series encoder, served by `mmclin predict` and export as it is."""

    def __init__(self, d_model: int = 16):
        super().__init__()
        self.save_hyperparameters()
        self.encoder = PatchTransformerEncoder(n_channels=2, patch_size=16, d_model=d_model, n_layers=1, n_heads=2)
        self.head = nn.Linear(d_model, 2)

    def setup(self, stage: str) -> None:
        self.connect_data(self.trainer.datamodule)

    def connect_data(self, datamodule: ClinicalDataModule) -> None:
        datamodule.connect(collator=self.study_batch)

    def study_batch(self, items: list[dict]) -> dict:
        answers = [item["answer"] for item in items]
        return {"series": torch.stack([item["series"][0] for item in items]),
                "label": torch.tensor([int(a == "rises") for a in answers])}

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(series).pooled)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch["series"]), batch["label"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/acc", (self(batch["series"]).argmax(-1) == batch["label"]).float().mean())

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        return [{"rises": bool(p)} for p in self(batch["series"]).argmax(-1).tolist()]

    def reference_outputs(self, generator: torch.Generator) -> torch.Tensor:
        return self(torch.randn(2, 2, 64, generator=generator))

    @classmethod
    def from_export(cls, directory, config, **kwargs) -> ToySlopeClassifier:
        return load_own_tensors(cls, directory, config)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def test_a_new_model_kind_trains_exports_and_reloads(tmp_path, monkeypatch):
    L.seed_everything(0)
    model, data = ToySlopeClassifier(), ToyQADataModule()
    trainer = _fit(model, data, tmp_path, epochs=20)
    assert trainer.validate(model, datamodule=data, verbose=False)[0]["val/acc"] >= 0.8
    # a class outside mmclin/encoders/datamodules is refused in files unless its package is trusted
    monkeypatch.setattr(mmclin.trusted, "PROJECT_PACKAGES", (*mmclin.trusted.PROJECT_PACKAGES, __name__))
    checkpoint = {"hyper_parameters": {**model.hparams, "_class_path": f"{__name__}.ToySlopeClassifier"}}
    export_module(model, checkpoint, tmp_path / "export")
    reloaded, _ = load_exported(tmp_path / "export")
    torch.testing.assert_close(reference_outputs(reloaded), reference_outputs(model))


def test_preference_data_reads_a_study_as_its_base_does(tmp_path):
    from PIL import Image

    from datamodules.fundus import FundusReportDataModule
    from datamodules.preference import PreferenceDataModule

    photo = tmp_path / "fundus.png"
    Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy()).save(photo)
    settings = {"image_size": 32, "crop_border": False}
    pairs = PreferenceDataModule(base={"class_path": "datamodules.fundus.FundusReportDataModule",
                                       "init_args": settings})
    expected = FundusReportDataModule(**settings).study_item(photo)
    for got in (pairs.study_item(photo), *pairs.study_items(photo)):
        torch.testing.assert_close(got["image"][0], expected["image"][0])
        assert got["question"] == expected["question"]
