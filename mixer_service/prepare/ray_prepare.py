"""``mixer prepare --ray``: the same prepare, tokenized across a Ray cluster with Ray Data.

Input files are grouped into contiguous parts; each part is read (by the single-process readers) and
tokenized in a ``map_batches`` task, which sends its tokens back in chunks through Ray's object store, so
no shared filesystem is needed. The driver stores chunks as they complete (progress bars count them),
then merges them in input order through the single-process writer: the result is byte-identical to
``prepare_source`` on the same inputs, whatever the part boundaries, completion order or task retries.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from tqdm import tqdm

from mixer_contract.errors import CorruptData, InvalidInput, MixerError
from mixer_service.prepare.parts import (
    CHUNK_TOKENS,
    PART_BYTES,
    InputFile,
    PartChunk,
    ReadSpec,
    chunk_file_name,
    group_parts,
    load_chunks,
    merge_parts,
    plan_inputs,
    read_part,
    tokenize_part,
    worker_tokenizer,
)
from mixer_service.prepare.readers import Format
from mixer_service.prepare.tokenizer import TextTokenizer
from mixer_service.prepare.writer import (
    DEFAULT_BATCH_CHARS,
    DEFAULT_BATCH_DOCS,
    DEFAULT_SHARD_TOKENS,
    STAGING_DIR,
    check_arguments,
)
from mixer_service.sources.source_format import SourceMeta

logger = logging.getLogger(__name__)

def prepare_source_ray(
    inputs: Sequence[str | Path],
    out_dir: Path,
    tokenizer: TextTokenizer,
    name: str | None = None,
    *,
    address: str | None = None,
    fmt: Format = "auto",
    text_field: str = "text",
    split_regex: str | None = None,
    glob: str | None = None,
    s3_endpoint: str | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    max_docs: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    part_bytes: int = PART_BYTES,
    chunk_tokens: int = CHUNK_TOKENS,
    batch_chars: int = DEFAULT_BATCH_CHARS,
    batch_docs: int = DEFAULT_BATCH_DOCS,
    num_cpus: int | None = None,
) -> SourceMeta:
    """Prepare ``inputs`` on Ray: the cluster at ``address``, an embedded local one (``num_cpus``) when
    None, or the session already open in this process. Same arguments and result as the single-process
    ``iter_documents`` + ``prepare_source``; inputs may also be ``s3://bucket/prefix`` URLs. ``batch_chars``
    and ``batch_docs`` are the single-process batching, which decides the empty-document count under
    ``max_docs``.

    A task whose worker or node dies is re-run by Ray (tasks retry 3 times by default; a part is a pure
    function of its files, so a re-run sends the same chunks); an error raised by a reader is not retried.
    """
    out_dir = Path(out_dir)
    name = name or out_dir.name
    check_arguments(out_dir, shard_tokens, max_docs, overwrite)
    try:
        if split_regex:
            re.compile(split_regex, re.MULTILINE)
    except re.error as exc:
        raise InvalidInput(f"invalid --split-regex {split_regex!r}: {exc}") from exc
    parts = group_parts(plan_inputs(inputs, fmt, glob, s3_endpoint), part_bytes)
    spec = ReadSpec(text_field, split_regex, s3_endpoint)
    staging = out_dir.parent / STAGING_DIR
    staging.mkdir(parents=True, exist_ok=True)
    chunk_dir = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.parts-", dir=staging))
    try:
        with _session(address, num_cpus):
            names = _tokenize_on_cluster(parts, spec, tokenizer, chunk_dir, chunk_tokens, progress)
        return merge_parts(load_chunks(chunk_dir, names), out_dir, tokenizer, name, shard_tokens=shard_tokens,
                           max_docs=max_docs, overwrite=overwrite, progress=progress,
                           batch_chars=batch_chars, batch_docs=batch_docs)
    finally:
        shutil.rmtree(chunk_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # still in use by a concurrent prepare
            staging.rmdir()


@contextlib.contextmanager
def _session(address: str | None, num_cpus: int | None) -> Iterator[None]:
    """Connect (or start an embedded local Ray) unless this process already has a Ray session."""
    if ray.is_initialized():
        yield
        return
    # "local" always starts a private instance: never join a cluster someone else started on this host.
    ray.init(address=address or "local", num_cpus=None if address else num_cpus, include_dashboard=False,
             logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def _tokenize_on_cluster(
    parts: list[list[InputFile]], spec: ReadSpec, tokenizer: TextTokenizer, chunk_dir: Path,
    chunk_tokens: int, progress: bool,
) -> list[str]:
    """Run one ``map_batches`` task per part; store each chunk as it completes; return the chunk files
    in merge order. A chunk delivered twice (a retried task) is the same bytes and is counted once."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = ctx.print_on_execution_start = False  # ours count documents and tokens
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # not a line per dataset started and finished
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    rows = [{"part": i, "files": json.dumps([[f.location, f.kind, f.size] for f in files])}
            for i, files in enumerate(parts)]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        _tokenize_rows,
        batch_size=1,
        batch_format="numpy",
        # The tokenizer goes to the object store once; each worker process builds it once per run.
        fn_kwargs={"spec": spec, "tokenizer": (uuid.uuid4().hex, ray.put(tokenizer)),
                   "chunk_tokens": chunk_tokens},
        num_cpus=1,
        runtime_env={"env_vars": {"RAYON_NUM_THREADS": "1"}},  # one core per task, as Ray reserves
    )
    seen: set[tuple[int, int]] = set()
    last_chunk: dict[int, int] = {}
    docs_bar = tqdm(desc="prepare docs", unit="doc", unit_scale=True, disable=not progress)
    tokens_bar = tqdm(desc="prepare tokens", unit="tok", unit_scale=True, disable=not progress)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for payload in batch.column("payload").to_pylist():
                chunk = PartChunk.from_bytes(payload)
                (chunk_dir / chunk_file_name(chunk.part, chunk.chunk)).write_bytes(payload)
                if chunk.last:
                    last_chunk[chunk.part] = chunk.chunk
                if (chunk.part, chunk.chunk) not in seen:
                    seen.add((chunk.part, chunk.chunk))
                    docs_bar.update(chunk.lengths.size)
                    tokens_bar.update(chunk.num_tokens)
                    docs_bar.set_postfix_str(f"{len(last_chunk)}/{len(parts)} parts", refresh=False)
    except Exception as exc:
        cause = _mixer_error(exc)
        if cause is None:
            raise
        raise cause from exc
    finally:
        docs_bar.close()
        tokens_bar.close()
    expected = {(p, c) for p, last in last_chunk.items() for c in range(last + 1)}
    if len(last_chunk) != len(parts) or seen != expected:
        raise CorruptData(f"Ray returned {len(seen)} chunks of {len(last_chunk)} parts; expected all "
                          f"chunks of {len(parts)} parts")
    return [chunk_file_name(p, c) for p, c in sorted(seen)]


