"""The wire format on damaged input and on a minimal install (found by the hostile review of issue 21)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mixer_contract import wire

TOKENS = (np.arange(4 * 16, dtype=np.uint32) * 2654435761 % 50257).astype(np.uint16).reshape(4, 16)
HEADER = {"job": "j", "step": 3, "rank": 0, "world": 1, "sources": ["a", "b"], "schedule_version": 1}


@pytest.mark.parametrize("compression", wire.COMPRESSIONS)
def test_every_flipped_byte_is_a_wire_error_or_the_same_tokens(compression: str) -> None:
    """Found: 45 of ~1,400 single-byte flips of a served batch raised ``KeyError('crc32')`` (a header that
    still parses as JSON but lost a field), which the client does not retry: a trainer stopped."""
    frame = wire.encode(TOKENS, np.array([0, 1, 1, 0]), HEADER, compression)
    for i in range(len(frame)):
        for bit in (0x01, 0x20, 0x80):
            damaged = bytearray(frame)
            damaged[i] ^= bit
            try:
                got = wire.decode(bytes(damaged))
            except wire.WireError:
                continue
            assert np.array_equal(got.tokens, TOKENS), (i, bit)  # e.g. a flip inside the job name


def test_without_zlib_ng_the_frame_is_the_same() -> None:
    """The contract alone (zlib-ng not installed) frames and checks with the standard library's CRC-32."""
    code = ("import sys; sys.modules['zlib_ng'] = None\n"
            "import numpy as np; from mixer_contract import wire\n"
            "t = np.arange(64, dtype=np.uint16).reshape(4, 16)\n"
            "f = wire.encode(t, np.zeros(4, dtype=np.int64), {'step': 1}, 'none')\n"
            "assert (wire.decode(f).tokens == t).all(); sys.stdout.buffer.write(f)")
    minimal = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    tokens = np.arange(64, dtype=np.uint16).reshape(4, 16)
    assert minimal == wire.encode(tokens, np.zeros(4, dtype=np.int64), {"step": 1}, "none")
