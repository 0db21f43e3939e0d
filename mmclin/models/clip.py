"""CLIP-style contrastive training of an open_clip model, with zero-shot and retrieval validation."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from open_clip.loss import ClipLoss, SigLipLoss
from sklearn.metrics import confusion_matrix
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import default_collate
from torchvision import transforms

from mmclin.checkpoints import load_module
from mmclin.contracts import ClinicalDataModule, Servable
from mmclin.distributed import gather_in_order
from mmclin.errors import CheckpointError, ConfigError
from mmclin.export import ExportConfig, load_own_tensors
from mmclin.models.clip_losses import UniCLLoss
from mmclin.models.open_clip_build import build_open_clip
from mmclin.models.optim import adamw_cosine
from mmclin.plots import log_figure, plot_confusion_matrix, plot_roc_curves
from mmclin.tasks.zero_shot import (
    classification_metrics,
    retrieval_metrics,
    zero_shot_classifier,
    zero_shot_figures_with_ci,
)

MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the learned temperature at 100 (Radford et al. 2021)


class CLIPModule(Servable, L.LightningModule):
    """Contrastive image-text training (CLIP or SigLIP loss) around any open_clip model.

    Validation logs zero-shot classification (``val/zs_acc``, ``val/zs_bacc``, ``val/zs_auroc``) with a
    prompt-template ensemble over ``classnames`` (by default the datamodule's), and image<->text
    retrieval (``val/i2t_r{1,5,10}``, ``val/t2i_r{1,5,10}``) over the whole validation split.
    """

    def __init__(
        self,
        model_name: str | None = None,
        model_config: dict | None = None,
        pretrained: str | None = None,
        loss: Literal["clip", "siglip", "unicl"] = "clip",
        local_loss: bool = False,
        gather_with_grad: bool = True,
        lr: float = 5e-4,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup: float = 0.05,
        grad_checkpointing: bool = False,
        aug_cfg: dict | None = None,
        classnames: list[str] | None = None,
        templates: str | list[str] = "derm",
        sdpa_backend: Literal["auto", "default", "math"] = "auto",
        train_flips: bool = False,
        binary_aurocs: dict[str, list[str]] | None = None,
    ):
        """
        Args:
            model_name: open_clip registry name (``ViT-B-16``) or ``local-dir:PATH`` with open_clip_config.json.
            model_config: inline open_clip model config instead of a name (random init unless `pretrained`).
            pretrained: local checkpoint file with full CLIP weights.
            loss: ``clip`` (InfoNCE, open_clip ClipLoss), ``siglip`` (sigmoid, open_clip SigLipLoss) or ``unicl``
                (InfoNCE with the pairs that share a class label as positives, :class:`UniCLLoss`; for captions
                written from a few labels, e.g. HAM10000's).
            local_loss: ClipLoss: each process scores its local batch against all gathered features.
            gather_with_grad: ClipLoss: gathered features carry gradients (needed for exact DDP loss).
            lr: peak AdamW learning rate.
            weight_decay: AdamW weight decay (not applied to 1-D parameters: gains, biases, logit scale).
            betas: AdamW betas.
            eps: AdamW epsilon.
            warmup: linear warm-up length: a fraction of the total steps if < 1, else a number of steps.
            grad_checkpointing: recompute activations in the backward pass to save memory.
            aug_cfg: open_clip AugmentationCfg fields for the training transform (scale, color_jitter, ...).
            classnames: zero-shot class names in label order; default the datamodule's, taken at ``setup`` and
                recorded in the checkpoint's hyper-parameters (``mmclin predict`` names its classes from them).
            templates: prompt templates: a set name (``derm``) or a list of strings with one ``{}``.
            sdpa_backend: attention kernel; ``auto`` uses the math kernel for bf16 on CPU, where the
                fused kernels' backward is slower (see docs/benchmarks.md), and the default elsewhere.
            train_flips: random horizontal and vertical flips before the training transform, for images without a
                canonical orientation (dermoscopy, histology).
            binary_aurocs: two-class AUROCs to log beside the zero-shot figures, e.g.
                ``{"mel_vs_nv": ["melanoma", "melanocytic nevus"]}`` (positive class first), scored among the
                images of those two classes by the difference of their zero-shot logits.
        """
        super().__init__()
        self.save_hyperparameters()
        parts = build_open_clip(model_name, model_config, pretrained, aug_cfg)
        self.model = parts.model
        self.tokenizer = parts.tokenizer
        self.train_transform, self.eval_transform = parts.train_transform, parts.eval_transform
        if train_flips:
            flips = [transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip()]
            self.train_transform = transforms.Compose([*flips, self.train_transform])
        self.model_cfg, self.preprocess_cfg = parts.model_cfg, parts.preprocess_cfg
        if loss == "siglip" and "init_logit_bias" not in self.model_cfg:
            raise ConfigError("loss 'siglip' needs a model with a logit bias: set model_config.init_logit_bias (-10)")
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.model.train()  # HF towers come out of from_pretrained in eval mode (dropout off)
        self.loss_fn: torch.nn.Module | None = None
        self._val_outputs: list[dict[str, torch.Tensor]] = []
        self._classifier: torch.Tensor | None = None  # (D, K) zero-shot class embeddings, built per predict run

    # -- what the datamodule and tools need ----------------------------------------------------------
    def image_text_preprocess(self):
        """(train transform, eval transform, tokenizer), as open_clip pairs them with this model."""
        return self.train_transform, self.eval_transform, self.tokenizer

    def encode(self, images: torch.Tensor | None = None, texts: torch.Tensor | None = None):
        """L2-normalised image (B, D) and/or text (B, D) embeddings."""
        with self._attention_context():
            image = self.model.encode_image(images, normalize=True) if images is not None else None
            text = self.model.encode_text(texts, normalize=True) if texts is not None else None
        return image, text

    # -- training --------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.configure_loss(self.trainer.global_rank, self.trainer.world_size)
        if isinstance(self.trainer.datamodule, ClinicalDataModule):
            self.connect_data(self.trainer.datamodule)

    def connect_data(self, datamodule: ClinicalDataModule) -> None:
        """The datamodule's images and captions go through this model's transforms and tokenizer; without class
        names of its own, the model takes the datamodule's."""
        datamodule.connect(transforms=(self.train_transform, self.eval_transform), tokenizer=self.tokenizer)
        if self.hparams.classnames is None and datamodule.classnames is not None:
            self.hparams.classnames = list(datamodule.classnames)

    def study_batch(self, items: list[dict]) -> dict:
        return default_collate(items)

    @classmethod
    def from_export(cls, directory: Path, config: ExportConfig, **kwargs) -> L.LightningModule:
        return load_own_tensors(cls, directory, config)

    @torch.no_grad()
    def reference_outputs(self, generator: torch.Generator) -> torch.Tensor:
        """Image embeddings of two seeded random images and text embeddings of two captions, stacked (4, D)."""
        size = self.preprocess_cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        images = torch.randn(2, 3, *size, generator=generator)
        image, text = self.encode(images, self.tokenizer(["a dermoscopic image of melanoma.", "a nevus"]))
        return torch.cat([image, text])

    def configure_loss(self, rank: int = 0, world: int = 1) -> None:
        """Build the loss for this process's place in the job (features are gathered across `world`)."""
        if self.hparams.loss == "siglip":
            self.loss_fn = SigLipLoss(rank=rank, world_size=world)
        elif self.hparams.loss == "unicl":
            self.loss_fn = UniCLLoss(local_loss=self.hparams.local_loss, gather_with_grad=self.hparams.gather_with_grad,
                                     cache_labels=False, rank=rank, world_size=world)
        else:
            self.loss_fn = ClipLoss(local_loss=self.hparams.local_loss, gather_with_grad=self.hparams.gather_with_grad,
                                    cache_labels=True, rank=rank, world_size=world)

    def _attention_context(self):
        backend = self.hparams.sdpa_backend
        if backend == "auto":
            on_cpu = self.device.type == "cpu"
            bf16 = self._trainer is not None and "bf16" in str(self.trainer.precision)
            backend = "math" if on_cpu and bf16 else "default"
        return sdpa_kernel([SDPBackend.MATH]) if backend == "math" else contextlib.nullcontext()

    def contrastive_loss(self, images: torch.Tensor, texts: torch.Tensor,
                         labels: torch.Tensor | None = None) -> torch.Tensor:
        """Loss over the global batch (features gathered across processes by open_clip's loss); `labels` (B,) are
        the pairs' classes, which the ``unicl`` loss needs (-1 where unknown)."""
        with self._attention_context():
            out = self.model(images, texts)
        extra = {"logit_bias": out["logit_bias"]} if "logit_bias" in out else {}
        if self.hparams.loss == "unicl":
            if labels is None:
                raise ConfigError("loss 'unicl' needs each pair's class label in the batch ('label')")
            extra["labels"] = labels.to(images.device)
        return self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"], **extra)

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        # Gradient checkpointing recomputes attention in the backward pass: it must use the same kernel.
        with self._attention_context():
            super().backward(loss, *args, **kwargs)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.contrastive_loss(batch["image"], batch["text"], batch.get("label"))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["image"]))
        self.log("train/logit_scale", self.model.logit_scale.detach().exp(), batch_size=len(batch["image"]))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def configure_optimizers(self):
        h = self.hparams
        # The fused kernel updates all tensors in one pass: ~9x faster optimizer step than foreach on CPU
        # for the demo model (docs/benchmarks.md); it needs every parameter on CPU or CUDA as a plain tensor.
        fused = all(p.device.type in ("cpu", "cuda") and type(p.data) is torch.Tensor for p in self.parameters())
        # as open_clip_train: no weight decay on 1-D parameters
        return adamw_cosine(self, h.lr, h.weight_decay, h.warmup, h.betas, h.eps, decay_1d=False, fused=fused)

    # -- validation: zero-shot and retrieval over the whole split -------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        image, text = self.encode(batch["image"], batch["text"])
        self._val_outputs.append({"image": image.float(), "text": text.float(), "label": batch["label"]})

    def on_validation_epoch_end(self) -> None:
        self._log_split_metrics("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    on_test_epoch_start = on_validation_epoch_start

    def on_test_epoch_end(self) -> None:
        self._log_split_metrics("test")

    # -- prediction: zero-shot class probabilities per image ------------------------------------------
    def on_predict_epoch_start(self) -> None:
        self._classifier = self.zero_shot_classes()

    def zero_shot_classes(self) -> torch.Tensor | None:
        """(D, K) class embeddings of ``classnames`` under the current weights (prompt-template ensemble), or None
        without class names."""
        names = self.hparams.classnames
        return zero_shot_classifier(self.model, self.tokenizer, names, self.hparams.templates,
                                    self.device).float() if names else None

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict]:
        """Per image: zero-shot class probabilities (softmax of the scaled similarities, as open_clip's zero-shot
        classification), the predicted class and the labelled one where the data has it."""
        if self._classifier is None:  # outside a predict loop (mmclin predict): the class embeddings, once
            self.on_predict_epoch_start()
        if self._classifier is None:
            raise ConfigError("predict needs class names for zero-shot classification (from the datamodule or "
                              "--model.init_args.classnames)")
        image, _ = self.encode(batch["image"])
        probs = (self.model.logit_scale.exp() * image.float() @ self._classifier).softmax(-1)
        names = self.hparams.classnames
        labels = batch.get("label", torch.full((len(probs),), -1)).tolist()
        inputs = batch.get("input", [None] * len(probs))  # the file, for studies listed for prediction
        rows = [{"predicted": names[int(p.argmax())], "probabilities": dict(zip(names, p.tolist())),
                 "label": names[y] if y >= 0 else None} for p, y in zip(probs, labels)]
        return [row | ({"input": name} if name else {}) for row, name in zip(rows, inputs)]

    def _log_split_metrics(self, prefix: str) -> None:
        """Gather the split's embeddings from every process in the split's order, score them, log ``{prefix}/...``."""
        if not self._val_outputs:
            return
        local = {k: torch.cat([o[k] for o in self._val_outputs]) for k in ("image", "text", "label")}
        gathered = gather_in_order(self, local)
        # The text tower runs over every class name and template: once per split end, shared by the figures below.
        classifier = self.zero_shot_classes() if (gathered["label"] >= 0).any() else None
        metrics = evaluate_embeddings(self, gathered["image"], gathered["text"], gathered["label"], classifier)
        if prefix == "test":
            metrics.update(test_figures(self, gathered["image"], gathered["label"], classifier))
        if not self.trainer.sanity_checking:
            zero_shot_figures(self, prefix, gathered["image"], gathered["label"], classifier)
        # Every process holds the gathered split, so all compute (and log) the same figures; callbacks such
        # as ModelCheckpoint then find the monitored metric on every rank.
        self.log_dict({f"{prefix}/{k}": v for k, v in metrics.items()}, sync_dist=True)
        self._val_outputs = []


