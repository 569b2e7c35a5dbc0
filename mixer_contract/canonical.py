"""Canonical JSON: equal values give equal bytes, hence equal hashes, on every machine and in every store.

The schedule chain hashes these bytes and clients pin the result (``log_chain``), so both sides of the wire
must agree on them to the byte.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace: equal values give equal bytes (and equal chain hashes) everywhere."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def config_digest(config_json: str) -> str:
    """What version 1 commits to: the sha256 of the job config's canonical JSON."""
    return hashlib.sha256(config_json.encode()).hexdigest()
