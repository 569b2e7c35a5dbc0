"""Read documents (one ``str`` each) from raw corpora: JSONL (+.zst/.gz), Parquet, text folders and MDS.

Order is deterministic: inputs are taken in the order given, and every directory or glob expands to its
files in sorted order, so re-preparing the same corpus gives the same token stream and fingerprint.
"""

from __future__ import annotations

import glob as globlib
import gzip
import io
import json
import logging
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
import zstandard

from mixer_contract.errors import InvalidInput

logger = logging.getLogger(__name__)

Format = Literal["auto", "jsonl", "parquet", "text", "mds"]
FORMATS: tuple[Format, ...] = ("auto", "jsonl", "parquet", "text", "mds")
JSONL_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz", ".ndjson", ".ndjson.zst", ".ndjson.gz")
PARQUET_BATCH_ROWS = 8192
MDS_INDEX = "index.json"


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def expand_inputs(inputs: Sequence[str | Path], glob: str | None = None) -> list[Path]:
    """Files (and MDS dataset dirs) named by ``inputs``: paths, directories or glob patterns.

    A directory expands to its non-hidden files matching ``glob`` (default: all, recursively), unless it is
    an MDS dataset (has ``index.json``), which stays one entry.
    """
    if not inputs:
        raise InvalidInput("no input paths given")
    out: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            if (path / MDS_INDEX).is_file():
                out.append(path)
                continue
            files = sorted(
                (p for p in path.glob(glob or "**/*") if p.is_file() and not _is_hidden(p, path)), key=str
            )
            if not files:
                raise InvalidInput(f"{path}: directory has no files matching {glob or '**/*'!r}")
            out.extend(files)
        elif path.is_file():
            out.append(path)
        elif globlib.has_magic(str(raw)):
            matches = sorted((Path(m) for m in globlib.glob(str(raw), recursive=True)), key=str)
            if not matches:
                raise InvalidInput(f"{raw}: glob matches no files")
            out.extend(expand_inputs(matches, glob))
        else:
            raise InvalidInput(f"{raw}: no such file or directory")
    return out


def detect_format(path: Path) -> Format:
    """The format of one expanded input, from its name (or ``index.json`` for MDS dirs)."""
    name = path.name.lower()
    if path.is_dir():
        return "mds"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _open_binary(path: Path) -> io.BufferedIOBase:
    name = path.name.lower()
    if name.endswith(".zst"):
        return io.BufferedReader(zstandard.open(path, "rb"), 1 << 20)  # adds readline / line iteration
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _text_value(value: Any, text_field: str, where: str) -> str:
    if value is None:
        return ""  # counted as an empty document by the writer
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str):
        raise InvalidInput(f"{where}: field {text_field!r} is {type(value).__name__}, expected a string")
    return value


def read_jsonl(path: Path, text_field: str = "text") -> Iterator[str]:
    """One document per non-blank line; a line without ``text_field`` is an error naming file and line."""
    try:
        with _open_binary(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise InvalidInput(f"{where}: invalid JSON ({exc})") from exc
                if not isinstance(obj, dict) or text_field not in obj:
                    raise InvalidInput(f"{where}: no field {text_field!r}")
                yield _text_value(obj[text_field], text_field, where)
    except (OSError, EOFError, zstandard.ZstdError) as exc:
        raise InvalidInput(f"{path}: cannot read ({exc})") from exc


def read_parquet(path: Path, text_field: str = "text") -> Iterator[str]:
    """One document per row of column ``text_field``, read in record batches to bound memory."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for non-parquet files
        raise InvalidInput(f"{path}: not a readable Parquet file ({exc})") from exc
    if text_field not in pf.schema_arrow.names:
        raise InvalidInput(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            yield _text_value(value, text_field, str(path))


def read_text(path: Path, split_regex: str | re.Pattern[str] | None = None) -> Iterator[str]:
    """The whole file as one document, or one document per ``split_regex`` match (multiline mode).

    Split mode is lossless: each match starts a document, and the text before the first match is a
    document too unless it is only whitespace (e.g. a file header) — concatenating gives the file back.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path}: not valid UTF-8 ({exc})") from exc
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read ({exc})") from exc
    if split_regex is None:
        yield text
        return
    pattern = split_regex if isinstance(split_regex, re.Pattern) else re.compile(split_regex, re.MULTILINE)
    starts = [m.start() for m in pattern.finditer(text)]
    head = text[: starts[0]] if starts else text
    if head.strip():
        yield head
    for begin, end in zip(starts, starts[1:] + [len(text)] if starts else [], strict=True):
        yield text[begin:end]


