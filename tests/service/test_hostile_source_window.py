"""A hostile review's attack on issue 21: a source's files are stat-ed at most every ``SOURCE_RECHECK_S``
(0.5 s). The claim: nothing wrong is served in that window. Each test changes a prepared source's files
under a running ``JobManager`` and, *without waiting*, makes batches (with document boundaries, which read
the document index): each must be the bytes a pristine copy gives, or a ``MixerError`` (503/500 family)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from service_helpers import JOB, SCHEDULE

from mixer_contract import wire
from mixer_contract.errors import MixerError
from mixer_service.service.jobs import JobManager
from mixer_service.service.routes.batches import make_batch
from mixer_service.service.source_registry import SourceRegistry
from mixer_service.sources.source_format import OFFSETS_FILE
from mixer_service.store.embedded import EmbeddedStore

LIMIT = 1 << 30
STEPS = range(0, 40)
LAST: list[str] = []  # the outcome of each step in the last ``wrong`` call


def batch(manager: JobManager, step: int) -> bytes | str:
    """The batch's content (tokens, sources, document boundaries; not the header, which names the job's
    incarnation), or why it was refused."""
    try:
        body, _ = make_batch(manager, LIMIT, {}, "j", step, 0, 1, "none", True)
    except MixerError as exc:
        return f"refused: {type(exc).__name__}"
    got = wire.decode(body)
    return got.tokens.tobytes() + got.source_ids.tobytes() + repr(
        [np.asarray(b).tolist() for b in got.boundaries or []]).encode()


@pytest.fixture
def pair(sources_dir: Path, tmp_path: Path):
    """A manager over a copy of the sources we may damage, and one over a pristine copy (the reference)."""
    managers = []
    for name in ("hostile", "pristine"):
        root = tmp_path / name
        shutil.copytree(sources_dir, root, ignore=shutil.ignore_patterns(".cache"))
        store = EmbeddedStore(tmp_path / f"{name}.sqlite")
        manager = JobManager(store, SourceRegistry.load(root, tmp_path / f"{name}-cache", memory_bytes=0))
        manager.create("j", JOB, SCHEDULE, "test", "t")
        managers.append((manager, root))
    yield managers
    for manager, _ in managers:
        manager.sources.close()
        manager.store.close()


def wrong(hostile: JobManager, pristine: JobManager) -> list[tuple[int, str]]:
    out, outcomes = [], []
    for step in STEPS:
        got, want = batch(hostile, step), batch(pristine, step)
        assert not isinstance(want, str), want
        if isinstance(got, bytes) and got != want:
            out.append((step, "DIFFERENT BYTES"))
        outcomes.append(got if isinstance(got, str) else "same")
    print(sorted(set(outcomes)), len(outcomes))
    LAST[:] = outcomes
    return out


def swap_in_place(path: Path, other: Path) -> None:
    """Rewrite ``path``'s bytes with ``other``'s (same inode), keeping its size and mtime."""
    stat = path.stat()
    data = other.read_bytes()[: stat.st_size].ljust(stat.st_size, b"\0")
    with open(path, "r+b") as fh:
        fh.write(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("how", ["renamed", "in_place_same_stamp", "truncated", "zeroed_middle"])
def test_a_document_index_changed_under_the_server_serves_no_wrong_byte(pair, how):
    (hostile, root), (pristine, _) = pair
    for step in range(3):  # warm: the index blocks in use are checked, the verdict is fresh
        assert isinstance(batch(hostile, step), bytes)
    index = root / "abc" / OFFSETS_FILE
    other = root / "sotu" / OFFSETS_FILE
    original = index.read_bytes()
    if how == "renamed":
        tmp = index.with_name("x.tmp")
        tmp.write_bytes(other.read_bytes())
        os.replace(tmp, index)
    elif how == "in_place_same_stamp":
        swap_in_place(index, other)
    elif how == "truncated":
        os.truncate(index, len(original) // 2)
    else:
        data = bytearray(original)
        mid = len(data) // 2
        data[mid:mid + 64] = b"\0" * 64
        stat = index.stat()
        with open(index, "r+b") as fh:
            fh.write(data)
        os.utime(index, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert wrong(hostile, pristine) == []
    time.sleep(0.6)  # past the stat window: still nothing wrong (refused or the same bytes)
    assert wrong(hostile, pristine) == []
    index.write_bytes(original)  # put back: served again, the same bytes
    assert wrong(hostile, pristine) == []
    time.sleep(0.6)
    assert wrong(hostile, pristine) == [] and set(LAST) == {"same"}, "a source put back is served again"


def test_a_shard_replaced_under_the_server_serves_no_wrong_byte(pair):
    (hostile, root), (pristine, _) = pair
    for step in range(3):
        assert isinstance(batch(hostile, step), bytes)
    shards = sorted(p for p in (root / "abc").rglob("*") if p.is_file() and p.suffix == ".zst")
    others = sorted(p for p in (root / "sotu").rglob("*") if p.is_file() and p.suffix == ".zst")
    assert shards and others
    saved = {p: p.read_bytes() for p in shards}
    for p in shards:
        swap_in_place(p, others[0])
    cache = root.parent / "hostile-cache" / "shards"
    flipped = sorted(cache.glob("*.bin"))
    assert flipped, list(root.parent.rglob("*.bin"))
    for f in flipped:  # and the decoded copies: a bit of every block flipped in place, same stamp
        stat = f.stat()
        data = bytearray(f.read_bytes())
        data[::4096] = bytes(b ^ 1 for b in data[::4096])  # one bit in every checked block
        with open(f, "r+b") as fh:
            fh.write(data)
        os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert wrong(hostile, pristine) == []
    for p, data in saved.items():
        p.write_bytes(data)
    assert wrong(hostile, pristine) == []


def test_meta_json_replaced_under_the_server_serves_no_wrong_byte(pair):
    (hostile, root), (pristine, _) = pair
    for step in range(3):
        assert isinstance(batch(hostile, step), bytes)
    meta = root / "abc" / "meta.json"
    saved = meta.read_bytes()
    tmp = meta.with_name("m.tmp")
    tmp.write_bytes((root / "sotu" / "meta.json").read_bytes())
    os.replace(tmp, meta)
    assert wrong(hostile, pristine) == []
    meta.write_bytes(saved)
    assert wrong(hostile, pristine) == []
