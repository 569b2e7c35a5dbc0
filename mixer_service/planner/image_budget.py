"""Exact stored bytes of candidate image sources: what the storage planner optimises over.

The image source format itself (writing, reading, serving) lives in ``mixer_service.sources.image_source``.
"""

from __future__ import annotations

import numpy as np

from mixer_contract.errors import InvalidInput
from mixer_service.sources.image_codec import LOSSLESS, encode, split_header


class EncodedSizes:
    """Exact stored bytes of a set of images at per-sample qualities, measured lazily and cached.

    The randomized-level search asks for the total of many candidate assignments; each (image, quality)
    pair is encoded at most once. Totals count payloads plus each distinct header once, like the source.
    """

    def __init__(self, images: np.ndarray) -> None:
        self.images = images
        self._payload = np.full((len(images), LOSSLESS + 1), -1, dtype=np.int64)
        self._header = np.full((len(images), LOSSLESS + 1), -1, dtype=np.int64)
        self._header_ids: dict[bytes, int] = {}
        self._header_len: list[int] = []

    def _measure(self, rows: np.ndarray, q: np.ndarray) -> None:
        missing = self._payload[rows, q] < 0
        for i, quality in zip(rows[missing], q[missing], strict=True):
            header, payload = split_header(encode(np.ascontiguousarray(self.images[i]), int(quality)))
            if header not in self._header_ids:
                self._header_ids[header] = len(self._header_len)
                self._header_len.append(len(header))
            self._payload[i, quality] = len(payload)
            self._header[i, quality] = self._header_ids[header]

    def _rows(self, qualities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.asarray(qualities, dtype=np.int64)
        if q.shape != (len(self.images),):
            raise InvalidInput(f"need one quality per image ({len(self.images)}), got shape {q.shape}")
        rows = np.arange(len(q))
        self._measure(rows, q)
        return rows, q

    def payload_bytes(self, qualities: np.ndarray) -> np.ndarray:
        """Per-image payload bytes (header excluded) at ``qualities`` (one code per image)."""
        rows, q = self._rows(qualities)
        return self._payload[rows, q].copy()

    def header_bytes(self, qualities: np.ndarray) -> int:
        """Bytes of the distinct headers these images at ``qualities`` share (each stored once)."""
        rows, q = self._rows(qualities)
        return int(sum(self._header_len[h] for h in np.unique(self._header[rows, q])))

    def total_bytes(self, qualities: np.ndarray) -> int:
        """Bytes a source of these images at ``qualities`` would store: payloads plus distinct headers."""
        return int(self.payload_bytes(qualities).sum()) + self.header_bytes(qualities)

    def max_sample_bytes(self, qualities: np.ndarray) -> int:
        """Largest single sample (payload + its header) under ``qualities``: the search's tolerance."""
        rows, q = self._rows(qualities)
        lengths = np.array(self._header_len)[self._header[rows, q]]
        return int(np.max(self._payload[rows, q] + lengths))
