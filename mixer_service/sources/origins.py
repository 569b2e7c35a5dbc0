"""Where a source's files live: a local directory, or a prefix in an S3-compatible object store.

An origin hands out whole files (a shard is fetched once, then cached), byte ranges (a block of a
document index) and sizes; every failure names the file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Protocol

from mixer_contract.errors import CorruptData, InvalidInput, MixerError, SourceUnavailable
from mixer_service.sources.verify import FileStamp

log = logging.getLogger(__name__)

PROBE_BYTES = 1 << 16  # hashed at each end of an adopted input file at each open: tells a regenerated one


class Origin(Protocol):
    """Read access to the files of one source."""

    def read(self, name: str) -> bytes:
        """The whole file ``name``; a missing or unreachable file raises a ``MixerError`` naming it."""
        ...

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of ``name`` (fewer only when the file is shorter)."""
        ...

    def size(self, name: str) -> int:
        """The size of ``name`` in bytes (what tells a truncated file without reading past its end)."""
        ...

    def describe(self, name: str) -> str:
        """A path or URL naming ``name`` for messages."""
        ...

    def stamp(self, name: str) -> FileStamp | None:
        """A cheap identity of the file for change detection; None where the origin cannot give one."""
        ...


class LocalOrigin:
    """A source directory on a local (or network) file system."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def read(self, name: str) -> bytes:
        try:
            return (self.directory / name).read_bytes()
        except OSError as exc:
            raise CorruptData(f"{self.directory / name}: cannot read ({exc.strerror or exc})") from exc

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        try:
            with open(self.directory / name, "rb") as fh:
                return os.pread(fh.fileno(), stop - start, start)
        except OSError as exc:
            raise CorruptData(f"{self.directory / name}: cannot read ({exc.strerror or exc})") from exc

    def size(self, name: str) -> int:
        try:
            return os.stat(self.directory / name).st_size
        except OSError as exc:
            raise CorruptData(f"{self.directory / name}: cannot read ({exc.strerror or exc})") from exc

    def describe(self, name: str) -> str:
        return str(self.directory / name)

    def stamp(self, name: str) -> FileStamp | None:
        return FileStamp.of(self.directory / name)

    def path(self, name: str) -> Path:
        return self.directory / name


class S3Origin:
    """A source under ``s3://bucket/prefix/`` read with boto3; transient failures retry with backoff while
    another attempt still fits in ``deadline_s`` (a hung store: one timed-out attempt, then a 503).

    boto3 is the reference S3 client (AWS, MinIO, GCS interop and Ceph all test against it), keeps its own
    connection pool per client, and is thread-safe per client, so prefetch threads share one.
    """

    def __init__(self, client, bucket: str, prefix: str, attempts: int = 4, backoff_s: float = 0.2,
                 deadline_s: float = 4.5) -> None:
        self.client = client
        self.deadline_s = deadline_s
        config = client.meta.config
        self.attempt_s = config.connect_timeout + config.read_timeout  # the longest one attempt can hang
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.attempts = attempts
        self.backoff_s = backoff_s

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def describe(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    def stamp(self, name: str) -> FileStamp | None:
        return None  # a HEAD per readiness probe per file would cost a round trip each; shards are hashed

    def read(self, name: str) -> bytes:
        return self._get(name)

    def size(self, name: str) -> int:
        """One HEAD (S3 answers a range past an object's end with an error, not a short read)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self.key(name))["ContentLength"])
        except (ClientError, BotoCoreError, OSError) as exc:
            raise SourceUnavailable(f"{self.describe(name)}: cannot stat ({exc})") from exc

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        return self._get(name, Range=f"bytes={start}-{stop - 1}")

    def _get(self, name: str, **extra: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        delay, deadline = self.backoff_s, time.monotonic() + self.deadline_s
        for attempt in range(1, self.attempts + 1):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self.key(name), **extra)["Body"].read()
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in ("NoSuchKey", "404", "NoSuchBucket", "AccessDenied", "403"):
                    raise SourceUnavailable(f"{self.describe(name)}: {code} from the object store") from exc
                error: Exception = exc
            except (BotoCoreError, OSError) as exc:
                error = exc
            log.warning("object store read failed; retrying", extra={
                "event": "s3.retry", "object": self.describe(name), "attempt": attempt, "error": str(error)})
            if attempt == self.attempts or time.monotonic() + delay + self.attempt_s > deadline:
                break  # no time for another attempt: the caller answers 503 now, not after many timeouts
            time.sleep(delay)
            delay *= 2
        raise SourceUnavailable(
            f"{self.describe(name)}: object store unreachable after {attempt} attempts ({error})")


def probe(origin: Origin, name: str) -> dict:
    """A cheap identity of an input file: its size and the sha256 of its first and last ``PROBE_BYTES``
    (the same record whichever origin it was taken through, so an index made locally holds in S3)."""
    size = origin.size(name)
    head = origin.read_range(name, 0, min(size, PROBE_BYTES)) if size else b""
    tail = origin.read_range(name, max(0, size - PROBE_BYTES), size) if size else b""
    return {"file": name, "size": size, "head_sha256": hashlib.sha256(head).hexdigest(),
            "tail_sha256": hashlib.sha256(tail).hexdigest()}


def same_probes(origin: Origin, probes: list[dict]) -> bool:
    """Whether every recorded probe still matches its file (any failure to read one: no)."""
    try:
        return all(probe(origin, p["file"]) == p for p in probes)
    except (MixerError, OSError, KeyError, TypeError):
        return False


def s3_client(endpoint_url: str | None = None, region: str | None = None, timeout_s: float = 2.0):
    """One boto3 S3 client; its own retries are off because ``S3Origin`` retries (and logs) itself.

    ``timeout_s`` bounds each read (the gap between bytes, not a whole shard) and connecting gets half,
    so a hung store is noticed within it.
    """
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region or "us-east-1",
        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=timeout_s / 2,
                      read_timeout=timeout_s, max_pool_connections=32),
    )


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix)."""
    if not url.startswith("s3://") or len(url) <= 5:
        raise InvalidInput(f"{url!r}: not an s3://bucket/prefix URL")
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix.strip("/")