def read_mds(root: Path, text_field: str = "text") -> Iterator[str]:
    """Samples of a local mosaicml-streaming dataset, via streaming's own shard readers.

    Compressed-only shards are decompressed one at a time into a temp dir with streaming's codecs.
    """
    # Heavy imports (torch): only when MDS is actually used.
    from streaming.base.compression import decompress
    from streaming.base.format.mds import MDSReader

    try:
        index = json.loads((root / MDS_INDEX).read_text())
        infos = index["shards"]
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInput(f"{root / MDS_INDEX}: unreadable MDS index ({exc})") from exc
    with tempfile.TemporaryDirectory(prefix="mds-") as tmp:
        for info in infos:
            if info.get("format") != "mds":
                raise InvalidInput(
                    f"{root}: shard format {info.get('format')!r} is not supported (only 'mds')"
                )
            shard = MDSReader.from_json(str(root), None, info)
            try:
                shard.validate(allow_unsafe_types=False)  # never unpickle just to read text
            except ValueError as exc:
                raise InvalidInput(f"{root}: {exc}") from exc
            if text_field not in shard.column_names:
                columns = ", ".join(shard.column_names)
                raise InvalidInput(f"{root}: no column {text_field!r} (columns: {columns})")
            unpacked: Path | None = None
            if not (root / shard.raw_data.basename).exists() and shard.zip_data is not None:
                unpacked = Path(tmp) / shard.raw_data.basename
                unpacked.parent.mkdir(parents=True, exist_ok=True)
                unpacked.write_bytes(
                    decompress(shard.compression, (root / shard.zip_data.basename).read_bytes())
                )
                shard = MDSReader.from_json(tmp, None, info)
            for i in range(shard.samples):
                yield _text_value(shard.get_item(i).get(text_field), text_field, f"{root} sample {i}")
            if unpacked is not None:
                unpacked.unlink()


def iter_documents(
    inputs: Sequence[str | Path],
    fmt: Format = "auto",
    text_field: str = "text",
    split_regex: str | None = None,
    glob: str | None = None,
) -> Iterator[str]:
    """All documents of all inputs, in deterministic order; the one entry point the CLI uses.

    Arguments and paths are checked now (not at first ``next``), so bad input fails before any work.
    """
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    try:
        pattern = re.compile(split_regex, re.MULTILINE) if split_regex else None
    except re.error as exc:
        raise InvalidInput(f"invalid --split-regex {split_regex!r}: {exc}") from exc
    paths = expand_inputs(inputs, glob)
    kinds = [detect_format(p) if fmt == "auto" else fmt for p in paths]
    for path, kind in zip(paths, kinds, strict=True):
        if kind == "mds" and not (path / MDS_INDEX).is_file():
            raise InvalidInput(f"{path}: not an MDS dataset (no {MDS_INDEX})")
    logger.info("reading %d inputs", len(paths), extra={"event": "prepare.inputs", "num_inputs": len(paths)})
    return _read_all(paths, kinds, text_field, pattern)


def _read_all(
    paths: list[Path], kinds: list[Format], text_field: str, pattern: re.Pattern[str] | None
) -> Iterator[str]:
    for path, kind in zip(paths, kinds, strict=True):
        if kind == "mds":
            yield from read_mds(path, text_field)
        elif kind == "jsonl":
            yield from read_jsonl(path, text_field)
        elif kind == "parquet":
            yield from read_parquet(path, text_field)
        else:
            yield from read_text(path, pattern)
