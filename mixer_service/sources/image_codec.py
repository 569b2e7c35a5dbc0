"""Image codec for stored samples: JPEG at a quality (Pillow) or lossless PNG.

Small images make the codec's fixed header (JPEG tables: ~330 of ~400 bytes for a 28×28 image) dominate
the file, although it is identical for every image of one size and quality. ``split_header`` separates it
so a source stores each distinct header once (the idea of JPEG's "abbreviated" format) and the byte
budget pays for image content, not for copies of the same tables.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from mixer_contract.errors import InvalidInput

LOSSLESS = 101  # quality code for lossless storage (PNG); sorts above every JPEG quality
MIN_QUALITY, MAX_QUALITY = 1, 100
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_HEADER_LEN = len(_PNG_SIGNATURE) + 25  # signature + IHDR chunk (length, type, 13 data bytes, CRC)


def check_quality(quality: int) -> int:
    """Validate a quality code: 1..100 for JPEG or ``LOSSLESS``."""
    q = int(quality)
    if q != quality or not (MIN_QUALITY <= q <= MAX_QUALITY or q == LOSSLESS):
        raise InvalidInput(
            f"quality must be an integer in [{MIN_QUALITY}, {MAX_QUALITY}] or {LOSSLESS} (lossless), "
            f"got {quality}"
        )
    return q


def encode(image: np.ndarray, quality: int) -> bytes:
    """Encode a uint8 HxW (grayscale) or HxWx3 (RGB) image at a quality code."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise InvalidInput(f"images must be uint8 HxW or HxWx3, got {image.dtype} with shape {image.shape}")
    buf = io.BytesIO()
    if check_quality(quality) == LOSSLESS:
        Image.fromarray(image).save(buf, format="PNG", optimize=True)
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def split_header(data: bytes) -> tuple[bytes, bytes]:
    """(header, payload) with header + payload == data; the header is the part shared by all images of
    one size, mode and quality: for JPEG everything up to the end of the start-of-scan segment, for PNG
    the signature and IHDR chunk."""
    if data.startswith(_PNG_SIGNATURE):
        return data[:_PNG_HEADER_LEN], data[_PNG_HEADER_LEN:]
    if data.startswith(b"\xff\xd8"):
        sos = data.find(b"\xff\xda")
        if sos > 0:
            end = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
            return data[:end], data[end:]
    return b"", data
