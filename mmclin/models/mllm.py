"""Encoder(s) + connector + causal LM, joined by a fusion (soft prompt, cross-attention, ...), trained on answers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat

from mmclin.contracts import IGNORE_INDEX, ClinicalDataModule, Encoder, Servable
from mmclin.distributed import gather_rows
from mmclin.errors import CheckpointError, ConfigError
from mmclin.export import LM_DIR
from mmclin.fusion.base import Fusion, MediaTokens
from mmclin.fusion.legacy import fusion_from_settings
from mmclin.fusion.projector import MLPProjector
from mmclin.llm import MEDIA_TOKEN, bpe_tokenizer, lm_hidden_size, load_causal_lm, tokenizer_from_json
from mmclin.metrics.f1 import macro_f1
from mmclin.models.mllm_export import load_multimodal_lm, save_lm_for_export
from mmclin.models.optim import adamw_cosine
from mmclin.plots import log_figure, log_text, plot_confusion_matrix
from mmclin.runs import run_dir
from mmclin.tasks.blind import (
    BLIND_VARIANTS,
    PREDICTION_KEYS,
    other_media_index,
    paired_accuracy_differences,
    recent_distinct,
    variant_rows,
)
from mmclin.tasks.qa import QACollator, parse_choice


class MultimodalLM(Servable, L.LightningModule):
    """Question answering (or any text output) over media with a causal LM from transformers.

    The fusion decides how the connector's tokens enter the LM: :class:`~mmclin.fusion.SoftPromptFusion`
    replaces each ``<media>`` placeholder's embedding by them (LLaVA / OpenTSLM-SoftPrompt);
    :class:`~mmclin.fusion.CrossAttentionFusion` keeps the placeholder in the text and lets the text attend to the
    tokens of every medium before it through gated cross-attention (Flamingo / OpenTSLM-Flamingo); any other
    :class:`~mmclin.fusion.Fusion` works the same way. The loss covers answer tokens only. Validation scores closed
    questions twice: by parsing greedy generations into a choice, and by ranking the allowed choices by their
    likelihood.
    """

    def __init__(
        self,
        encoders: dict[str, nn.Module],
        lm: dict[str, Any],
        fusion: Fusion | Literal["soft_prompt", "cross_attention"] | None = None,
        connector: Callable[[int, int], nn.Module] | None = None,
        xattn_every_n: int | None = None,
        xattn_gate_init: float | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup: float = 0.05,
        max_new_tokens: int = 8,
        evaluator: Callable[[list[dict], str], dict[str, float]] | None = None,
        predictions_dir: str | None = None,
        tokenizer_vocab: int | None = None,
        aux_classes: list[str] | None = None,
        aux_level: Literal["token", "medium"] = "token",
        aux_loss_weight: float = 1.0,
        aux_tokens: bool = False,
        blind_splits: list[Literal["val", "test"]] | None = None,
    ):
        """
        Args:
            encoders: one encoder per modality key of the batch (e.g. ``{"series": PatchTransformerEncoder}``);
                each maps (N, C, L) + lengths to tokens with an ``out_dim`` width.
            lm: arguments of :func:`mmclin.llm.load_causal_lm` (``source`` or ``tiny``, ``freeze``, ``lora``...).
            fusion: how media enter the LM, a :class:`~mmclin.fusion.Fusion` (in a config its ``class_path`` and
                ``init_args``, e.g. ``mmclin.fusion.CrossAttentionFusion`` with ``every_n``, ``gate_init``);
                None: :class:`~mmclin.fusion.SoftPromptFusion`. Deprecated: ``soft_prompt`` or ``cross_attention``.
            connector: builds the connector from (encoder width, LM width); default an MLP projector
                (use ``PerceiverResampler`` for a token count independent of the series length).
            xattn_every_n: deprecated, with ``fusion="cross_attention"`` only: ``CrossAttentionFusion.every_n``.
            xattn_gate_init: deprecated, with ``fusion="cross_attention"`` only: ``CrossAttentionFusion.gate_init``.
            lr: peak AdamW learning rate for the trainable parameters.
            weight_decay: AdamW weight decay.
            warmup: linear warm-up: a fraction of the total steps if < 1, else a number of steps.
            max_new_tokens: generation length during evaluation (closed questions: at least their longest choice).
            evaluator: task scores on top of accuracy, computed from all ranks' prediction rows: called as
                ``evaluator(rows, prefix)`` and returning ``{name: value}`` to log (e.g.
                :class:`mmclin.tasks.vqa.VQAEvaluator`, :class:`mmclin.tasks.report.ReportEvaluator`).
            predictions_dir: where evaluation predictions are written (``predictions-rank{r}.jsonl``, merged to
                ``predictions.jsonl``); default the trainer's log directory.
            tokenizer_vocab: with a tiny random-init LM (``lm.tiny``) only: when fitting starts, replace its byte
                tokenizer by a byte-level BPE of this many tokens (:func:`mmclin.llm.bpe_tokenizer`) fitted on the
                datamodule's ``corpus("train")`` and its ``choices``; long texts such as reports become ~4-5x
                fewer tokens. The fitted tokenizer is saved in every checkpoint. None: the LM's own tokenizer.
            aux_classes: auxiliary supervision of the encoder by the batch's ``<key>_targets`` (the datamodule's
                ``aux_classes``: same names, same order), trained with binary cross-entropy beside the answers.
                Such a signal tells a small encoder what and where small findings are, which the answers alone
                convey too weakly (M3D, Bai et al. 2024, trains segmentation beside VQA). Validation and test log
                each class's AUROC per medium (``aux_auroc/<class>``: for token targets, the highest token
                against "anywhere in the medium") and, for token targets, per token (``aux_auroc_token/<class>``;
                easy background patches make it high even where the per-medium decision is at chance).
            aux_level: ``token``: dense targets (N, C, *spatial), e.g. organ and lesion masks of a CT, max-pooled
                to the encoder's token ``grid`` (an encoder with a ``grid``, e.g. ``ViT3DEncoder``); a linear head on
                each token predicts whether its patch holds each class. ``medium``: targets (N, C), e.g. the
                findings of a radiograph, or masks (N, C, *spatial) read as "present anywhere", predicted from the
                pooled output. An encoder with a region head (:class:`encoders.regions.RegionEncoder`) also
                learns to segment its ``regions``, named among these classes, from their masks (Dice + BCE);
                validation logs each region's Dice (``region_dice/<region>``, per batch on the head's grid, averaged).
            aux_loss_weight: weight of that loss beside the answer loss.
            aux_tokens: append to each medium's LM tokens one finding token per auxiliary class, a learned
                embedding of "present" and one of "absent" mixed by the head's probability (for ``token``, the
                highest over the tokens), so that the LM reads what the head found without having to find it in
                the patch tokens (segmentation-aware tokens, as MAIRA-Seg, Sharma et al. 2024). Needs
                ``aux_classes``; works at inference without targets.
            blind_splits: the evaluation splits also scored with each medium replaced by another study's
                (``shuffled_media``) and by zeros (``blank_media``), reported as ``baseline/shuffled_media_*`` and
                ``baseline/blank_media_*`` with the paired difference of accuracy and its bootstrap interval
                (:mod:`mmclin.tasks.blind`): a model that does not look at its media scores the same. Default
                ``["test"]`` (each costs two more passes of generation and ranking); ``[]`` turns it off.
        """
        super().__init__()
        self.save_hyperparameters()
        _check_settings(encoders, lm, tokenizer_vocab, aux_classes, aux_level, aux_tokens)
        fusion = fusion_from_settings(fusion, xattn_every_n, xattn_gate_init)
        # The parts, in this order (it fixes the random init): encoders -> LM -> connectors -> what the fusion
        # attaches to the LM (cross-attention blocks); auxiliary heads on the encoders.
        self.encoders = nn.ModuleDict(encoders)
        self.lm, self.tokenizer = load_causal_lm(**lm)
        self.media_token_id = self.tokenizer.convert_tokens_to_ids(MEDIA_TOKEN)
        width = lm_hidden_size(self.lm)
        build = connector or (lambda d_in, d_out: MLPProjector(d_in, d_out))
        self.connectors = nn.ModuleDict({k: build(e.out_dim, width) for k, e in encoders.items()})
        self.fusion = fusion
        self.fusion.attach(self.lm, width)
        self.collator = QACollator(self.tokenizer, media_keys=tuple(encoders))
        # The split's loss: a token-weighted mean that two processes sum exactly as one (not a mean of batch means)
        self.eval_loss = nn.ModuleDict({split: MeanMetric() for split in ("val", "test")})
        self.aux_embeddings = None
        if aux_classes:
            self._add_aux_heads(aux_classes, aux_level, aux_tokens, width)
        # Encoders with a region head (encoders.regions.RegionEncoder) learn their regions from the dense targets
        # of the aux classes of the same names.
        self._region_channels = _region_channels(encoders, aux_classes or [])
        self.region_loss = DiceCELoss(sigmoid=True, batch=True) if self._region_channels else None
        self.evaluator = evaluator
        self._predictions: list[dict] = []
        # the most recent distinct media (and lengths) of the evaluation so far, from which shuffled_media also draws
        self._previous_media: torch.Tensor | None = None
        self._previous_lengths: torch.Tensor | None = None
        self._fitted_tokenizer: str | None = None  # the BPE of `tokenizer_vocab` as JSON, once fitted
        self._media_shapes: dict[str, list[int]] = {}  # one medium's shape per key, as trained (for export checks)

    def _add_aux_heads(self, aux_classes: list[str], aux_level: str, aux_tokens: bool, width: int) -> None:
        """A linear head per encoder for the auxiliary classes, their AUROCs, and the finding-token embeddings."""
        self.aux_heads = nn.ModuleDict({k: nn.Linear(e.out_dim, len(aux_classes)) for k, e in self.encoders.items()})
        # per medium ("val"), and per token ("val_token") for token targets
        levels = ("", "_token") if aux_level == "token" else ("",)
        self.aux_auroc = nn.ModuleDict({split + level: nn.ModuleList(BinaryAUROC() for _ in aux_classes)
                                        for split in ("val", "test") for level in levels})
        if aux_tokens:  # (absent, present) embedding of each class's finding token
            self.aux_embeddings = nn.Parameter(0.02 * torch.randn(2, len(aux_classes), width))

    # -- tokenizer ---------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Check the data's auxiliary classes, fit the tokenizer on its training texts (``tokenizer_vocab``), and
        connect the collator to the datamodule."""
        datamodule = self.trainer.datamodule
        fit_tokenizer = self.hparams.tokenizer_vocab is not None and self._fitted_tokenizer is None and stage == "fit"
        if not isinstance(datamodule, ClinicalDataModule):  # loaders given to the Trainer directly
            if fit_tokenizer:
                raise ConfigError("tokenizer_vocab: the tokenizer is fitted on the training texts, so the model "
                                  "trains on a ClinicalDataModule with a corpus('train'); or leave tokenizer_vocab "
                                  "unset")
            return
        names = list(self.hparams.aux_classes or [])
        if names and list(datamodule.aux_classes) != names:
            raise ConfigError(f"aux_classes {names} need the datamodule's aux_classes with the same names in the "
                              f"same order; it has {list(datamodule.aux_classes) or 'none'}")
        if fit_tokenizer:  # (outside fit the tokenizer comes with the checkpoint's weights: on_load_checkpoint)
            texts = [*datamodule.corpus("train"), *datamodule.choices]
            self._use_tokenizer(bpe_tokenizer(texts, self.hparams.tokenizer_vocab, self.tokenizer.model_max_length))
        self.connect_data(datamodule)

    def connect_data(self, datamodule: ClinicalDataModule) -> None:
        datamodule.connect(collator=self.collate)

    def collate(self, samples: list[dict]) -> dict:
        """The batch of `samples` by the model's current collator: a checkpoint's fitted tokenizer replaces it after
        ``setup`` (``lightning predict --ckpt_path``), so the datamodule holds this, not the collator of the moment."""
        return self.collator(samples)

    def study_batch(self, items: list[dict]) -> dict:
        return self.collator(items)

    def _use_tokenizer(self, tokenizer) -> None:
        self.tokenizer, self._fitted_tokenizer = tokenizer, tokenizer.backend_tokenizer.to_str()
        self.lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # random-init rows, like the others
        for config in (self.lm.config, self.lm.generation_config):
            config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
            config.eos_token_id = tokenizer.eos_token_id
        self.media_token_id = tokenizer.convert_tokens_to_ids(MEDIA_TOKEN)
        self.collator = QACollator(tokenizer, media_keys=tuple(self.encoders))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._fitted_tokenizer is not None:
            checkpoint["tokenizer"] = self._fitted_tokenizer
        if self._media_shapes:
            checkpoint["media_shapes"] = dict(self._media_shapes)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Before the weights are loaded: the embedding rows must match the checkpoint's tokenizer.
        fitted = checkpoint.get("tokenizer")
        if fitted is not None and fitted != self._fitted_tokenizer:
            self._use_tokenizer(tokenizer_from_json(fitted, self.tokenizer.model_max_length))
        self._media_shapes = dict(checkpoint.get("media_shapes") or {})

    # -- media -------------------------------------------------------------------------------------------
    def encode_media(self, batch: dict, aux_loss: bool = False):
        """Tokens (N, T, D_lm), mask (N, T) and owning sample (N,) of every medium in the batch; with
        `aux_loss`, also the auxiliary loss (None without ``aux_classes`` or targets)."""
        keys = [k for k in self.encoders if k in batch]
        if len(keys) != 1:
            raise ValueError(f"a batch must carry exactly one of the modalities {list(self.encoders)}; has {keys}")
        key = keys[0]
        self._media_shapes.setdefault(key, list(batch[key].shape[1:]))
        out = self.encoders[key](batch[key], batch.get(f"{key}_lengths"))
        tokens, mask = self.connectors[key](out.tokens, out.mask)
        logits = None
        if self.hparams.aux_classes:  # (N, T, C) per token or (N, C) per medium
            logits = self.aux_heads[key](out.tokens if self.hparams.aux_level == "token" else out.pooled).float()
        if self.aux_embeddings is not None:
            tokens, mask = self._append_finding_tokens(logits, out.mask, tokens, mask)
        media = tokens, mask, batch[f"{key}_sample"]
        if not aux_loss:
            return media
        targets = batch.get(f"{key}_targets")
        loss = self._aux_loss(key, logits, targets)
        if out.region_logits is not None and targets is not None:
            loss = loss + self._region_loss(key, out.region_logits, targets)
        return *media, loss

    def _append_finding_tokens(self, logits, encoder_mask, tokens, mask):
        """Tokens and mask with one finding token per auxiliary class appended to each medium."""
        probability = torch.sigmoid(logits)
        if self.hparams.aux_level == "token":  # the most confident token of the medium
            probability = probability.masked_fill(~encoder_mask[..., None], 0.0).amax(1)
        absent, present = self.aux_embeddings
        found = probability[..., None] * present + (1 - probability[..., None]) * absent  # (N, C, D_lm)
        return torch.cat([tokens, found.to(tokens.dtype)], 1), torch.cat([mask, mask.new_ones(found.shape[:2])], 1)

    def _aux_loss(self, key: str, logits: torch.Tensor | None, targets: torch.Tensor | None) -> torch.Tensor | None:
        """BCE of the auxiliary head's `logits` against `targets`: (N, C) per medium, or (N, C, *spatial)
        max-pooled to the encoder's grid; updates the AUROCs outside training."""
        if logits is None or targets is None:
            return None
        n_classes = len(self.hparams.aux_classes)
        if self.hparams.aux_level == "medium":
            if targets.shape[:2] != logits.shape:
                raise ValueError(f"{key}_targets {tuple(targets.shape)}: expected (N, {n_classes}), one row per "
                                 f"medium, or (N, {n_classes}, *spatial) masks (aux_level 'medium')")
            truth = targets.flatten(2).amax(2).float() if targets.ndim > 2 else targets.float()  # present anywhere
        else:
            grid = tuple(self.encoders[key].grid)
            if targets.ndim != 2 + len(grid) or targets.shape[1] != n_classes:
                raise ValueError(f"{key}_targets {tuple(targets.shape)}: expected (N, {n_classes}, *spatial) with one "
                                 f"axis per axis of the encoder's token grid {grid} (aux_level 'token')")
            pool = F.adaptive_max_pool3d if len(grid) == 3 else F.adaptive_max_pool2d
            truth = pool(targets.float(), grid).flatten(2).transpose(1, 2)  # (N, T, C), grid order as the tokens
        if not self.training:
            split = "test" if self.trainer.testing else "val"
            per_medium = (logits, truth) if logits.ndim == 2 else (logits.amax(1), truth.amax(1))
            scored = [(split, *per_medium)] + ([(f"{split}_token", logits, truth)] if logits.ndim == 3 else [])
            for name, x, y in scored:
                for c, auroc in enumerate(self.aux_auroc[name]):
                    auroc.update(x[..., c].flatten(), y[..., c].flatten().long())
        return F.binary_cross_entropy_with_logits(logits, truth)

    def _region_loss(self, key: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Dice + BCE of a region head's `logits` (N, R, *grid) against the dense `targets` of its regions,
        averaged to the head's grid (the fraction of each cell inside the region)."""
        if targets.ndim != logits.ndim or any(t % g for t, g in zip(targets.shape[2:], logits.shape[2:])):
            raise ValueError(f"{key}_targets {tuple(targets.shape)}: the region head of encoder {key!r} needs dense "
                             f"masks on the volume's grid, a multiple of its own grid {tuple(logits.shape[2:])}")
        truth = F.adaptive_avg_pool3d(targets[:, self._region_channels[key]].float(), logits.shape[2:])
        if not self.training and self._trainer is not None:  # Dice of the masks on the head's grid, per region
            split = "test" if self.trainer.testing else "val"
            found, inside = logits > 0, truth >= 0.5
            dice = 2 * (found & inside).sum((0, 2, 3, 4)) / (found.sum((0, 2, 3, 4)) + inside.sum((0, 2, 3, 4))).clamp(
                min=1)
            for name, value in zip(self.encoders[key].regions, dice):
                self.log(f"{split}/region_dice/{name}", value, batch_size=len(logits), sync_dist=True)
        return self.region_loss(logits.float(), truth)

    @staticmethod
    def _group(tokens: torch.Tensor, mask: torch.Tensor, owner: torch.Tensor, batch_size: int):
        """Padded (B, M, T, D) media, their mask (B, M, T) and presence (B, M), in text order per sample."""
        counts = torch.bincount(owner, minlength=batch_size)
        m = int(counts.max())
        grouped = tokens.new_zeros(batch_size, m, *tokens.shape[1:])
        grouped_mask = mask.new_zeros(batch_size, m, mask.shape[1])
        slot = torch.cat([torch.arange(int(c), device=owner.device) for c in counts])
        order = torch.argsort(owner, stable=True)
        grouped[owner[order], slot] = tokens[order]
        grouped_mask[owner[order], slot] = mask[order]
        return MediaTokens(grouped, grouped_mask, grouped_mask.any(-1))

    def lm_forward(self, input_ids, attention_mask, media: MediaTokens, labels=None, repeat: int = 1):
        """LM outputs for text with media, through the fusion, and the labels at the LM's positions; `repeat` > 1
        repeats each sample's media for consecutive rows."""
        if repeat > 1:
            media = MediaTokens(*(x.repeat_interleave(repeat, 0) for x in media))
        with self.fusion.fuse(self.lm, input_ids, attention_mask, media, self.media_token_id, labels) as fused:
            out = self.lm(inputs_embeds=fused.inputs_embeds, attention_mask=fused.attention_mask,
                          position_ids=fused.position_ids, labels=fused.labels)
        return out, fused.labels

    def batch_media(self, batch: dict, aux_loss: bool = False):
        """The batch's media for :meth:`lm_forward`, :meth:`rank_choices` and :meth:`generate_answers`: tokens
        (B, M, T, D_lm), mask (B, M, T) and presence (B, M), each sample's media in text order (a
        :class:`~mmclin.fusion.MediaTokens`); with `aux_loss`, also the auxiliary loss (or None)."""
        tokens, mask, owner, *loss = self.encode_media(batch, aux_loss)
        media = self._group(tokens, mask, owner, len(batch["input_ids"]))
        return (media, *loss) if aux_loss else media

    # -- training ----------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        media, aux_loss = self.batch_media(batch, aux_loss=True)
        out, _ = self.lm_forward(batch["input_ids"], batch["attention_mask"], media, batch["labels"])
        size = len(batch["input_ids"])
        self.log("train/loss", out.loss, prog_bar=True, batch_size=size)
        if aux_loss is None:
            return out.loss
        self.log("train/aux_loss", aux_loss, batch_size=size)
        return out.loss + self.hparams.aux_loss_weight * aux_loss

    def configure_optimizers(self):
        return adamw_cosine(self, self.hparams.lr, self.hparams.weight_decay, self.hparams.warmup)

    # -- export ------------------------------------------------------------------------------------------
    def save_lm(self, directory) -> tuple[dict, dict]:
        """The LM and tokenizer into an export's `directory` (:func:`mmclin.models.mllm_export.save_lm_for_export`)."""
        return save_lm_for_export(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, base_lm: str | None = None) -> MultimodalLM:
        """The model of a directory written by ``tools/export.py --format mmclin``, without its training config.

        Args:
            directory: the export.
            base_lm: for an export of LoRA adapters: the base LM's local directory, where not the one recorded.
        """
        return load_multimodal_lm(cls, directory, base_lm).eval()

    def export_to(self, out: Path) -> tuple[dict[str, torch.Tensor], dict]:
        """The LM and tokenizer through ``save_pretrained`` into ``out/lm``; the rest of the weights returned."""
        lm_entry, lm_tensors = self.save_lm(out / LM_DIR)
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("lm.")}
        return {**own, **lm_tensors}, lm_entry

    @classmethod
    def from_export(cls, directory: Path, config, base_lm: str | None = None) -> MultimodalLM:
        return cls.from_pretrained(directory, base_lm)

    @torch.no_grad()
    def reference_outputs(self, generator: torch.Generator) -> torch.Tensor:
        """The LM's logits (1, T, V) for a question over seeded random media of the shape it was trained on."""
        batch = self.example_batch(generator)
        return self.lm_forward(batch["input_ids"], batch["attention_mask"], self.batch_media(batch))[0].logits.float()

    def example_batch(self, generator: torch.Generator) -> dict:
        """A one-question batch over seeded random media of the shape the model was trained on (export checks)."""
        if not self._media_shapes:
            raise CheckpointError("the model records no media shape (never trained, or a checkpoint from before "
                                  "media shapes were recorded): fit it again, or for a few steps, to export it")
        key, shape = next(iter(self._media_shapes.items()))
        medium = torch.randn(*shape, generator=generator)
        return self.collator([{key: [medium], "question": "What does this study show?", "answer": "normal",
                               "choices": ["normal", "abnormal"], "meta": {}}])

    # -- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def choice_scores(self, batch: dict, media) -> list[dict[str, float]]:
        """For each sample, every allowed choice's total log-likelihood given the prompt (empty for open ones)."""
        scores: list[dict[str, float]] = [{} for _ in batch["choices"]]
        k = max((len(c) for c in batch["choices"]), default=0)
        if k == 0:
            return scores
        tok = self.tokenizer
        rows, labels = [], []
        for i, choices in enumerate(batch["choices"]):
            prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
            for j in range(k):  # pad to k choices per sample so media can be repeated uniformly
                choice = choices[j] if j < len(choices) else choices[0]
                ids = tok(" " + choice, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                rows.append(prompt + ids)
                labels.append([IGNORE_INDEX] * len(prompt) + ids)
        width = max(map(len, rows))
        input_ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows], device=self.device)
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        target = torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in labels], device=self.device)
        out, shifted = self.lm_forward(input_ids, attention, media, target, repeat=k)
        logits, shifted = out.logits[:, :-1].float(), shifted[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), shifted.clamp(min=0), reduction="none")
        total = (-(nll * (shifted != IGNORE_INDEX)).sum(-1)).view(-1, k).tolist()
        for i, choices in enumerate(batch["choices"]):
            scores[i] = {choice: total[i][j] for j, choice in enumerate(choices)}
        return scores

    def rank_choices(self, batch: dict, media) -> list[str | None]:
        """For each sample, the allowed choice with the highest total log-likelihood given the prompt."""
        return [max(s, key=s.get) if s else None for s in self.choice_scores(batch, media)]

    def generation_length(self, choices: list[str] | None) -> int:
        """New tokens to generate for one question: ``max_new_tokens``, and at least its longest choice plus the
        end of text, so no allowed answer is cut off (which would parse to no choice)."""
        longest = max((len(self.tokenizer(" " + c, add_special_tokens=False).input_ids) for c in choices or ()),
                      default=0)
        return max(self.hparams.max_new_tokens, longest + 1)

    @torch.no_grad()
    def generate_answers(self, batch: dict, media) -> list[str]:
        """Greedy answers, each cut to its own question's ``generation_length``, so an answer does not depend on
        which other questions share its batch (or its rank, under DDP)."""
        ids, mask = batch["prompt_ids"], batch["prompt_mask"]
        lengths = [self.generation_length(c) for c in batch.get("choices") or [None] * len(ids)]
        options = {"max_new_tokens": max(lengths), "do_sample": False, "pad_token_id": self.tokenizer.pad_token_id}
        # From inputs_embeds, generate returns the new tokens only; it derives the position ids from the mask.
        with self.fusion.fuse(self.lm, ids, mask, media, self.media_token_id, padding_side="left") as fused:
            new = self.lm.generate(inputs_embeds=fused.inputs_embeds, attention_mask=fused.attention_mask, **options)
        return self.tokenizer.batch_decode([row[:n] for row, n in zip(new, lengths)], skip_special_tokens=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        media, aux_loss = self.batch_media(batch, aux_loss=True)
        out, labels = self.lm_forward(batch["input_ids"], batch["attention_mask"], media, batch["labels"])
        split = "test" if self.trainer.testing else "val"
        self.eval_loss[split].update(out.loss, weight=(labels[:, 1:] != IGNORE_INDEX).sum())
        self.log(f"{split}/loss", self.eval_loss[split], batch_size=len(batch["input_ids"]))
        if aux_loss is not None:
            self.log(f"{split}/aux_loss", aux_loss, batch_size=len(batch["input_ids"]), sync_dist=True)
        rows = self.answer_rows(batch, media)
        if split in (["test"] if self.hparams.blind_splits is None else self.hparams.blind_splits):
            self._add_blind_predictions(batch, rows)
        self._predictions += rows

    test_step = validation_step

    @torch.no_grad()
    def _add_blind_predictions(self, batch: dict, rows: list[dict]) -> None:
        """Each row's predictions with its media replaced by another study's and by zeros (``row["blind"]``)."""
        key = next(k for k in self.encoders if k in batch)
        media, lengths = batch[key], batch.get(f"{key}_lengths")
        previous = self._previous_media
        same_shape = previous is not None and previous.shape[1:] == media.shape[1:]
        pool = torch.cat([media, previous]) if same_shape else media
        length_pool = None if lengths is None else torch.cat([lengths, self._previous_lengths]) if same_shape \
            else lengths
        index = other_media_index(media, previous if same_shape else None)
        taken = torch.tensor([i if j is None else j for i, j in enumerate(index)], device=media.device)
        swapped = {key: pool[taken]} | ({f"{key}_lengths": length_pool[taken]} if length_pool is not None else {})
        # The most recent distinct media, this batch's first: a batch holding one study's questions only still
        # finds the study before it.
        kept = torch.tensor(recent_distinct(pool), device=media.device)
        self._previous_media = pool[kept].detach().clone()
        self._previous_lengths = None if length_pool is None else length_pool[kept]
        variants = {"shuffled_media": {**batch, **swapped}, "blank_media": {**batch, key: torch.zeros_like(media)}}
        for variant, altered in variants.items():
            altered_rows = self.answer_rows(altered, self.batch_media(altered))
            for i, (row, other) in enumerate(zip(rows, altered_rows)):
                usable = variant != "shuffled_media" or index[i] is not None
                row.setdefault("blind", {})[variant] = {k: other[k] for k in PREDICTION_KEYS} if usable else None

    @torch.no_grad()
    def answer_rows(self, batch: dict, media) -> list[dict]:
        """The evaluation rows of a batch: question, reference answer, greedy generation, the choice it parses to
        (the stripped text for open questions), the most likely choice, every choice's log-likelihood, the choices
        and the sample's metadata."""
        generated = self.generate_answers(batch, media)
        scores = self.choice_scores(batch, media)
        return [{"question": batch["question"][i], "answer": batch["answer"][i], "generated": text,
                 "parsed": parse_choice(text, batch["choices"][i]) if batch["choices"][i] else text.strip(),
                 "ranked": max(scores[i], key=scores[i].get) if scores[i] else None, "choice_loglik": scores[i],
                 "choices": batch["choices"][i], "meta": batch["meta"][i]}
                for i, text in enumerate(generated)]

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """One row per question: the generated answer, the choice it parses to, every choice's log-likelihood and
        the most likely one (closed questions), with the question, the reference answer where the data has one,
        and the sample's metadata; rows for :class:`mmclin.predict.JSONLPredictionWriter`."""
        media = self.batch_media(batch)
        generated = self.generate_answers(batch, media)
        scores = self.choice_scores(batch, media)
        rows = []
        for i, text in enumerate(generated):
            choices = batch["choices"][i]
            rows.append({"question": batch["question"][i], "generated": text,
                         "parsed": parse_choice(text, choices) if choices else text.strip(),
                         "ranked": max(scores[i], key=scores[i].get) if scores[i] else None,
                         "choice_loglik": scores[i], "answer": batch["answer"][i], "meta": batch["meta"][i]})
        return rows

    def on_validation_epoch_start(self) -> None:
        self._predictions = []
        self._previous_media, self._previous_lengths = None, None

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        self._finish_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._finish_epoch("test")

    def _finish_epoch(self, prefix: str) -> None:
        """Write this rank's predictions, then score the union of all ranks' (identically on every rank).

        Logs ``{prefix}/acc_generation`` (parsed greedy answers) and ``{prefix}/acc_likelihood`` (choice with
        the highest likelihood), and their macro-F1 over the answer classes, over the questions with choices;
        then the evaluator's scores. Rank 0 merges the per-rank files into ``predictions.jsonl``.
        """
        directory = self._predictions_dir(prefix)
        rows = gather_rows(self, self._predictions, directory)
        if not rows:
            return
        metrics = {}
        for level in ("", "_token") if self.hparams.aux_classes else ():  # per medium, per token
            for name, auroc in zip(self.hparams.aux_classes, self.aux_auroc[prefix + level]
                                   if prefix + level in self.aux_auroc else ()):
                if auroc.update_count:
                    with auroc.sync_context():  # every rank's scores
                        scores, truth = dim_zero_cat(auroc.preds), dim_zero_cat(auroc.target)
                    if 0 < int(truth.sum()) < len(truth):  # undefined where every medium has the class, or none
                        metrics[f"{prefix}/aux_auroc{level}/{name}"] = float(binary_auroc(scores, truth))
                    auroc.reset()
        closed = [r for r in rows if r["choices"]]  # open answers (reports) are scored by the evaluator only
        metrics.update(self._score_rows(rows, prefix))
        if any("blind" in r for r in rows):  # the same model with other studies' and blank media
            for variant in BLIND_VARIANTS:
                blind = self._score_rows(variant_rows(rows, variant), prefix)
                metrics.update({f"{prefix}/baseline/{variant}_{k.removeprefix(prefix + '/')}": v
                                for k, v in blind.items() if "_ci_" not in k})
            metrics.update(paired_accuracy_differences(rows, prefix))
        self.log_dict(metrics)
        if not self.trainer.sanity_checking:
            self._log_figures(prefix, rows, closed)
        if self.global_rank == 0:
            tmp = directory / "predictions.jsonl.tmp"
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            os.replace(tmp, directory / "predictions.jsonl")

    def _score_rows(self, rows: list[dict], prefix: str) -> dict[str, float]:
        """Accuracy and macro-F1 of the closed questions by generation and by likelihood, then the evaluator's."""
        metrics = {}
        closed = [r for r in rows if r["choices"]]
        for name, key in (("generation", "parsed"), ("likelihood", "ranked")) if closed else ():
            metrics[f"{prefix}/acc_{name}"] = sum(r[key] == r["answer"] for r in closed) / len(closed)
            metrics[f"{prefix}/macro_f1_{name}"] = macro_f1([r["answer"] for r in closed], [r[key] for r in closed])
        if self.evaluator is not None and rows:
            metrics.update(self.evaluator(rows, prefix))
        return metrics

    def _log_figures(self, prefix: str, rows: list[dict], closed: list[dict]) -> None:
        """Confusion matrix of the likelihood-ranked answers of closed questions (up to 20 answer classes) and
        the first generations beside their references, to the run's logger (and plots/)."""
        answers = sorted({r["answer"] for r in closed})
        if 1 < len(answers) <= 20:
            index = {a: i for i, a in enumerate(answers)}
            matrix = [[0] * len(answers) for _ in answers]
            for r in closed:
                if r["ranked"] in index:
                    matrix[index[r["answer"]]][index[r["ranked"]]] += 1
            log_figure(self, f"{prefix}/answer_confusion", plot_confusion_matrix(matrix, answers, None,
                                                                                f"{prefix}: ranked answers"))
        def cell(text) -> str:  # one Markdown table cell
            return str(text).replace("|", "/").replace("\n", " ")[:300]

        table = ["| question | reference | generated |", "|---|---|---|"]
        table += [f"| {cell(r['question'])} | {cell(r['answer'])} | {cell(r['generated'])} |" for r in rows[:8]]
        log_text(self, f"{prefix}/generations", "\n".join(table))

    def _predictions_dir(self, prefix: str) -> Path:
        root = self.hparams.predictions_dir or run_dir(self.trainer)
        directory = Path(root) / f"{prefix}-predictions"
        directory.mkdir(parents=True, exist_ok=True)
        return directory


def _check_settings(encoders: dict, lm: dict, tokenizer_vocab, aux_classes, aux_level: str, aux_tokens: bool) -> None:
    """The constructor's settings that cannot work together, as ConfigErrors."""
    foreign = {k: type(e).__name__ for k, e in encoders.items() if not isinstance(e, Encoder)}
    if foreign:
        raise ConfigError(f"encoders {foreign}: an encoder subclasses mmclin.contracts.Encoder (out_dim, grid, "
                          "regions; forward returns an EncoderOutput)")
    if tokenizer_vocab is not None and lm.get("tiny") is None:
        raise ConfigError("tokenizer_vocab fits a tokenizer for a random-init LM (lm.tiny); a pretrained LM keeps "
                          "the tokenizer its embeddings were trained with")
    if not encoders:
        raise ConfigError("encoders must name at least one modality, e.g. {'series': ...}")
    if aux_level not in ("token", "medium"):
        raise ConfigError(f"aux_level must be 'token' or 'medium', got {aux_level!r}")
    if aux_tokens and not aux_classes:
        raise ConfigError("aux_tokens needs aux_classes: one finding token per auxiliary class")
    gridless = [k for k, e in encoders.items() if e.grid is None] if aux_classes and aux_level == "token" \
        else []
    if gridless:
        raise ConfigError(f"aux_level 'token': encoder(s) {gridless} have no token grid to pool targets to; "
                          "use aux_level 'medium' for one target vector per medium")


def _region_channels(encoders: dict, aux_classes: list[str]) -> dict[str, list[int]]:
    """For each encoder with a region head, the aux-class channels of its regions."""
    channels = {}
    for key, encoder in encoders.items():
        regions = encoder.regions
        if regions is None:
            continue
        missing = [r for r in regions if r not in aux_classes]
        if missing:
            raise ConfigError(f"encoder {key!r} segments regions {missing}, which must be aux_classes too: their "
                              f"dense targets train its region head (aux_classes: {list(aux_classes)})")
        channels[key] = [aux_classes.index(r) for r in regions]
    return channels
