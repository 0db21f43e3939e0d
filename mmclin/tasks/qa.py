"""Question answering over media: batching of prompts, answers and media, and answer parsing.

A sample is a dict ``{"series": [ (C, L) tensors ], "question": str, "answer": str, "choices": [str] | None}``;
each ``<media>`` placeholder in the question stands for one medium, in order. A question without
placeholders gets one per medium in front of it. The media key is the model's modality (``series`` for time
series, ``image`` for photographs (C, H, W), ``volume`` for CT (C, D, H, W)); media are padded along their last
axis, so series of different lengths batch, and images or volumes of one grid batch as they are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from mmclin.contracts import IGNORE_INDEX
from mmclin.errors import ConfigError, DataError
from mmclin.llm import MEDIA_TOKEN

PROMPT_TEMPLATE = "{question}\nAnswer:"


def _pad(rows: Sequence[Sequence[int]], value: int, side: str) -> torch.Tensor:
    width = max(len(r) for r in rows)
    padded = [([value] * (width - len(r)) + list(r)) if side == "left" else (list(r) + [value] * (width - len(r)))
              for r in rows]
    return torch.tensor(padded, dtype=torch.long)


class QACollator:
    """Turns QA samples into a batch for :class:`~mmclin.models.mllm.MultimodalLM`.

    The batch holds ``input_ids``/``attention_mask``/``labels`` (prompt + answer, right-padded, loss only on the
    answer and its end-of-sequence token), ``prompt_ids``/``prompt_mask`` (prompt only, left-padded, for
    generation and choice ranking), the media flattened over the batch as ``series`` (N, C, L_max) with
    ``series_lengths`` (N,) and ``series_sample`` (N,) (the sample each medium belongs to, in text order),
    and the raw ``question``, ``answer``, ``choices`` and ``meta``. With another media key (e.g. ``image``)
    the media fields are named after it (``image``, ``image_lengths``, ``image_sample``). Samples that carry
    per-medium dense targets (``volume_targets``: a list like their media, of equal-shape tensors) add them
    stacked as ``volume_targets`` (N, C, ...), for token supervision of the encoder.
    """

    def __init__(
        self,
        tokenizer,
        prompt_template: str = PROMPT_TEMPLATE,
        media_token: str = MEDIA_TOKEN,
        media_keys: Sequence[str] = ("series",),
    ):
        """
        Args:
            tokenizer: the LM's tokenizer, with ``media_token`` as a single special token and a pad token.
            prompt_template: format string with ``{question}``.
            media_token: the placeholder text of one medium.
            media_keys: the modalities a sample may carry (the model's encoder keys); each batch holds exactly one,
                whose media list is under that key of the samples and names the batch's media fields.
        """
        if tokenizer.pad_token_id is None:
            raise ConfigError("the tokenizer needs a pad token (mmclin.llm.add_media_token sets one)")
        self.tokenizer = tokenizer
        self.prompt_template = prompt_template
        self.media_token = media_token
        self.media_keys = tuple(media_keys)

    def prompt(self, question: str, n_media: int) -> str:
        found = question.count(self.media_token)
        if found == 0:
            question = self.media_token * n_media + "\n" + question
        elif found != n_media:
            raise DataError(f"question has {found} {self.media_token} placeholder(s) but {n_media} media: "
                            f"{question!r}")
        return self.prompt_template.format(question=question)

    def __call__(self, samples: list[dict]) -> dict:
        tok = self.tokenizer
        found = {k for s in samples for k in self.media_keys if k in s}
        if len(found) != 1 or any(k not in s for s in samples for k in found):
            raise DataError(f"every sample of a batch must carry the same one of the modalities {self.media_keys}; "
                            f"found {sorted(found) or 'none'} (sample keys: {sorted(samples[0])})")
        key = found.pop()
        prompts = [tok(self.prompt(s["question"], len(s[key])))["input_ids"] for s in samples]
        answers = [tok(" " + s["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                   for s in samples]
        full = [p + a for p, a in zip(prompts, answers)]
        labels = [[IGNORE_INDEX] * len(p) + a for p, a in zip(prompts, answers)]
        media = [x for s in samples for x in s[key]]
        if not media:
            raise DataError(f"a QA batch needs at least one {key}")
        leading = {tuple(x.shape[:-1]) for x in media}
        if len(leading) != 1:
            raise DataError(f"{key} media in one batch must agree in all but their last axis; got shapes "
                            f"{sorted({tuple(x.shape) for x in media})}")
        lengths = torch.tensor([x.shape[-1] for x in media])
        padded = torch.zeros(len(media), *media[0].shape[:-1], int(lengths.max()))
        for i, x in enumerate(media):
            padded[i, ..., : x.shape[-1]] = torch.as_tensor(x, dtype=torch.float32)
        targets = [x for s in samples for x in s.get(f"{key}_targets", ())]
        if targets and len(targets) != len(media):
            raise DataError(f"{len(targets)} {key}_targets for {len(media)} {key} media: give every medium its "
                            "targets or none")
        return ({f"{key}_targets": torch.stack([torch.as_tensor(t) for t in targets])} if targets else {}) | {
            "input_ids": _pad(full, tok.pad_token_id, "right"),
            "attention_mask": _pad([[1] * len(r) for r in full], 0, "right"),
            "labels": _pad(labels, IGNORE_INDEX, "right"),
            "prompt_ids": _pad(prompts, tok.pad_token_id, "left"),
            "prompt_mask": _pad([[1] * len(r) for r in prompts], 0, "left"),
            key: padded,
            f"{key}_lengths": lengths,
            f"{key}_sample": torch.tensor([i for i, s in enumerate(samples) for _ in s[key]]),
            "question": [s["question"] for s in samples],
            "answer": [s["answer"] for s in samples],
            "choices": [list(s.get("choices") or []) for s in samples],
            "meta": [s.get("meta", {}) for s in samples],
        }


def normalise_answer(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s-]", " ", text.lower())).strip()


def parse_choice(generated: str, choices: Sequence[str]) -> str | None:
    """The allowed choice a generated answer states, or None.

    An exact match (after lower-casing and dropping punctuation) wins; otherwise the choice named earliest in
    the text, longest first at equal positions (so "sinus bradycardia" beats "sinus"). Position, not list order,
    decides, so the parser has no bias towards the first-listed choice.
    """
    text = normalise_answer(generated.split("\n")[0])
    options = {normalise_answer(c): c for c in choices}
    if text in options:
        return options[text]
    found = []
    for norm, original in options.items():
        match = re.search(rf"(?<!\w){re.escape(norm)}(?!\w)", text)
        if match:
            found.append((match.start(), -len(norm), original))
    return min(found)[2] if found else None

