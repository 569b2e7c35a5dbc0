"""Tokenizers for preparation: a Hugging Face ``tokenizers`` tokenizer, GPT-2 BPE files, or raw UTF-8 bytes.

All of them expose the same small surface (``TextTokenizer``) so the writer does not care which one it got,
and each carries a ``fingerprint`` so a prepared source records exactly which tokenizer produced it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from mixer_contract.errors import InvalidInput

logger = logging.getLogger(__name__)

GPT2_EOS = "<|endoftext|>"
# Tried in order when a tokenizer.json is given without an explicit EOS token.
KNOWN_EOS_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")


class TextTokenizer(Protocol):
    """What the writer needs from a tokenizer."""

    vocab_size: int
    eos_id: int
    fingerprint: str

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text, without special tokens (the writer adds EOS)."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of a token sequence; EOS is dropped."""
        ...


def _fingerprint(canonical: bytes, eos_id: int) -> str:
    return hashlib.sha256(canonical + b"\0eos=" + str(eos_id).encode()).hexdigest()


class ByteTokenizer:
    """Ids 0..255 are UTF-8 bytes and 256 is EOS: no vocabulary files, lossless, and fast via numpy."""

    vocab_size = 257
    eos_id = 256
    fingerprint = _fingerprint(b"mixer-byte-level-v1", 256)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """UTF-8 bytes of each text, as zero-copy uint8 views."""
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """UTF-8 text of the byte ids; EOS and invalid bytes never raise (invalid bytes become U+FFFD)."""
        arr = np.asarray(ids)
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with a chosen EOS id; encoding is batched and parallel in Rust."""

    def __init__(self, tokenizer: Tokenizer, eos_id: int) -> None:
        # Special-token strings inside documents are encoded as plain text, so a document can never
        # inject an EOS (which would corrupt document boundaries).
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self.eos_id = eos_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        if not 0 <= eos_id < self.vocab_size:
            raise InvalidInput(f"EOS id {eos_id} is outside the vocabulary (size {self.vocab_size})")
        # Canonical JSON (sorted keys) so the fingerprint does not depend on field order.
        canonical = json.dumps(json.loads(tokenizer.to_str()), sort_keys=True, separators=(",", ":"))
        self.fingerprint = _fingerprint(canonical.encode(), eos_id)

    @property
    def backend(self) -> Tokenizer:
        """The wrapped ``tokenizers.Tokenizer`` (e.g. to save it or benchmark it directly)."""
        return self._tok

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids per text; ``encode_batch_fast`` skips offset tracking, which we never use."""
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.array(e.ids, dtype=np.uint32) for e in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of the ids, with special tokens (EOS) skipped."""
        return self._tok.decode(np.asarray(ids).tolist(), skip_special_tokens=True)


def _gpt2_from_files(vocab: Path, merges: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _resolve_eos(tok: Tokenizer, eos_token: str | None, source: Path) -> int:
    candidates = (eos_token,) if eos_token else KNOWN_EOS_TOKENS
    for name in candidates:
        eos_id = tok.token_to_id(name)
        if eos_id is not None:
            return eos_id
    if eos_token:
        raise InvalidInput(f"{source}: EOS token {eos_token!r} is not in the vocabulary")
    raise InvalidInput(
        f"{source}: no EOS token found (tried {', '.join(KNOWN_EOS_TOKENS)}); name one explicitly"
    )


def load_tokenizer(
    tokenizer_json: Path | None = None,
    vocab: Path | None = None,
    merges: Path | None = None,
    eos_token: str | None = None,
) -> TextTokenizer:
    """Load a tokenizer.json, or GPT-2 ``vocab``+``merges``, or byte-level when nothing is given."""
    if tokenizer_json is not None and (vocab is not None or merges is not None):
        raise InvalidInput("give either a tokenizer.json or vocab+merges, not both")
    if (vocab is None) != (merges is None):
        raise InvalidInput("GPT-2 BPE needs both --vocab and --merges")
    for path in (tokenizer_json, vocab, merges):
        if path is not None and not Path(path).is_file():
            raise InvalidInput(f"tokenizer file not found: {path}")
    try:
        if tokenizer_json is not None:
            tok = Tokenizer.from_file(str(tokenizer_json))
            return HFTokenizer(tok, _resolve_eos(tok, eos_token, Path(tokenizer_json)))
        if vocab is not None and merges is not None:
            tok = _gpt2_from_files(Path(vocab), Path(merges))
            return HFTokenizer(tok, _resolve_eos(tok, eos_token or GPT2_EOS, Path(vocab)))
    except Exception as exc:  # tokenizers raises bare Exception on malformed files
        if isinstance(exc, InvalidInput):
            raise
        raise InvalidInput(f"cannot load tokenizer {tokenizer_json or vocab}: {exc}") from exc
    if eos_token is not None:
        raise InvalidInput("--eos-token needs a tokenizer; the byte-level tokenizer's EOS is fixed (256)")
    return ByteTokenizer()
