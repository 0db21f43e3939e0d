"""MMedPO-style alignment of a supervised MultimodalLM: clinically weighted DPO on preference pairs.

Zhu et al. 2024 (arXiv:2412.06141) align a medical VLM after supervised fine-tuning with DPO (Rafailov et al.
2023) on pairs whose rejected side is a clinically meaningful mistake, each pair weighted by its clinical
relevance, normalised per batch. Here the policy starts as the supervised checkpoint (`init_from`) and the
reference is that checkpoint frozen: a copy, or with `lora` the same network with the new adapters disabled
(the supervised LoRA, if any, is merged first), so no second LM is held. Validation and test score the policy
beside the supervised model on the same studies (:mod:`mmclin.preference.evaluation`), paired.
"""

from __future__ import annotations

import copy
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from peft import PeftModel

from mmclin.checkpoints import load_module, own_hyperparameters
from mmclin.contracts import IGNORE_INDEX, ClinicalDataModule, Servable
from mmclin.distributed import gather_rows
from mmclin.errors import ConfigError
from mmclin.llm import apply_lora
from mmclin.models.mllm import MultimodalLM
from mmclin.models.optim import adamw_cosine
from mmclin.plots import log_figure, plot_effects
from mmclin.preference.evaluation import effects_table, paired_effects
from mmclin.preference.loss import weighted_dpo_loss
from mmclin.runs import run_dir


