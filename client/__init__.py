"""Trainer-side client of the mixing service: ``MixerClient`` talks HTTP, ``MixerLoader`` yields tensors.

    from client import MixerLoader
    loader = MixerLoader(["http://mixer-0:8000", "http://mixer-1:8000"], job="run-7", token=...)
    for batch in loader:  # {"input_ids", "labels", "step", "source_ids", "sources"}
        ...

``MixerClient`` and the errors need only httpx and numpy, so operator tools import this package without
torch; ``MixerLoader`` and ``MixerDataset`` (torch) are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from client.errors import (
    ChecksumError,
    ClientRequestError,
    HistoryRewritten,
    HTTPStatusError,
    JobReplaced,
    MixerClientError,
    RequestError,
    ServerError,
)
from client.http import MixerClient, job_path

if TYPE_CHECKING:
    from client.dataset import MixerDataset, MixerLoader

_TORCH_NAMES = ("MixerDataset", "MixerLoader")


def __getattr__(name: str) -> Any:
    """Import the torch side only when a caller asks for it (PEP 562)."""
    if name in _TORCH_NAMES:
        from client import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'client' has no attribute {name!r}")


__all__ = [
    "ChecksumError",
    "HistoryRewritten",
    "JobReplaced",
    "ClientRequestError",
    "HTTPStatusError",
    "MixerClient",
    "MixerClientError",
    "MixerDataset",
    "MixerLoader",
    "RequestError",
    "ServerError",
    "job_path",
]
