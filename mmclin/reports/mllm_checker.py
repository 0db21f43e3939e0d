"""Report error-checking with a :class:`~mmclin.models.mllm.MultimodalLM` trained on image + report questions.

The model was trained (``configs/cxr-error-check.yaml``) to answer ``error: no`` or ``error: yes; type: <fine
type>`` to a radiograph and the report; here every allowed answer is ranked by its likelihood, the way
validation scores closed questions, and the best is turned into a checker prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from mmclin.errors import ConfigError
from mmclin.reports.injection import FINE_TYPES
from mmclin.reports.qa import NO_ERROR_ANSWER, QUESTION, error_answer, load_radiograph, parse_error_answer


class MultimodalReportChecker:
    """Callable checker over records ``{"id", "modified", "images"}`` (the report and its image paths)."""

    def __init__(self, module, image_size: int | None = None, error_types: Sequence[str] | None = None,
                 batch_size: int = 8):
        """
        Args:
            module: a trained MultimodalLM whose encoder key is ``image``.
            image_size: the side the training images were resized to (the datamodule's ``image_size``).
            error_types: the fine types it was trained to name (default all of ``FINE_TYPES``).
            batch_size: reports per forward pass.
        """
        if "image" not in module.encoders:
            raise ConfigError(f"the model has no 'image' encoder (has {list(module.encoders)}); it cannot read "
                              "radiographs")
        self.module = module.eval()
        self.choices = [NO_ERROR_ANSWER] + [error_answer(t) for t in (error_types or FINE_TYPES)]
        self.image_size = image_size
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, records: list[dict]) -> list[dict]:
        out = []
        for start in tqdm(range(0, len(records), self.batch_size), desc="multimodal checker", unit="batch"):
            chunk = records[start:start + self.batch_size]
            samples = [{"image": [load_radiograph(r, self.image_size)], "question": f"{r['modified']}\n{QUESTION}",
                        "answer": NO_ERROR_ANSWER, "choices": self.choices, "meta": {}} for r in chunk]
            batch = self.module.collator(samples)
            picks = self.module.rank_choices(batch, self.module.batch_media(batch))
            out += [{"id": r["id"], **parse_error_answer(p)} for r, p in zip(chunk, picks)]
        return out