class MMedPO(Servable, L.LightningModule):
    """A MultimodalLM aligned by clinically weighted DPO, on :class:`datamodules.preference.PreferenceDataModule`."""

    def __init__(
        self,
        init_from: str | None = None,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        weighting: Literal["clinical", "uniform"] = "clinical",
        span: Literal["differing", "whole"] = "differing",
        lora: dict[str, Any] | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        warmup: float = 0.1,
        n_boot: int = 1000,
    ):
        """
        Args:
            init_from: the supervised MultimodalLM checkpoint (``lightning fit`` of a QA / report config).
            beta: DPO's KL temperature.
            label_smoothing: conservative DPO's assumed rate of flipped labels (0: plain DPO).
            sft_weight: weight of the chosen answers' token NLL added to the loss (0: none).
            weighting: ``clinical`` (each pair's clinical weight, normalised per batch) or ``uniform`` (the
                ablation).
            span: which answer tokens the preference is scored on: ``differing`` (from the first token where
                chosen and rejected differ to the last, so the words they share, such as an unchanged
                impression after an edited finding, are not pushed down with the rejected side), or ``whole``
                (plain DPO's whole answers).
            lora: train new LoRA adapters (peft; ``{"r", "alpha", ...}`` as :func:`mmclin.llm.load_causal_lm`)
                on the frozen supervised model; the reference is then that model with the adapters disabled.
                None: train what the supervised run trained, against a frozen copy.
            lr: peak AdamW learning rate.
            weight_decay: AdamW weight decay.
            warmup: linear warm-up: a fraction of the total steps if < 1, else a number of steps.
            n_boot: bootstrap resamples of the paired before/after intervals.
        """
        super().__init__()
        self.save_hyperparameters()
        if not init_from:
            raise ConfigError("init_from: MMedPO aligns a supervised model: pass its checkpoint, e.g. "
                              "--model.init_args.init_from runs/fundus-report/.../checkpoints/last.ckpt")
        if span not in ("differing", "whole"):
            raise ConfigError(f"span must be 'differing' or 'whole', got {span!r}")
        if weighting not in ("clinical", "uniform"):
            raise ConfigError(f"weighting must be 'clinical' or 'uniform', got {weighting!r}")
        with own_hyperparameters():
            policy, _ = load_module(init_from, expected=MultimodalLM)
        if lora is not None:
            if isinstance(policy.lm, PeftModel):  # the supervised adapters become part of the reference
                policy.lm = policy.lm.merge_and_unload()
            policy.requires_grad_(False)
            policy.lm = apply_lora(policy.lm, lora)
            self.reference = None
        else:
            self.reference = copy.deepcopy(policy).requires_grad_(False).eval()
        self.policy = policy
        self.train()  # Lightning keeps each module's mode from here: frozen parts in eval (see train)
        self._rows: list[dict] = []
        self._before: dict[str, list[dict]] = {}  # split -> the supervised model's rows (computed once)
        self._before_batch: list[dict] = []

    # -- the reference ------------------------------------------------------------------------------------
    def _reference(self):
        """(module, context): the frozen supervised model, or the policy with its adapters disabled."""
        if self.reference is not None:
            return self.reference, nullcontext()
        return self.policy, self.policy.lm.disable_adapter()

    @torch.no_grad()
    def reference_answers(self, samples: list[dict], generate: bool = False) -> list[str | None]:
        """The supervised model's answers to QA samples (lesion-noise and own-answer pairs): the choice it ranks
        first for a closed question, or with `generate` its generation (as for an open one)."""
        module, context = self._reference()
        device = next(module.parameters()).device
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in module.collator(samples).items()}
        was_training = module.training
        module.eval()
        try:
            with context:
                media = module.batch_media(batch)
                unset = [None] * len(batch["choices"])
                ranked = module.rank_choices(batch, media) if any(batch["choices"]) and not generate else unset
                generated = module.generate_answers(batch, media) if generate or not all(batch["choices"]) \
                    else unset
        finally:
            module.train(was_training)
        return [r if choices and not generate else g for g, r, choices in zip(generated, ranked, batch["choices"])]

    def setup(self, stage: str) -> None:
        if isinstance(self.trainer.datamodule, ClinicalDataModule):
            self.connect_data(self.trainer.datamodule)

    def connect_data(self, datamodule: ClinicalDataModule) -> None:
        """Pairs (and the base's samples) are batched by :meth:`collator`; the pairs of the supervised model's own
        answers come from :meth:`reference_answers`."""
        datamodule.connect(collator=self.collator, answerer=self.reference_answers)

    def study_batch(self, items: list[dict]) -> dict:
        return self.collator(items)

    def reference_outputs(self, generator: torch.Generator) -> torch.Tensor:
        return self.policy.reference_outputs(generator)

    # -- batches --------------------------------------------------------------------------------------------
    def collator(self, samples: list[dict]) -> dict:
        """Pairs -> one QA batch of the chosen answers then the rejected ones (the same media, or for a
        ``noised_input`` pair the same answer with the noised media), with ``weights``; plain QA samples
        (validation, test) -> the policy's batch."""
        if "chosen" not in samples[0]:
            return self.policy.collator(samples)
        plain = [{k: v for k, v in s.items() if k != "rejected_media"} for s in samples]
        rows = [{**p, "answer": s["chosen"]} for p, s in zip(plain, samples)] \
            + [{**p, **s.get("rejected_media", {}), "answer": s["rejected"]} for p, s in zip(plain, samples)]
        batch = self.policy.collator(rows)
        batch["weights"] = torch.tensor([float(s["weight"]) for s in samples])
        batch["kinds"] = [s["kind"] for s in samples]
        batch["spans"] = differing_spans(batch["labels"], len(samples))
        return batch

    @staticmethod
    def sequence_logps(module: MultimodalLM, batch: dict, spans: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row: the summed log-probability of its answer tokens inside `spans` ((B, 2) [start, end) in answer-
        token positions; None: all), of all its answer tokens, and their count."""
        media = module.batch_media(batch)
        out, labels = module.lm_forward(batch["input_ids"], batch["attention_mask"], media, batch["labels"])
        logits, labels = out.logits[:, :-1].float(), labels[:, 1:]
        mask = labels != IGNORE_INDEX
        logp = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0)[..., None])[..., 0] * mask
        whole = logp.sum(-1)
        if spans is None:
            return whole, whole, mask.sum(-1)
        rank = mask.cumsum(-1) - 1  # the position of each answer token within its answer
        inside = mask & (rank >= spans[:, :1].to(rank)) & (rank < spans[:, 1:].to(rank))
        return (logp * inside).sum(-1), whole, mask.sum(-1)

    # -- training ---------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        n = len(batch["weights"])
        spans = batch["spans"] if self.hparams.span == "differing" else None
        logp, whole, count = self.sequence_logps(self.policy, batch, spans)
        module, context = self._reference()
        with torch.no_grad(), context:
            ref_logp, _, _ = self.sequence_logps(module, batch, spans)
        weights = batch["weights"] if self.hparams.weighting == "clinical" else None
        out = weighted_dpo_loss(logp[:n], logp[n:], ref_logp[:n], ref_logp[n:], weights, self.hparams.beta,
                                self.hparams.label_smoothing)
        loss = out.loss
        if self.hparams.sft_weight:
            nll = -(whole[:n] / count[:n].clamp(min=1)).mean()  # every chosen token, not just the differing ones
            loss = loss + self.hparams.sft_weight * nll
            self.log("train/sft_nll", nll, batch_size=n)
        margin = out.chosen_rewards - out.rejected_rewards
        self.log_dict({"train/loss": loss, "train/dpo_loss": out.loss,
                       "train/rewards_chosen": out.chosen_rewards.mean(),
                       "train/rewards_rejected": out.rejected_rewards.mean(), "train/reward_margin": margin.mean(),
                       "train/reward_accuracy": (margin > 0).float().mean()}, batch_size=n)
        return loss

    def configure_optimizers(self):
        return adamw_cosine(self, self.hparams.lr, self.hparams.weight_decay, self.hparams.warmup)

    # -- evaluation: the policy beside the supervised model ---------------------------------------------------
    @torch.no_grad()
    def _rows_of(self, module: MultimodalLM, batch: dict) -> list[dict]:
        return module.answer_rows(batch, module.batch_media(batch))

    def _split(self) -> str:
        return "test" if self.trainer.testing else "val"

    def on_validation_epoch_start(self) -> None:
        self._rows, self._before_batch = [], []

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._rows += self._rows_of(self.policy, batch)
        if self._split() not in self._before and not self.trainer.sanity_checking:  # the supervised model, once
            module, context = self._reference()
            with context:
                self._before_batch += self._rows_of(module, batch)

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self._finish(self._split())

    on_test_epoch_end = on_validation_epoch_end

    def _finish(self, split: str) -> None:
        directory = Path(run_dir(self.trainer)) / f"{split}-predictions"
        if self.trainer.sanity_checking:  # a few batches: no before/after to compare, nothing to keep
            return
        if split not in self._before:  # every rank's rows, in the split's order (see mmclin.distributed)
            self._before[split] = gather_rows(self, self._before_batch, directory, "before-")
        before, after = self._before[split], gather_rows(self, self._rows, directory, "after-")
        if not after or len(before) != len(after):
            return
        effects = paired_effects(before, after, n_boot=self.hparams.n_boot)
        metrics = {}
        for name, e in effects.items():
            metrics[f"{split}/{name}"] = e["after"]
            metrics[f"{split}/before/{name}"] = e["before"]
            metrics[f"{split}/delta/{name}"] = e["delta"]
            metrics[f"{split}/delta_ci_low/{name}"] = e["delta_ci_low"]
            metrics[f"{split}/delta_ci_high/{name}"] = e["delta_ci_high"]
        self.log_dict(metrics)
        if self.trainer.is_global_zero:
            for name, rows in (("before", before), ("after", after)):
                (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            (directory / "effects.json").write_text(json.dumps(effects, indent=2), encoding="utf-8")
            rank_zero_info(f"{split}: supervised (before) against aligned (after), {len(after)} studies:\n"
                           + effects_table(effects))
        log_figure(self, f"{split}/before_after", plot_effects(effects, f"{split}: aligned minus supervised"))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # always: no dropout in the reference's log-probabilities
        else:  # LoRA: the frozen encoders are the reference's too; their norm statistics must not move
            for part in (self.policy.encoders, self.policy.connectors, self.policy.fusion):
                part.eval()
        return self


def differing_spans(labels: torch.Tensor, n: int) -> torch.Tensor:
    """[start, end) of the answer tokens where each pair's chosen (row i) and rejected (row n + i) answers differ:
    after their common prefix and before their common suffix; the whole answer when the two are the same text
    (a ``noised_input`` pair differs in its input). (2n, 2), in positions within each answer."""
    answers = [row[row != IGNORE_INDEX].tolist() for row in labels]
    spans = torch.zeros(2 * n, 2, dtype=torch.long)
    for i in range(n):
        chosen, rejected = answers[i], answers[n + i]
        if chosen == rejected:
            spans[i] = spans[n + i] = torch.tensor([0, len(chosen)])
            continue
        shortest = min(len(chosen), len(rejected))
        prefix = next((k for k in range(shortest) if chosen[k] != rejected[k]), shortest)
        suffix = next((k for k in range(shortest - prefix) if chosen[-1 - k] != rejected[-1 - k]), shortest - prefix)
        spans[i] = torch.tensor([prefix, len(chosen) - suffix])
        spans[n + i] = torch.tensor([prefix, len(rejected) - suffix])
    return spans
