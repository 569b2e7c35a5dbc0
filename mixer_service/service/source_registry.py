"""The sources a server can mix, opened once at start-up: prepared (and adopted) token sources from a local
directory or an object-store prefix, all sharing one bounded shard cache, and image sources.

A source that cannot be opened (corrupt, truncated, edited) does not stop the server: it is listed by
``problems()`` (so ``/v1/ready`` answers 503) and ``get`` answers ``SourceUnavailable`` (503) for it, while
names the server never had stay ``NotFound`` (404).

A source changed under the server (its index files replaced or removed) is refused by ``get`` within
``SOURCE_RECHECK_S``: the stat of its files runs at most that often per source, not on every batch request
(a stat per file per request was ~half of a request's store-and-check cost, docs/benchmarks.md). The window
serves no wrong byte: every shard and index read is checked against the hashes the job pinned, so what
the check adds is a loud refusal of a source that no longer matches, not the integrity of what is served.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from mixer_contract.errors import InvalidInput, MixerError, NotFound, SourceUnavailable
from mixer_service.sources.adopted import MANIFEST, AdoptedSource, is_adopted
from mixer_service.sources.cache import DEFAULT_MEMORY_BYTES, ShardCache
from mixer_service.sources.prepared import CACHE_SUBDIR, PreparedSource, ShardedSource
from mixer_service.sources.source_format import META_FILE
from mixer_service.sources.verify import DEFAULT_VERIFY, VerifyMode

log = logging.getLogger(__name__)

SOURCE_RECHECK_S = 0.5  # how stale ``get``'s verdict on a source's files may be


class SourceRegistry:
    """Token sources and image sources by name, plus the names of sources that failed to open."""

    def __init__(self, sources: dict[str, ShardedSource], images: dict | None = None,
                 broken: dict[str, str] | None = None, cache: ShardCache | None = None) -> None:
        self.sources = sources
        self.images = images or {}
        self.broken = broken or {}
        self.cache = cache
        self.empty: list[str] = []  # locations given that hold no source at all, and why that matters
        self._verdicts: dict[str, tuple[float, str | None]] = {}  # name -> (checked at, why refused)

    @classmethod
    def load(cls, root: Path | None, cache_dir: Path | None = None, *,
             verify: str | VerifyMode = DEFAULT_VERIFY,
             cache_limit: int | None = None, remote_urls: Sequence[str] = (),
             s3_endpoint: str | None = None, memory_bytes: int = DEFAULT_MEMORY_BYTES,
             check_limit: bool = True) -> SourceRegistry:
        """Open every source under ``root`` (sub-directories with a ``meta.json``) and under each
        ``s3://bucket/prefix`` of ``remote_urls``; shards are cached in ``cache_dir`` (default
        ``root/.cache``) within ``cache_limit`` bytes, and up to ``memory_bytes`` of proven shards in
        memory (``ShardCache``); ``check_limit``: refuse a ``cache_limit`` too small for them
        (``ShardCache.check_limit``)."""
        if root is not None and not root.is_dir():
            raise InvalidInput(f"--sources-dir {root}: not a directory")
        if cache_dir is None:
            if root is None:
                raise InvalidInput("--cache-dir is required when every source is remote")
            cache_dir = root / CACHE_SUBDIR
        mode = VerifyMode(verify)
        cache = ShardCache(Path(cache_dir) / "shards", cache_limit, mode, root=Path(cache_dir),
                           memory_bytes=memory_bytes)
        registry = cls({}, {}, {}, cache)
        local = []
        if root is not None:
            local = sorted(p for p in root.iterdir() if (p / META_FILE).is_file() or is_adopted(p))
            for sub in local:
                registry._open(sub.name, str(sub), lambda d=sub: _open_local(d, cache, mode))
        index_root = Path(cache_dir) / "index"
        for url in remote_urls:
            openers = list(_remote_openers(url, index_root, cache, mode, s3_endpoint))
            if not openers:
                registry._nothing_at(url, f"{url} holds no source (no meta.json or {MANIFEST} under it or "
                                     f"one level down){_found(_listed(url, s3_endpoint))}")
            for name, opener, where in openers:
                registry._open(name, where, opener)
        if check_limit:
            cache.check_limit(registry.sources.values())
        cache.fit()
        if root is not None and not local and not remote_urls:
            registry._nothing_at(str(root), f"--sources-dir {root} holds no source (no sub-directory with a "
                                 f"meta.json or an adoption manifest){_found(_local_entries(root))}")
        return registry

    def _nothing_at(self, location: str, why: str) -> None:
        """A location given that holds no source: not ready, and one structured line saying why."""
        self.empty.append(why)
        log.error("no source at a sources location", extra={"event": "sources.empty", "location": location,
                                                            "error": why})

    def _open(self, label: str, where: str, opener) -> None:
        try:
            kind, src = opener()
        except MixerError as exc:
            self.broken[label] = str(exc)
            log.error("source unavailable", extra={"event": "source.broken", "source": label, "where": where,
                                                   "error": str(exc)})
            return
        if kind == "images":
            self.images[label] = src
            return
        name = src.meta.name
        if name in self.sources:
            raise InvalidInput(f"two sources are named {name!r} ({self.sources[name].meta.path} and {where})")
        self.sources[name] = src
        log.info("source opened", extra={"event": "source.opened", "source": name, "where": where,
                                         "docs": src.meta.num_docs, "tokens": src.meta.num_tokens,
                                         "fingerprint": src.meta.fingerprint})

    def get(self, name: str) -> ShardedSource:
        """The source, if it is here and intact; ``SourceUnavailable`` if missing/changed/corrupt here."""
        src = self.sources.get(name)
        if src is None:
            if name in self.broken:
                raise SourceUnavailable(f"source {name!r} is unavailable on this server: {self.broken[name]}")
            raise NotFound(f"source {name!r} is not on this server (it has {sorted(self.sources)})")
        why = self._changed(name, src)
        if why:
            raise SourceUnavailable(why)
        return src

    def _changed(self, name: str, src: ShardedSource) -> str | None:
        """``src.changed()`` as of at most ``SOURCE_RECHECK_S`` ago (two threads may both re-check)."""
        now = time.monotonic()
        verdict = self._verdicts.get(name)
        if verdict is None or now - verdict[0] >= SOURCE_RECHECK_S:
            verdict = self._verdicts[name] = (now, src.changed())
        return verdict[1]

    def problems(self) -> list[str]:
        """Why this server cannot serve every source it started with (stat-level, cheap), or []."""
        out = [f"source {name!r} is unavailable on this server: {why}"
               for name, why in sorted(self.broken.items())] + self.empty
        for src in self.sources.values():
            out += src.problems()
        return out + (self.cache.problems() if self.cache is not None and self.sources else [])

    def image(self, name: str):
        try:
            return self.images[name]
        except KeyError:
            raise NotFound(
                f"image source {name!r} is not on this server (it has {sorted(self.images)})"
            ) from None

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

    def cache_stats(self, disk: bool = True) -> dict[str, int | None]:
        """Shard cache counters (hits, misses, fetches, fetched bytes, hashes, evictions, resident hits and
        bytes) and its sizes, for metrics: what a serving path exports to watch fetches per step, the hit
        ratio and how much is served from memory. ``disk``: with the directory's bytes (a ``du`` walk)."""
        if self.cache is None:
            return {}
        stats: dict[str, int | None] = {**self.cache.stats.as_dict(),
                                        "memory_limit_bytes": self.cache.memory_bytes}
        if disk:
            stats |= {"used_bytes": self.cache.used_bytes, "limit_bytes": self.cache.limit_bytes}
        return stats

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def _open_local(directory: Path, cache: ShardCache, mode: VerifyMode):
    if is_adopted(directory):
        return "tokens", AdoptedSource.open(directory, cache, verify=mode)
    if _format(directory) == "mixer-image-source":
        from mixer_service.sources.image_source import ImageSource

        return "images", ImageSource.open(directory)
    return "tokens", PreparedSource.open(directory, cache=cache, verify=mode)


