"""Report error-checking as a question about a radiograph and its report: the question, the answers and the
radiograph as the multimodal checker reads it. Shared by the datamodule (training) and the checker (inference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2.functional import resize

from datamodules.images import read_image
from mmclin.errors import DataError
from mmclin.reports.injection import FINE_TYPES

QUESTION = "Is there an error in this report? If so, which type?"
NO_ERROR_ANSWER = "error: no"


def error_answer(fine_type: str | None) -> str:
    """The QA answer of a report: ``error: no`` or ``error: yes; type: <fine_type>``."""
    return NO_ERROR_ANSWER if fine_type is None else f"error: yes; type: {fine_type}"


def parse_error_answer(answer: str | None) -> dict:
    """``error: no`` / ``error: yes; type: X`` -> has_error, fine_type and coarse_type (None where not stated or
    not one of FINE_TYPES: a generated "type: negation_fl" says there is an error, not which)."""
    text = (answer or "").strip().lower()
    if not text.startswith("error: yes"):
        return {"has_error": False, "fine_type": None, "coarse_type": None}
    fine = text.partition("type:")[2].strip()
    fine = fine if fine in FINE_TYPES else None
    return {"has_error": True, "fine_type": fine, "coarse_type": FINE_TYPES.get(fine)}


def load_radiograph(record: dict, image_size: int | None = None) -> torch.Tensor:
    """A record's first image as (1, H, W) float32 in [0, 1], resized to `image_size` square if given."""
    if not record.get("images"):
        raise DataError(f"report {record['id']}: no image, but images were asked for (with_images / mode='qa')")
    path = Path(record["images"][0])
    try:
        pixels = np.asarray(read_image(path, "L"), dtype=np.float32) / 255
    except DataError as err:
        raise DataError(f"report {record['id']}: {err}") from err
    tensor = torch.from_numpy(pixels)[None]
    if image_size is not None:
        tensor = resize(tensor, [image_size, image_size], antialias=True)
    return tensor