def zero_shot_figures(module: CLIPModule, prefix: str, image: torch.Tensor, label: torch.Tensor,
                      classifier: torch.Tensor | None) -> None:
    """Zero-shot confusion matrix and one-vs-rest ROC curves of a split, to the run's logger and its plots/;
    `classifier` is :meth:`CLIPModule.zero_shot_classes` (None: nothing to draw)."""
    names, has_label = module.hparams.classnames, label >= 0
    if classifier is None or not has_label.any():
        return
    scores = (image[has_label] @ classifier).cpu().numpy()
    truth = label[has_label].cpu().numpy()
    matrix = confusion_matrix(truth, scores.argmax(1), labels=range(len(names)))
    log_figure(module, f"{prefix}/zero_shot_confusion", plot_confusion_matrix(matrix, names, None,
                                                                             f"{prefix}: zero-shot"))
    log_figure(module, f"{prefix}/zero_shot_roc", plot_roc_curves(scores, truth, names, f"{prefix}: zero-shot ROC"))


def test_figures(module: CLIPModule, image: torch.Tensor, label: torch.Tensor,
                 classifier: torch.Tensor | None) -> dict[str, float]:
    """Zero-shot balanced accuracy, macro AUROC and the configured two-class AUROCs with bootstrap 95% intervals,
    and each class's recall (:func:`mmclin.tasks.zero_shot.zero_shot_figures_with_ci`); `classifier` as in
    :func:`zero_shot_figures`."""
    names, has_label = module.hparams.classnames, label >= 0
    if classifier is None or not has_label.any():
        return {}
    return zero_shot_figures_with_ci(image[has_label] @ classifier, label[has_label], names,
                                     module.hparams.binary_aurocs)


