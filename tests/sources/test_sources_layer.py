"""The sources layer stands alone: serving and decoding sources never loads the planner or scipy."""

from __future__ import annotations

import subprocess
import sys
import time


def test_service_and_client_load_sources_without_the_planner() -> None:
    code = (
        "import sys\n"
        "import mixer_service.service.app, mixer_service.service.source_registry\n"
        "import mixer_service.sources.image_source\n"
        "import client.image_batches\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('mixer_service.planner', 'scipy')))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_registry_contract_names_missing_broken_and_changed_sources(sources_dir, tmp_path) -> None:
    """``get``: NotFound for a name never here, SourceUnavailable for one that is broken or changed here;
    ``problems`` lists both; ``cache_stats`` counts what the shard cache did."""
    import shutil

    import pytest

    from mixer_contract.errors import NotFound, SourceUnavailable
    from mixer_service.service.source_registry import SourceRegistry

    root = tmp_path / "sources"
    shutil.copytree(sources_dir, root, ignore=shutil.ignore_patterns(".cache"))
    (root / "abc" / "doc_offsets.npy").write_bytes(b"not an index")
    registry = SourceRegistry.load(root, tmp_path / "cache", cache_limit=1 << 30)
    try:
        with pytest.raises(NotFound, match="'nope' is not on this server"):
            registry.get("nope")
        with pytest.raises(SourceUnavailable, match=r"'abc' is unavailable.*doc_offsets\.npy"):
            registry.get("abc")
        sotu = registry.get("sotu")
        assert sotu.document(0).size and registry.cache_stats()["fetches"] == 1
        assert [p for p in registry.problems() if "abc" in p] and not [
            p for p in registry.problems() if "sotu" in p]
        meta = (root / "sotu" / "meta.json").read_bytes()
        (root / "sotu" / "meta.json").write_text("{}")
        assert any("sotu" in p and "meta.json changed" in p for p in registry.problems())
        refused = _first_refusal(registry, "sotu")
        assert "meta.json was removed or changed" in str(refused)
        (root / "sotu" / "meta.json").write_bytes(meta)  # put back: served again without a restart
        assert _served_again(registry, "sotu") is sotu
    finally:
        registry.close()


def _first_refusal(registry, name: str) -> Exception:
    """``get(name)`` until it refuses; at most ``SOURCE_RECHECK_S`` (plus slack) after the change."""
    from mixer_contract.errors import SourceUnavailable
    from mixer_service.service.source_registry import SOURCE_RECHECK_S

    deadline = time.monotonic() + SOURCE_RECHECK_S + 5
    while time.monotonic() < deadline:
        try:
            registry.get(name)
        except SourceUnavailable as exc:
            return exc
        time.sleep(0.05)
    raise AssertionError(f"{name} still served {SOURCE_RECHECK_S} s after its files changed")


def _served_again(registry, name: str):
    from mixer_contract.errors import SourceUnavailable
    from mixer_service.service.source_registry import SOURCE_RECHECK_S

    deadline = time.monotonic() + SOURCE_RECHECK_S + 5
    while time.monotonic() < deadline:
        try:
            return registry.get(name)
        except SourceUnavailable:
            time.sleep(0.05)
    raise AssertionError(f"{name} still refused after its files were put back")


def test_a_burst_of_requests_checks_a_sources_files_once(sources_dir, tmp_path) -> None:
    """The per-request stat of every index file is amortised: many ``get``s inside ``SOURCE_RECHECK_S``
    run ``changed()`` once (it was ~half of what a batch request spent on its store and source checks)."""
    from mixer_service.service.source_registry import SourceRegistry

    registry = SourceRegistry.load(sources_dir, tmp_path / "cache", cache_limit=1 << 30)
    try:
        src = registry.sources["sotu"]
        calls = []
        real = src.changed
        src.changed = lambda: calls.append(1) or real()
        start = time.monotonic()
        for _ in range(200):
            registry.get("sotu")
        if time.monotonic() - start < 0.25:  # a stalled machine may legitimately re-check once more
            assert len(calls) == 1
        assert 1 <= len(calls) <= 3
    finally:
        registry.close()
