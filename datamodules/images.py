"""Photographs and radiographs as the models take them: one reader for every route that opens an image file
(training tables, `mmclin predict`, prediction lists).

PIL's ``convert`` is right for 8-bit modes but clips 16-bit grayscale ("I;16") to 0..255, so a 16-bit PNG
would come out all white. Here 16-bit samples are reduced to 8 bits by their bit depth, as the PNG specification
rescales sample depths (``round(v * 255 / 65535)``; Portable Network Graphics 3rd ed., "Sample depth
rescaling"): a 12-bit image stored in 16 bits without rescaling looks dark, as in any viewer, not clipped.
Transparent images (RGBA, LA, palette with transparency) are composited over black, the background of
dermoscopy and fundus photographs; 32-bit integer and float pixels have no defined range and are refused.
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from mmclin.errors import DataError

# Smallest side (pixels) of an image a model is given. Smaller files (icons, 1x1 tracking pixels, thumbnails)
# hold no lesion or fundus detail; resized to a model's input they would be made-up images.
MIN_IMAGE_SIDE = 16
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")


def read_image(path: str | os.PathLike, mode: Literal["RGB", "L"] = "RGB", draft_size: int | None = None,
               min_side: int = MIN_IMAGE_SIDE) -> Image.Image:
    """Decode an image file (any format PIL reads), upright by its EXIF orientation, as 8-bit `mode`.

    Args:
        path: image file.
        mode: "RGB" (photographs) or "L" (grayscale, radiographs).
        draft_size: JPEGs only: decode at the smallest DCT scale (1/2, 1/4, 1/8; PIL ``draft``) that keeps this
            many pixels per side; other formats decode at full size.
        min_side: refuse images with a side shorter than this (pixels, as stored).

    Returns:
        A PIL image of `mode`.

    Raises:
        DataError: the file does not decode, is smaller than `min_side`, or has 32-bit integer or float pixels.
    """
    try:
        with Image.open(path) as im:
            width, height = im.size  # from the header: a tiny image is refused before it is decoded
            if min(width, height) < min_side:
                raise DataError(f"image '{path}': {width}x{height} pixels; expected at least {min_side} pixels a "
                                "side")
            if draft_size is not None:
                im.draft("RGB", (draft_size, draft_size))  # a no-op for formats other than JPEG
            return _to_8bit(ImageOps.exif_transpose(im), mode, path)
    except DataError:
        raise
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError ... for bad files
        raise DataError(f"cannot read image '{path}' ({type(e).__name__}: {e})") from e


def _to_8bit(im: Image.Image, mode: str, path) -> Image.Image:
    if im.mode in _SIXTEEN_BIT:
        pixels = np.asarray(im).astype(np.uint32)
        im = Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif im.mode in ("I", "F"):
        raise DataError(f"image '{path}': {'32-bit integer' if im.mode == 'I' else 'floating-point'} pixels have "
                        "no defined range; expected 8- or 16-bit samples")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in _WITH_ALPHA:
        im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
    return im.convert(mode)
