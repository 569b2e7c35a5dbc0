"""Trainer-side client of the mixing service: ``MixerLoader`` yields batches, ``MixerClient`` talks HTTP.

    from client import MixerLoader
    loader = MixerLoader(["http://mixer-0:8000", "http://mixer-1:8000"], job="run-7", token=...)
    for batch in loader:  # {"input_ids", "labels", "step", "source_ids", "sources"}
        ...
"""

from client.dataset import MixerDataset, MixerLoader
from client.errors import (
    ChecksumError,
    ClientRequestError,
    HTTPStatusError,
    MixerClientError,
    RequestError,
    ServerError,
)
from client.http import MixerClient

__all__ = [
    "ChecksumError",
    "ClientRequestError",
    "HTTPStatusError",
    "MixerClient",
    "MixerClientError",
    "MixerDataset",
    "MixerLoader",
    "RequestError",
    "ServerError",
]
