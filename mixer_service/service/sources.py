"""The prepared sources a server can mix, loaded once at start-up from one directory."""

from __future__ import annotations

import logging
from pathlib import Path

from mixer_service.errors import InvalidInput, NotFound
from mixer_service.prepare.source import PreparedSource

log = logging.getLogger(__name__)


class SourceRegistry:
    """Every sub-directory of ``root`` holding a prepared source, by its name."""

    def __init__(self, sources: dict[str, PreparedSource]) -> None:
        self.sources = sources

    @classmethod
    def load(cls, root: Path, cache_dir: Path | None = None) -> SourceRegistry:
        if not root.is_dir():
            raise InvalidInput(f"--sources-dir {root}: not a directory")
        sources: dict[str, PreparedSource] = {}
        for sub in sorted(p for p in root.iterdir() if (p / "meta.json").is_file()):
            src = PreparedSource.open(sub, cache_dir)
            if src.meta.name in sources:
                raise InvalidInput(f"two prepared sources are named {src.meta.name!r} under {root}")
            sources[src.meta.name] = src
            log.info("source loaded", extra={"source": src.meta.name, "docs": src.meta.num_docs,
                                             "tokens": src.meta.num_tokens, "fingerprint": src.meta.fingerprint})
        return cls(sources)

    def get(self, name: str) -> PreparedSource:
        try:
            return self.sources[name]
        except KeyError:
            raise NotFound(f"source {name!r} is not on this server (it has {sorted(self.sources)})") from None

    def describe(self) -> list[dict]:
        return [{"name": n, "fingerprint": s.meta.fingerprint, "docs": s.meta.num_docs,
                 "tokens": s.meta.num_tokens, "vocab_size": s.meta.vocab_size, "dtype": s.meta.dtype,
                 "tokenizer_fingerprint": s.meta.tokenizer_fingerprint} for n, s in sorted(self.sources.items())]
