"""The binary batch wire format (docs/protocol.md), shared by the server and the client.

Layout: ``b"MXB1"`` | header length (uint32, little-endian) | header (UTF-8 JSON) | payload.
The payload is the token matrix in row-major little-endian order, zstd-compressed when the header says so;
``crc32`` is the zlib CRC-32 of the *uncompressed* payload, so corruption anywhere is caught after
decompression. Everything a reader needs (dtype, shape, step, per-row source) is in the header.
Optionally (asked for per request) the header also carries ``boundaries``: for each row, the start offsets
of its document pieces, so a trainer can mask attention within documents; without it nothing changes.
"""

from __future__ import annotations

import functools
import json
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC = b"MXB1"
MEDIA_TYPE = "application/x-mixer-batch"
COMPRESSIONS = ("none", "zstd")
_LEN = struct.Struct("<I")
_ZSTD_LEVEL = 1  # level 1 keeps compression far cheaper than the network it saves
_per_thread = threading.local()  # a zstd compressor may not be shared between threads


def _zstd() -> Any:
    """zstandard, imported with the first zstd payload: the contract itself needs only numpy."""
    import zstandard

    return zstandard


@functools.cache
def _crc32() -> Callable[[Any], int]:
    """zlib-ng's CRC-32, imported with the first frame: the same checksum as ``zlib.crc32`` (SIMD; 116 -> 32
    us for a 256 KiB payload here, on both ends of every batch). The standard library's where zlib-ng is
    not installed (the contract alone, vendored into a trainer's image)."""
    try:
        from zlib_ng import zlib_ng
    except ImportError:
        return zlib.crc32
    return zlib_ng.crc32


@contextmanager
def _malformed() -> Iterator[None]:
    """A header that parses as JSON but lacks a field or holds a wrong type (a flipped byte in transit) is a
    ``WireError`` like any other damage, so clients retry it, not a ``KeyError`` that stops a trainer."""
    try:
        yield
    except WireError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise WireError(f"batch header is malformed: {exc!r}") from exc


class WireError(ValueError):
    """A batch payload is malformed or fails its checksum."""


@dataclass(frozen=True)
class WireBatch:
    header: dict[str, Any]
    tokens: np.ndarray  # [rows, seq_len]
    source_ids: np.ndarray  # [rows], indexes header["sources"]
    boundaries: list[np.ndarray] | None = None  # per row: increasing piece starts, the first one 0


def _compress(raw: bytes | memoryview) -> bytes:
    """Level-1 zstd of ``raw`` with this thread's compressor: one context per thread instead of one per
    response; its frames are byte-identical to a fresh compressor's (tests/service/test_serving_path.py)."""
    compressor = getattr(_per_thread, "zstd", None)
    if compressor is None:
        compressor = _per_thread.zstd = _zstd().ZstdCompressor(level=_ZSTD_LEVEL)
    return compressor.compress(raw)


