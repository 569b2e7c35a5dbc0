"""The prepared sources a server can mix, loaded once at start-up from one directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mixer_service.errors import InvalidInput, NotFound
from mixer_service.prepare.source import PreparedSource

log = logging.getLogger(__name__)


class SourceRegistry:
    """Every sub-directory of ``root`` holding a prepared token or image source, by its name."""

    def __init__(self, sources: dict[str, PreparedSource], images: dict | None = None) -> None:
        self.sources = sources
        self.images = images or {}

    @classmethod
    def load(cls, root: Path, cache_dir: Path | None = None) -> SourceRegistry:
        if not root.is_dir():
            raise InvalidInput(f"--sources-dir {root}: not a directory")
        sources: dict[str, PreparedSource] = {}
        images: dict = {}
        for sub in sorted(p for p in root.iterdir() if (p / "meta.json").is_file()):
            if _is_image_source(sub):
                from mixer_service.planner.images import ImageSource  # Pillow only where images are served

                images[sub.name] = ImageSource.open(sub)
                continue
            src = PreparedSource.open(sub, cache_dir)
            if src.meta.name in sources:
                raise InvalidInput(f"two prepared sources are named {src.meta.name!r} under {root}")
            sources[src.meta.name] = src
            log.info(
                "source loaded",
                extra={
                    "source": src.meta.name,
                    "docs": src.meta.num_docs,
                    "tokens": src.meta.num_tokens,
                    "fingerprint": src.meta.fingerprint,
                },
            )
        return cls(sources, images)

    def get(self, name: str) -> PreparedSource:
        try:
            return self.sources[name]
        except KeyError:
            raise NotFound(f"source {name!r} is not on this server (it has {sorted(self.sources)})") from None

    def image(self, name: str):
        try:
            return self.images[name]
        except KeyError:
            raise NotFound(
                f"image source {name!r} is not on this server (it has {sorted(self.images)})"
            ) from None

    def problems(self) -> list[str]:
        """What makes a loaded source unservable now (empty when all are intact); cheap enough for probes."""
        return [
            f"source {name!r}: {src.meta.path / 'meta.json'} is missing"
            for name, src in sorted(self.sources.items())
            if not (src.meta.path / "meta.json").is_file()
        ]

    def describe(self) -> list[dict]:
        return [
            {
                "name": n,
                "fingerprint": s.meta.fingerprint,
                "docs": s.meta.num_docs,
                "tokens": s.meta.num_tokens,
                "vocab_size": s.meta.vocab_size,
                "dtype": s.meta.dtype,
                "tokenizer_fingerprint": s.meta.tokenizer_fingerprint,
            }
            for n, s in sorted(self.sources.items())
        ]


def _is_image_source(directory: Path) -> bool:
    from mixer_service.planner.images import FORMAT

    try:
        return json.loads((directory / "meta.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False  # PreparedSource.open reports the broken file with its name
