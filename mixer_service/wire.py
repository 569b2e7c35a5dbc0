"""The binary batch wire format (docs/protocol.md), shared by the server and the client.

Layout: ``b"MXB1"`` | header length (uint32, little-endian) | header (UTF-8 JSON) | payload.
The payload is the token matrix in row-major little-endian order, zstd-compressed when the header says so;
``crc32`` is the zlib CRC-32 of the *uncompressed* payload, so corruption anywhere is caught after
decompression. Everything a reader needs (dtype, shape, step, per-row source) is in the header.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

MAGIC = b"MXB1"
MEDIA_TYPE = "application/x-mixer-batch"
COMPRESSIONS = ("none", "zstd")
_LEN = struct.Struct("<I")
_ZSTD_LEVEL = 1  # level 1 keeps compression far cheaper than the network it saves


class WireError(ValueError):
    """A batch payload is malformed or fails its checksum."""


@dataclass(frozen=True)
class WireBatch:
    header: dict[str, Any]
    tokens: np.ndarray  # [rows, seq_len]
    source_ids: np.ndarray  # [rows], indexes header["sources"]


def encode(tokens: np.ndarray, source_ids: np.ndarray, header: dict[str, Any], compression: str) -> bytes:
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    raw = np.ascontiguousarray(tokens, dtype=tokens.dtype.newbyteorder("<")).tobytes()
    payload = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(raw) if compression == "zstd" else raw
    full = header | {
        "format": 1, "dtype": tokens.dtype.name, "shape": list(tokens.shape),
        "source_ids": source_ids.astype(int).tolist(), "compression": compression,
        "crc32": zlib.crc32(raw), "payload_bytes": len(payload),
    }
    head = json.dumps(full, separators=(",", ":")).encode()
    return MAGIC + _LEN.pack(len(head)) + head + payload


def decode(data: bytes) -> WireBatch:
    if len(data) < 8 or data[:4] != MAGIC:
        raise WireError("not a mixer batch: bad magic")
    (head_len,) = _LEN.unpack_from(data, 4)
    try:
        header = json.loads(data[8: 8 + head_len])
    except ValueError as exc:
        raise WireError("batch header is not valid JSON") from exc
    payload = data[8 + head_len:]
    if len(payload) != header.get("payload_bytes"):
        raise WireError(f"payload is {len(payload)} bytes, header says {header.get('payload_bytes')}")
    if header["compression"] == "zstd":
        try:
            payload = zstandard.ZstdDecompressor().decompress(payload)
        except zstandard.ZstdError as exc:
            raise WireError(f"zstd payload does not decompress: {exc}") from exc
    if zlib.crc32(payload) != header["crc32"]:
        raise WireError("batch checksum mismatch")
    dtype = np.dtype(header["dtype"]).newbyteorder("<")
    tokens = np.frombuffer(payload, dtype=dtype).reshape(header["shape"])
    return WireBatch(header, tokens, np.asarray(header["source_ids"], dtype=np.int64))