def _format(directory: Path) -> str | None:
    try:
        return json.loads((directory / META_FILE).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None  # the source's own opener reports the broken file with its name


def _remote_openers(url: str, index_root: Path, cache: ShardCache, mode: VerifyMode, endpoint: str | None):
    """(name, opener, where) for each source under ``s3://bucket/prefix`` (a prefix with a meta.json, or a
    prefix whose sub-prefixes have one)."""
    from mixer_service.sources.origins import S3Origin, parse_s3_url, s3_client

    bucket, prefix = parse_s3_url(url)
    client = s3_client(endpoint)
    origin = S3Origin(client, bucket, prefix)
    try:
        listing = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", Delimiter="/")
    except Exception as exc:  # botocore raises many unrelated types; any of them means "not reachable"
        yield url, _raiser(SourceUnavailable(f"{url}: cannot list the object store ({exc})")), url
        return
    def has(prefix: str, name: str) -> bool:
        return bool(client.list_objects_v2(Bucket=bucket, Prefix=prefix + name, MaxKeys=1).get("KeyCount"))

    keys = {o["Key"].rsplit("/", 1)[-1] for o in listing.get("Contents", [])}
    here = [k for k in (META_FILE, MANIFEST) if k in keys]
    subs = [(origin, here[0])] if here else [
        (S3Origin(client, bucket, p["Prefix"]), kind) for p in listing.get("CommonPrefixes", [])
        for kind in [next((k for k in (META_FILE, MANIFEST) if has(p["Prefix"], k)), None)] if kind]
    for sub, kind in subs:
        name = sub.prefix.rstrip("/").rsplit("/", 1)[-1]
        index_dir = index_root / bucket / sub.prefix
        if kind == MANIFEST:  # adopted in place (datatrove output): its record lives under the cache dir
            yield name, (lambda sub=sub, d=index_dir: (
                "tokens", AdoptedSource.open_remote(sub, d, cache, verify=mode))), sub.describe("")
        else:
            yield name, (lambda sub=sub, d=index_dir: (
                "tokens", PreparedSource.open_remote(sub, d, cache, mode))), sub.describe("")


def _found(names: list[str], shown: int = 8) -> str:
    """What a location holds instead of a source, for the not-ready reason ("" when nothing at all)."""
    if not names:
        return ""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return (f"; it holds {', '.join(names[:shown])}{more}: describe tokenized files with a {MANIFEST} "
            "(docs/scale.md, adopting in place) or prepare them with mixer prepare")


def _local_entries(root: Path) -> list[str]:
    """The names in ``root`` and one level down (``sub/name``), hidden ones (the cache) left out."""
    out = []
    for path in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        out += ([f"{path.name}/{q.name}" for q in sorted(path.iterdir()) if not q.name.startswith(".")]
                if path.is_dir() else [path.name])
    return out


def _listed(url: str, endpoint: str | None) -> list[str]:
    """The first keys under ``url`` (relative to it), or [] when there are none or listing fails."""
    from mixer_service.sources.origins import parse_s3_url, s3_client

    bucket, prefix = parse_s3_url(url)
    base = f"{prefix}/" if prefix else ""
    try:
        listing = s3_client(endpoint).list_objects_v2(Bucket=bucket, Prefix=base, MaxKeys=100)
    except Exception:  # botocore raises many unrelated types; the opener already reported unreachability
        return []
    return [o["Key"][len(base):] for o in listing.get("Contents", [])]


def _raiser(exc: MixerError):
    def opener():
        raise exc
    return opener
