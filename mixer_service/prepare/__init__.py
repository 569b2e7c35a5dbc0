"""Preparation: raw corpora -> tokenized, checksummed prepared sources (format: ``sources.source_format``)."""

from mixer_service.prepare.readers import iter_documents
from mixer_service.prepare.tokenizer import load_tokenizer
from mixer_service.prepare.writer import prepare_source

__all__ = ["iter_documents", "load_tokenizer", "prepare_source"]
