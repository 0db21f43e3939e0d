"""A MultimodalLM as a report error checker: answers parsed into checker predictions, one per record."""

from __future__ import annotations

import numpy as np
from PIL import Image

from datamodules.report_errors import NO_ERROR_ANSWER, error_answer
from encoders.image2d import TimmImageEncoder
from mmclin.models.mllm import MultimodalLM
from mmclin.reports.injection import FINE_TYPES
from mmclin.reports.mllm_checker import MultimodalReportChecker, parse_error_answer


def test_parse_error_answer():
    assert parse_error_answer(NO_ERROR_ANSWER) == {"has_error": False, "fine_type": None, "coarse_type": None}
    assert parse_error_answer(error_answer("laterality_swap")) == {
        "has_error": True, "fine_type": "laterality_swap", "coarse_type": FINE_TYPES["laterality_swap"]}
    assert parse_error_answer("error: yes")["has_error"] and parse_error_answer(None)["has_error"] is False


def test_checker_predicts_one_allowed_answer_per_record(tmp_path):
    records = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray((np.random.default_rng(i).random((40, 40)) * 255).astype(np.uint8)).save(path)
        records.append({"id": str(i), "modified": "There is a small left pleural effusion.", "images": [str(path)]})
    encoder = TimmImageEncoder("vit_tiny_patch16_224", img_size=32,
                               model_kwargs={"depth": 1, "in_chans": 1, "embed_dim": 32, "num_heads": 2})
    model = MultimodalLM({"image": encoder}, lm={"tiny": {"hidden_size": 32, "intermediate_size": 64,
                                                          "max_position_embeddings": 512}})
    checker = MultimodalReportChecker(model, image_size=32, error_types=["laterality_swap", "negation_flip"],
                                      batch_size=2)
    predictions = checker(records)
    assert [p["id"] for p in predictions] == ["0", "1", "2"]
    assert all(p["fine_type"] in (None, "laterality_swap", "negation_flip") for p in predictions)
    assert all(p["has_error"] == (p["fine_type"] is not None) for p in predictions)