def _frame(header: dict[str, Any], raw: bytes | memoryview, compression: str) -> bytes:
    """The framed message; ``raw`` may be a view of the caller's array: the payload is copied once, into
    the message itself."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    payload = _compress(raw) if compression == "zstd" else raw
    full = header | {
        "format": 1,
        "compression": compression,
        "crc32": _crc32()(raw),
        "payload_bytes": len(payload),
    }
    head = json.dumps(full, separators=(",", ":")).encode()
    return b"".join((MAGIC, _LEN.pack(len(head)), head, payload))


def _unframe(data: bytes) -> tuple[dict[str, Any], bytes | memoryview]:
    """Header and verified, decompressed payload of a body that is exactly one framed message."""
    header, payload, end = _unframe_at(data, 0)
    if end != len(data):
        raise WireError(f"payload is {len(data) - end + header['payload_bytes']} bytes, "
                        f"header says {header['payload_bytes']}")
    return header, payload


def _unframe_at(data: bytes, start: int) -> tuple[dict[str, Any], bytes | memoryview, int]:
    """The framed message at ``start`` of ``data``: header, verified payload, and where the next begins."""
    view = memoryview(data)
    if len(data) - start < 8 or view[start : start + 4] != MAGIC:
        raise WireError("not a mixer batch: bad magic")
    (head_len,) = _LEN.unpack_from(data, start + 4)
    begin = start + 8 + head_len
    try:
        header = json.loads(bytes(view[start + 8 : begin]))
    except ValueError as exc:
        raise WireError("batch header is not valid JSON") from exc
    size = header.get("payload_bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or begin + size > len(data):
        raise WireError(f"payload is {len(data) - begin} bytes, header says {size}")
    payload: bytes | memoryview = view[begin : begin + size]
    if header["compression"] == "zstd":
        try:
            payload = _zstd().ZstdDecompressor().decompress(payload)
        except _zstd().ZstdError as exc:
            raise WireError(f"zstd payload does not decompress: {exc}") from exc
    if _crc32()(payload) != header["crc32"]:
        raise WireError("batch checksum mismatch")
    return header, payload, begin + size


def encode(tokens: np.ndarray, source_ids: np.ndarray, header: dict[str, Any], compression: str,
           boundaries: list[list[int]] | None = None) -> bytes:
    """Frame a token matrix; ``boundaries`` (per row, the start offset of each document piece) only when
    the client asked for them, so the default header stays as it was."""
    little = np.ascontiguousarray(tokens, dtype=tokens.dtype.newbyteorder("<"))
    raw = little.reshape(-1).view(np.uint8).data  # no copy when the rows already are little-endian
    fields: dict[str, Any] = {
        "dtype": tokens.dtype.name,
        "shape": list(tokens.shape),
        "source_ids": source_ids.astype(int).tolist(),
    }
    if boundaries is not None:
        fields["boundaries"] = boundaries
    return _frame(header | fields, raw, compression)


def decode(data: bytes) -> WireBatch:
    with _malformed():
        return _batch(*_unframe(data))


def decode_frames(data: bytes) -> list[WireBatch]:
    """Every batch of a body that holds several framed messages back to back (a request for several
    steps: docs/protocol.md), in order; any damage in any of them fails the whole body."""
    batches: list[WireBatch] = []
    with _malformed():
        start = 0
        while start < len(data) or not batches:
            header, payload, start = _unframe_at(data, start)
            batches.append(_batch(header, payload))
    return batches


def _batch(header: dict[str, Any], payload: bytes | memoryview) -> WireBatch:
    dtype = np.dtype(header["dtype"]).newbyteorder("<")
    tokens = np.frombuffer(payload, dtype=dtype).reshape(header["shape"])
    boundaries = header.get("boundaries")
    rows = None if boundaries is None else _check_boundaries(boundaries, tokens.shape)
    return WireBatch(header, tokens, np.asarray(header["source_ids"], dtype=np.int64), rows)


def _check_boundaries(boundaries: Any, shape: tuple[int, ...]) -> list[np.ndarray]:
    """Each row's piece starts as an array: one list per row, starting at 0, increasing, below seq_len."""
    if not isinstance(boundaries, list) or len(boundaries) != shape[0]:
        raise WireError(f"boundaries: expected one list per row ({shape[0]} rows)")
    rows = []
    for r, starts in enumerate(boundaries):
        row = np.asarray(starts, dtype=np.int64)
        if row.ndim != 1 or not len(row) or row[0] != 0 or row[-1] >= shape[1] or np.any(np.diff(row) <= 0):
            raise WireError(f"boundaries[{r}]: must start at 0 and increase below seq_len={shape[1]}")
        rows.append(row)
    return rows


@dataclass(frozen=True)
class WireSamples:
    header: dict[str, Any]
    samples: list[bytes]  # encoded images (JPEG or PNG), one per row
    labels: np.ndarray


def encode_samples(
    samples: list[bytes], labels: list[int], header: dict[str, Any], compression: str
) -> bytes:
    """Variable-length samples (e.g. images): ``lengths`` in the header split the payload."""
    return _frame(
        header | {"kind": "samples", "lengths": [len(b) for b in samples], "labels": labels},
        b"".join(samples),
        compression,
    )


def decode_samples(data: bytes) -> WireSamples:
    with _malformed():
        return _samples(*_unframe(data))


def _samples(header: dict[str, Any], payload: bytes | memoryview) -> WireSamples:
    ends = np.cumsum(header["lengths"]).tolist()
    if (ends[-1] if ends else 0) != len(payload):
        raise WireError("sample lengths do not add up to the payload")
    starts = [0] + ends[:-1]
    return WireSamples(
        header,
        [bytes(payload[a:b]) for a, b in zip(starts, ends, strict=True)],
        np.asarray(header["labels"], dtype=np.int64),
    )
