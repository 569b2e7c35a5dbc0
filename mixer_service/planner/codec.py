"""Image codec for stored samples: JPEG at a quality (Pillow) or lossless PNG, plus the quality→bytes curve.

Small images make the codec's fixed header (JPEG tables: ~330 of ~400 bytes for a 28×28 image) dominate
the file, although it is identical for every image of one size and quality. ``split_header`` separates it
so a source stores each distinct header once (the idea of JPEG's "abbreviated" format) and the byte
budget pays for image content, not for copies of the same tables.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.interpolate import PchipInterpolator

from mixer_service.errors import CorruptData, InvalidInput

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


def decode(data: bytes) -> np.ndarray:
    """Decode JPEG or PNG bytes to a uint8 array (HxW for grayscale)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("L") if img.mode not in ("L", "RGB") else img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        raise CorruptData(f"image bytes do not decode: {e}") from None


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


@dataclass(frozen=True)
class CodecCurve:
    """Mean stored bytes per sample (payload, header excluded) as a function of JPEG quality.

    A monotone PCHIP interpolant through measured means in log-bytes: JPEG's quality scaling has no
    simple closed form across the whole range (a power law in the IJG scale factor misses by ~10% at low
    quality), while a monotone interpolant through measurements is exact at the knots and invertible.
    """

    qualities: np.ndarray
    mean_bytes: np.ndarray

    def __post_init__(self) -> None:
        q, b = np.asarray(self.qualities, float), np.asarray(self.mean_bytes, float)
        if q.size < 2 or q.size != b.size or np.any(np.diff(q) <= 0) or np.any(b <= 0):
            raise InvalidInput("a codec curve needs >= 2 increasing qualities with positive byte counts")
        object.__setattr__(self, "qualities", q)
        # JPEG sizes are monotone in quality up to measurement noise; enforce it so the inverse exists.
        object.__setattr__(self, "mean_bytes", np.maximum.accumulate(b))

    def bytes_at(self, quality: np.ndarray | float) -> np.ndarray:
        q = np.clip(quality, self.qualities[0], self.qualities[-1])
        return np.exp(PchipInterpolator(self.qualities, np.log(self.mean_bytes))(q))

    def quality_for(self, bytes_per_sample: float) -> int:
        """Highest integer quality whose mean size fits in ``bytes_per_sample`` (lowest quality if none)."""
        qs = np.arange(int(np.ceil(self.qualities[0])), int(self.qualities[-1]) + 1)
        fits = qs[self.bytes_at(qs) <= bytes_per_sample]
        return int(fits[-1]) if fits.size else int(qs[0])

    def to_dict(self) -> dict[str, list[float]]:
        return {"qualities": self.qualities.tolist(), "mean_bytes": self.mean_bytes.tolist()}


def measure_codec_curve(images: np.ndarray, qualities: list[int] | np.ndarray) -> CodecCurve:
    """Encode ``images`` at each JPEG quality and fit the curve to the mean payload bytes."""
    qs = sorted({check_quality(q) for q in qualities} - {LOSSLESS})
    if len(images) == 0:
        raise InvalidInput("need at least one image to measure the codec curve")
    means = [np.mean([len(split_header(encode(img, q))[1]) for img in images]) for q in qs]
    return CodecCurve(np.array(qs, float), np.array(means))