def evaluate_embeddings(module: CLIPModule, image: torch.Tensor, text: torch.Tensor, label: torch.Tensor,
                        classifier: torch.Tensor | None) -> dict:
    """Retrieval recall@K, and zero-shot figures where there is a `classifier` (as in :func:`zero_shot_figures`)
    and rows have labels."""
    metrics = retrieval_metrics(image, text)
    names = module.hparams.classnames
    has_label = label >= 0
    if classifier is not None and has_label.any():
        scores = image[has_label] @ classifier
        zs = classification_metrics(scores, label[has_label], names)
        metrics.update(zs_acc=zs["accuracy"], zs_bacc=zs["balanced_accuracy"], zs_auroc=zs["macro_auroc"])
    return metrics


def load_clip(source: str) -> CLIPModule:
    """A CLIPModule (on the CPU) from one of our Lightning checkpoints (``.ckpt``) or an open_clip local directory.

    A directory written by ``tools/export.py`` also carries the class names and templates it was trained with.
    """
    path = Path(source)
    if path.is_dir():
        extra = json.loads((path / "open_clip_config.json").read_text()).get("mmclin", {}) if (
            path / "open_clip_config.json").is_file() else {}
        module = CLIPModule(model_name=f"local-dir:{path}", classnames=extra.get("classnames"),
                            templates=extra.get("templates", "derm"))
    elif path.is_file():
        # The weights come from the checkpoint, so the original `pretrained` file need not exist any more; and
        # open_clip's "initialized randomly" warning while the architecture is built would be misleading here.
        logging.disable(logging.WARNING)
        try:
            module, _ = load_module(path, expected=CLIPModule, pretrained=None)
        finally:
            logging.disable(logging.NOTSET)
    else:
        raise CheckpointError(f"{source}: not found (neither a checkpoint file nor an open_clip directory)")
    return module.eval()
