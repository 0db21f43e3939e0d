"""Text-only radiology report error checker: a transformers encoder with a SIMPLE and a COMPLEX head.

SIMPLE says whether a report has an error (binary, BCE); COMPLEX says which fine error type it is, or ``none``
(cross-entropy over ``none`` + the fine types). The two losses are summed. At prediction time SIMPLE decides
whether there is an error and COMPLEX, among the error types only, names it, so a report never comes out as
"error, type none"; the logged COMPLEX scores use that same decision.

Tokenizer: with a pretrained encoder (a local directory) its own tokenizer. With a random-init encoder (a
``BertConfig`` dict, for demos and tests) a word-level tokenizer whose vocabulary is fitted on the clean
training reports when training starts (the datamodule's ``corpus("train")``); the vocabulary is then kept in
the checkpoint's hyper-parameters, so ``ReportChecker.load_from_checkpoint(path)`` rebuilds the same model.
Word tokens make reports ~5x shorter than bytes and give each side, severity or number word its own token; a
misspelled word reads as ``[UNK]``. ``tokenizer="byte"`` uses :func:`mmclin.llm.byte_tokenizer` instead, whose
vocabulary does not depend on the data (any text, no unknown words) at the price of long sequences.

Long reports: a report longer than the encoder's window (``max_length`` tokens) is read whole, in overlapping
windows of that length (the tokenizer's own overflow, :data:`WINDOW_OVERLAP` of the window shared), never cut
short. A report's logits are those of its window with the highest SIMPLE logit (multiple-instance max pooling:
the report has an error when any window shows one), in training as in prediction; predictions give the number of
windows read as ``n_windows``. English only: :meth:`ReportChecker.predict_reports` refuses a report that is not
English (:func:`mmclin.reports.language.non_english_reason`) rather than give it a verdict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryF1Score, MulticlassAccuracy, MulticlassF1Score
from tqdm import tqdm
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from mmclin.contracts import ClinicalDataModule, Servable
from mmclin.errors import ConfigError, DataError
from mmclin.export import ExportConfig, load_own_tensors
from mmclin.llm import byte_tokenizer
from mmclin.models.optim import adamw_cosine
from mmclin.reports.injection import IMAGE_DEPENDENT_TYPES
from mmclin.reports.language import non_english_reason

NO_ERROR = "none"

# A BERT small enough to train on a laptop CPU in minutes; BertConfig fields, overridden by `encoder`.
TINY_BERT: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
}
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
# Share of a window's length that overlaps the previous window of a long report, so that an error at a window
# edge is read whole in one of them.
WINDOW_OVERLAP = 1 / 8
WINDOWS_PER_PASS = 32  # encoder passes take at most this many windows: memory stays bounded for a 1 MB report


def word_tokenizer(
    texts: Iterable[str] | None = None,
    vocab: Sequence[str] | None = None,
    vocab_size: int = 4000,
    min_frequency: int = 2,
    model_max_length: int = 512,
) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer (words and punctuation marks) fitted on `texts`, or from `vocab`.

    Args:
        texts: training texts; the `vocab_size` most frequent words seen at least `min_frequency` times are kept
            (ties broken alphabetically, so the same texts give the same vocabulary).
        vocab: a vocabulary in id order (e.g. a fitted tokenizer's, from a checkpoint). Exactly one of the two.
        vocab_size: largest vocabulary, special tokens included.
        min_frequency: rarer words read as ``[UNK]``.
        model_max_length: longest sequence the paired encoder accepts.

    Returns:
        A tokenizer that wraps every text as ``[CLS] words [SEP]`` and pads with ``[PAD]`` (id 0).
    """
    if (texts is None) == (vocab is None):
        raise ValueError("word_tokenizer: pass exactly one of `texts` (to fit a vocabulary) and `vocab`")
    if vocab is not None:
        if list(vocab[: len(SPECIAL_TOKENS)]) != list(SPECIAL_TOKENS):
            raise ConfigError(f"vocab must start with {SPECIAL_TOKENS}; got {list(vocab[:len(SPECIAL_TOKENS)])}")
        backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(vocab)}, unk_token="[UNK]"))
    else:
        backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if texts is not None:
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=list(SPECIAL_TOKENS))
        backend.train_from_iterator(texts, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", backend.token_to_id("[CLS]")),
                                                 ("[SEP]", backend.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", model_max_length=model_max_length)


def vocabulary(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The tokenizer's tokens in id order."""
    return [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]


class ReportCollator:
    """Turns report samples into a batch: the windows of every report (:meth:`encode`), ``has_error`` (B,) float
    and ``fine_label`` (B,) long (index in ``classes``) when the samples carry labels, and ``meta``.

    A sample is ``{"text": str, "has_error": bool, "fine_type": str | None, "meta": dict}``.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, classes: Sequence[str], max_length: int):
        if not tokenizer.is_fast:  # the windows of a long report come from the fast tokenizers' overflow
            raise ConfigError(f"{type(tokenizer).__name__} is a slow tokenizer; the report checker needs a fast one "
                              "(a tokenizer.json beside the encoder) to read long reports in windows")
        self.tokenizer = tokenizer
        self.classes = list(classes)
        self.index = {name: i for i, name in enumerate(self.classes)}
        self.max_length = max_length

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Every text in windows of at most `max_length` tokens, special tokens included.

        Returns:
            ``input_ids``, ``attention_mask`` (W, T) right-padded, and ``window_report`` (W,) long: the text each
            window belongs to (W = len(texts) when every text fits one window).
        """
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                 stride=int(self.max_length * WINDOW_OVERLAP), return_overflowing_tokens=True,
                                 return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                "window_report": encoded["overflow_to_sample_mapping"].long()}

    def label(self, sample: dict) -> int:
        if not sample["has_error"]:
            return self.index[NO_ERROR]
        fine = sample.get("fine_type")
        if fine not in self.index or fine == NO_ERROR:
            record = sample.get("meta", {}).get("id", "?")
            raise DataError(f"report {record}: has_error is true but fine_type {fine!r} is not one of the model's "
                            f"error types {self.classes[1:]}")
        return self.index[fine]

    def __call__(self, samples: list[dict]) -> dict:
        batch = self.encode([s["text"] for s in samples])
        if all("has_error" in s for s in samples):
            batch["has_error"] = torch.tensor([float(bool(s["has_error"])) for s in samples])
            batch["fine_label"] = torch.tensor([self.label(s) for s in samples], dtype=torch.long)
        if all("image" in s for s in samples):  # with_images: the study images ride along, (B, 1, H, W)
            batch["image"] = torch.stack([s["image"] for s in samples])
        batch["meta"] = [s.get("meta", {}) for s in samples]
        return batch


class ReportChecker(Servable, L.LightningModule):
    """Report error detection (SIMPLE) and error typing (COMPLEX) from the report text alone."""

    def __init__(
        self,
        encoder: str | dict[str, Any] | None = None,
        tokenizer: Literal["word", "byte"] = "word",
        vocab: list[str] | None = None,
        vocab_size: int = 4000,
        min_word_count: int = 2,
        max_length: int = 512,
        fine_types: dict[str, str] | None = None,
        pooling: Literal["mean", "max", "cls"] = "mean",
        dropout: float = 0.1,
        complex_weight: float = 1.0,
        threshold: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup: float = 0.1,
    ):
        """
        Args:
            encoder: a local directory holding a pretrained transformers encoder and its tokenizer (read with
                ``AutoModel``/``AutoTokenizer``, offline), or ``BertConfig`` fields over ``TINY_BERT`` for a
                random-init BERT (None: ``TINY_BERT``).
            tokenizer: for a random-init encoder: ``word`` (vocabulary fitted on the training reports) or
                ``byte`` (:func:`mmclin.llm.byte_tokenizer`). Ignored with a pretrained encoder.
            vocab: the fitted word vocabulary in id order; set by training and stored in checkpoints, leave unset.
            vocab_size: largest word vocabulary (special tokens included).
            min_word_count: words seen fewer times in the training reports read as ``[UNK]``.
            max_length: reports are truncated to this many tokens.
            fine_types: the error types COMPLEX tells apart, each with its coarse type (insert / remove /
                substitute); default ``mmclin.reports.injection.FINE_TYPES``, kept in the checkpoint as resolved.
            pooling: report embedding: ``mean`` of the token states, their elementwise ``max``, or the ``cls``
                token's state.
            dropout: dropout before the heads.
            complex_weight: weight of the COMPLEX cross-entropy in the loss (SIMPLE BCE has weight 1).
            threshold: SIMPLE probability from which a report counts as erroneous.
            lr: peak AdamW learning rate.
            weight_decay: AdamW weight decay.
            warmup: linear warm-up: a fraction of the total steps if < 1, else a number of steps.
        """
        super().__init__()
        self.save_hyperparameters()
        if fine_types is None:
            from mmclin.reports.injection import FINE_TYPES

            fine_types = self.hparams["fine_types"] = dict(FINE_TYPES)
        if not fine_types or NO_ERROR in fine_types:
            raise ConfigError(f"fine_types must name at least one error type and not {NO_ERROR!r}; got {fine_types}")
        self.coarse_of = dict(fine_types)
        if pooling not in ("mean", "max", "cls"):
            raise ConfigError(f"pooling must be 'mean', 'max' or 'cls', got {pooling!r}")
        if tokenizer not in ("word", "byte"):
            raise ConfigError(f"tokenizer must be 'word' or 'byte', got {tokenizer!r}")
        self.classes = [NO_ERROR, *self.coarse_of]
        self.encoder: nn.Module | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.collator: ReportCollator | None = None
        self.dropout = nn.Dropout(dropout)
        metrics = {
            "simple_acc": BinaryAccuracy(), "simple_f1": BinaryF1Score(),
            "complex_acc": MulticlassAccuracy(len(self.classes), average="micro"),
            "complex_macro_f1": MulticlassF1Score(len(self.classes), average="macro"),
            # clean vs image-dependent errors, as the audit's bag-of-words baseline is scored
            "image_dependent_bacc": MulticlassAccuracy(2, average="macro"),
        }
        self.val_metrics = MetricCollection(metrics, prefix="val/")
        self.test_metrics = self.val_metrics.clone(prefix="test/")
        if isinstance(encoder, str):
            self._build(*self._pretrained(encoder))
        elif tokenizer == "byte" or vocab is not None:
            tok = byte_tokenizer(max_length) if tokenizer == "byte" else word_tokenizer(vocab=vocab,
                                                                                         model_max_length=max_length)
            self._build(tok, self._random_encoder(tok))
        # else: a word vocabulary is fitted on the training reports in setup()

    # -- building ----------------------------------------------------------------------------------------
    @staticmethod
    def _pretrained(directory: str) -> tuple[PreTrainedTokenizerBase, nn.Module]:
        path = Path(directory).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"encoder directory {directory!r} does not exist (expected a folder with "
                                    "config.json, the weights and the tokenizer files)")
        return (AutoTokenizer.from_pretrained(path, local_files_only=True),
                AutoModel.from_pretrained(path, local_files_only=True))

    def _random_encoder(self, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
        fields = {**TINY_BERT, **(self.hparams.encoder or {})}
        known = {f.name for f in dataclasses.fields(BertConfig)}
        unknown = sorted(set(fields) - known)
        if unknown:  # BertConfig keeps unknown keywords as attributes, so a typo would silently give the default
            raise ConfigError(f"encoder: unknown BertConfig fields {unknown}")
        if self.hparams.max_length > fields["max_position_embeddings"]:
            raise ConfigError(f"max_length={self.hparams.max_length} exceeds the encoder's max_position_embeddings="
                              f"{fields['max_position_embeddings']}")
        config = BertConfig(**{**fields, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id})
        return AutoModel.from_config(config, add_pooling_layer=False)

    def _build(self, tokenizer: PreTrainedTokenizerBase, encoder: nn.Module) -> None:
        if tokenizer.pad_token_id is None:
            raise ConfigError(f"{type(tokenizer).__name__} has no pad token; a report batch needs one")
        self.tokenizer, self.encoder = tokenizer, encoder
        width = encoder.config.hidden_size
        self.simple_head = nn.Linear(width, 1)
        self.complex_head = nn.Linear(width, len(self.classes))
        max_length = min(self.hparams.max_length, getattr(encoder.config, "max_position_embeddings", 10**9))
        self.collator = ReportCollator(tokenizer, self.classes, max_length)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, ClinicalDataModule):  # loaders given to the Trainer directly
            return
        if self.encoder is None:  # a word vocabulary fitted on the training reports
            tok = word_tokenizer(texts=datamodule.corpus("train"), vocab_size=self.hparams.vocab_size,
                                 min_frequency=self.hparams.min_word_count, model_max_length=self.hparams.max_length)
            self.hparams["vocab"] = vocabulary(tok)  # saved with every checkpoint: load_from_checkpoint rebuilds it
            self._build(tok, self._random_encoder(tok))
        self.connect_data(datamodule)

    def connect_data(self, datamodule: ClinicalDataModule) -> None:
        datamodule.connect(collator=self.collate)

    def collate(self, samples: list[dict]) -> dict:
        """The batch of `samples` by the model's current collator: a checkpoint's vocabulary rebuilds it after
        ``setup`` (``on_load_checkpoint``), so the datamodule holds this, not the collator of the moment."""
        return self.collator(samples)

    def study_data(self) -> dict:
        """Reports read as text (a checker trained without LightningCLI records no datamodule)."""
        return {"_class_path": "datamodules.report_errors.ReportErrorDataModule", "mode": "text"}

    def study_batch(self, items: list[dict]) -> dict:
        """The reports of `items` (``{"text", "meta"}``) as one batch.

        Raises:
            DataError: a report that is not in English (the checker gives it no verdict).
        """
        for item in items:
            reason = non_english_reason(item["text"])
            if reason:
                raise DataError(f"{item['meta']['input']}: {reason}; the checker reads English reports only and "
                                "gives this one no verdict")
        return self.collator(items)

    @classmethod
    def from_export(cls, directory: Path, config: ExportConfig, **kwargs) -> L.LightningModule:
        return load_own_tensors(cls, directory, config)

    @torch.no_grad()
    def reference_outputs(self, generator: torch.Generator) -> torch.Tensor:
        """SIMPLE and COMPLEX logits of a fixed report, flattened (`generator` is not needed)."""
        batch = self.collator.encode(["FINDINGS: The lungs are clear. No pleural effusion.\nIMPRESSION: Normal."])
        simple, complex_ = self(batch["input_ids"], batch["attention_mask"])
        return torch.cat([simple.float().reshape(-1), complex_.float().reshape(-1)])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Resuming a fit: setup() fitted a vocabulary before the weights arrive; the checkpoint's one wins.
        vocab = checkpoint.get("hyper_parameters", {}).get("vocab")
        if vocab and self.hparams.tokenizer == "word" and not isinstance(self.hparams.encoder, str) \
                and vocab != self.hparams.get("vocab"):
            self.hparams["vocab"] = vocab
            tok = word_tokenizer(vocab=vocab, model_max_length=self.hparams.max_length)
            self._build(tok, self._random_encoder(tok))

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SIMPLE logits (B,) and COMPLEX logits (B, 1 + n_fine_types) for token ids (B, T)."""
        if self.encoder is None:
            raise RuntimeError("ReportChecker is not built yet: fit it with a datamodule, or load a checkpoint")
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.hparams.pooling == "cls":
            pooled = states[:, 0]
        elif self.hparams.pooling == "max":  # an error is a local anomaly: the strongest token signal wins
            pooled = states.masked_fill(~attention_mask.bool().unsqueeze(-1), torch.finfo(states.dtype).min).amax(1)
        else:
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
        pooled = self.dropout(pooled)
        return self.simple_head(pooled).squeeze(-1), self.complex_head(pooled)

    def report_logits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SIMPLE (R,) and COMPLEX (R, 1 + n_fine_types) logits per report of a :meth:`ReportCollator.encode`
        batch, each report's those of its window with the highest SIMPLE logit, and its number of windows (R,)."""
        ids, mask, owner = batch["input_ids"], batch["attention_mask"], batch["window_report"]
        passes = [self(ids[i:i + WINDOWS_PER_PASS], mask[i:i + WINDOWS_PER_PASS])
                  for i in range(0, len(ids), WINDOWS_PER_PASS)]
        simple, fine = torch.cat([p[0] for p in passes]), torch.cat([p[1] for p in passes])
        n_reports = int(owner.max()) + 1
        with torch.no_grad():  # which window speaks for each report; the gradient flows through that window
            top = torch.full((n_reports,), -torch.inf, device=simple.device, dtype=simple.dtype)
            top = top.scatter_reduce(0, owner, simple.detach(), "amax")
            index = torch.arange(len(simple), device=simple.device)
            candidates = torch.where(simple.detach() == top[owner], index, len(simple))
            pick = torch.full((n_reports,), len(simple), device=simple.device).scatter_reduce(0, owner, candidates,
                                                                                              "amin")
        return simple[pick], fine[pick], torch.bincount(owner, minlength=n_reports)

    def _loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        simple, fine, _ = self.report_logits(batch)
        loss = F.binary_cross_entropy_with_logits(simple, batch["has_error"]) + \
            self.hparams.complex_weight * F.cross_entropy(fine, batch["fine_label"])
        return loss, simple, fine

    def decide(self, simple: torch.Tensor, fine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Error probability (B,) and predicted class index (B,): 0 (``none``) below the threshold, else the most
        likely error type."""
        p_error = torch.sigmoid(simple.float())
        best_type = fine[:, 1:].argmax(-1) + 1
        return p_error, torch.where(p_error >= self.hparams.threshold, best_type, torch.zeros_like(best_type))

    # -- training and evaluation -------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["has_error"]))
        return loss

    def _evaluate(self, batch: dict, prefix: str, metrics: MetricCollection) -> None:
        loss, simple, fine = self._loss(batch)
        p_error, decided = self.decide(simple, fine)
        n = len(batch["has_error"])
        metrics["simple_acc"].update(p_error >= self.hparams.threshold, batch["has_error"].long())
        metrics["simple_f1"].update(p_error >= self.hparams.threshold, batch["has_error"].long())
        metrics["complex_acc"].update(decided, batch["fine_label"])
        metrics["complex_macro_f1"].update(decided, batch["fine_label"])
        image_dependent = torch.tensor([c == NO_ERROR or c in IMAGE_DEPENDENT_TYPES for c in self.classes],
                                       device=decided.device)[batch["fine_label"]]
        metrics["image_dependent_bacc"].update((p_error >= self.hparams.threshold).long()[image_dependent],
                                               batch["has_error"].long()[image_dependent])
        self.log(f"{prefix}/loss", loss, batch_size=n, sync_dist=True)
        self.log_dict(metrics, batch_size=n)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

    def configure_optimizers(self):
        return adamw_cosine(self, self.hparams.lr, self.hparams.weight_decay, self.hparams.warmup)

    # -- inference ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_reports(self, records: Sequence[dict], batch_size: int = 32, progress: bool = True,
                        on_non_english: Literal["error", "skip"] = "error") -> list[dict]:
        """Check reports: for each ``{"modified": text, ...}`` record (e.g. from ``inject_corpus`` or an
        errors.jsonl), ``{"has_error": bool, "fine_type": str | None, "coarse_type": str | None,
        "p_error": float, "n_windows": int}`` in the same order (``n_windows`` > 1: a long report read in windows,
        flagged when any window is; see the module docstring).

        Args:
            records: dicts with the report text under ``modified``; other keys are ignored.
            batch_size: reports per forward pass (a long report's windows go in passes of ``WINDOWS_PER_PASS``).
            progress: show a tqdm progress bar.
            on_non_english: a report that is not English (:func:`mmclin.reports.language.non_english_reason`):
                ``error`` raises; ``skip`` gives it no verdict: ``has_error`` None and the reason under
                ``refused``.

        Raises:
            DataError: a record without its text, or a report not in English (unless skipped).
        """
        if self.collator is None:
            raise RuntimeError("ReportChecker is not built yet: fit it with a datamodule, or load a checkpoint")
        if on_non_english not in ("error", "skip"):
            raise ConfigError(f"on_non_english must be 'error' or 'skip', got {on_non_english!r}")
        texts, refused = [], {}
        for i, record in enumerate(records):
            text = record.get("modified") if isinstance(record, dict) else None
            name = record.get("id", i) if isinstance(record, dict) else i
            if not isinstance(text, str):
                raise DataError(f"record {name}: expected a dict with the report text under 'modified'")
            reason = non_english_reason(text)
            if reason and on_non_english == "error":
                raise DataError(f"report {name}: {reason}; the checker reads English reports only and gives this "
                                "one no verdict")
            texts.append(text)
            if reason:
                refused[i] = reason
        checked = [i for i in range(len(texts)) if i not in refused]
        was_training = self.training
        self.eval()
        results = {i: {"has_error": None, "fine_type": None, "coarse_type": None, "p_error": None, "n_windows": 0,
                       "refused": reason} for i, reason in refused.items()}
        try:
            for start in tqdm(range(0, len(checked), batch_size), desc="Checking reports", unit="batch",
                              disable=not progress):
                chunk = checked[start:start + batch_size]
                batch = {k: v.to(self.device) for k, v in self.collator.encode([texts[i] for i in chunk]).items()}
                results.update(zip(chunk, self.predict_step(batch, 0)))
        finally:
            self.train(was_training)
        return [results[i] for i in range(len(texts))]

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """The :meth:`predict_reports` dicts of a batch (``trainer.predict`` on the datamodule's test split)."""
        simple, fine, n_windows = self.report_logits(batch)
        p_error, decided = self.decide(simple, fine)
        results = []
        for p, c, n in zip(p_error.tolist(), decided.tolist(), n_windows.tolist()):
            fine_type = None if c == 0 else self.classes[c]
            results.append({"has_error": fine_type is not None, "fine_type": fine_type,
                            "coarse_type": self.coarse_of[fine_type] if fine_type else None, "p_error": p,
                            "n_windows": n})
        return results
