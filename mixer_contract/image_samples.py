"""Decoding the samples an image source serves (JPEG or PNG bytes, one per row of a samples batch).

Pillow is imported on first use, so the contract itself needs only the standard library and numpy.
"""

from __future__ import annotations

import io

import numpy as np

from mixer_contract.errors import CorruptData


def decode(data: bytes) -> np.ndarray:
    """Decode JPEG or PNG bytes to a uint8 array (HxW for grayscale)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("L") if img.mode not in ("L", "RGB") else img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        raise CorruptData(f"image bytes do not decode: {e}") from None