_worker_tokenizers: dict[str, TextTokenizer] = {}  # this run's tokenizer, in each worker process


def _tokenizer_of_run(run: str, ref: ray.ObjectRef) -> TextTokenizer:
    """Unpickling and checking GPT-2 BPE takes ~0.5 s: done once a worker process, not once a part."""
    if run not in _worker_tokenizers:
        _worker_tokenizers.clear()
        _worker_tokenizers[run] = worker_tokenizer(ray.get(ref))
    return _worker_tokenizers[run]


def _tokenize_rows(
    batch: dict[str, np.ndarray], spec: ReadSpec, tokenizer: tuple[str, ray.ObjectRef], chunk_tokens: int
) -> Iterator[pa.Table]:
    """The ``map_batches`` function (on a worker): each part's chunks as one-row tables."""
    tok = _tokenizer_of_run(*tokenizer)
    for part, files_json in zip(batch["part"].tolist(), batch["files"].tolist(), strict=True):
        files = [InputFile(loc, kind, size) for loc, kind, size in json.loads(files_json)]
        for chunk in tokenize_part(part, read_part(files, spec), tok, chunk_tokens):
            yield pa.table({"payload": pa.array([chunk.to_bytes()], pa.large_binary())})


def _mixer_error(exc: BaseException) -> MixerError | None:
    """The input error a task raised, unwrapped from Ray's task and user-code exceptions."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, MixerError):
            return cur
        seen.add(id(cur))
        cur = getattr(cur, "cause", None) or cur.__cause__
    return None
