"""The quality→bytes curve of the image codec (``sources.image_codec``), measured and interpolated.

The codec itself lives in ``mixer_service.sources`` (the service decodes and serves images without the
planner or scipy); the planner only measures and inverts its size curve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.interpolate import PchipInterpolator

from mixer_contract.errors import InvalidInput
from mixer_service.sources.image_codec import LOSSLESS, check_quality, encode, split_header


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
