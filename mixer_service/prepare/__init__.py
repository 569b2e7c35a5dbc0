"""Preparation: raw corpora -> tokenized, checksummed, memory-mappable prepared sources."""

from typing import Any

from mixer_service.prepare.meta import SourceMeta
from mixer_service.prepare.readers import iter_documents
from mixer_service.prepare.tokenizer import load_tokenizer
from mixer_service.prepare.writer import prepare_source

__all__ = ["PreparedSource", "SourceMeta", "iter_documents", "load_tokenizer", "prepare_source"]


def __getattr__(name: str) -> Any:
    """``PreparedSource`` (the reader) lives in ``mixer_service.sources``, which imports this package's
    layout module: loaded on first use (PEP 562) so neither import order is circular."""
    if name == "PreparedSource":
        from mixer_service.sources.prepared import PreparedSource

        return PreparedSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
