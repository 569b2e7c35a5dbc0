"""Preparation: raw corpora -> tokenized, checksummed, memory-mappable prepared sources."""

from mixer_service.prepare.meta import SourceMeta
from mixer_service.prepare.readers import iter_documents
from mixer_service.prepare.tokenizer import load_tokenizer
from mixer_service.prepare.writer import prepare_source

__all__ = ["SourceMeta", "iter_documents", "load_tokenizer", "prepare_source"]

