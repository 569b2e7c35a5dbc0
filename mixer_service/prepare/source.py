"""Kept for old callers: prepared sources are read by ``mixer_service.sources.prepared``."""

from mixer_service.sources.prepared import CACHE_SUBDIR, DocumentIndexError, PreparedSource

__all__ = ["CACHE_SUBDIR", "DocumentIndexError", "PreparedSource"]
