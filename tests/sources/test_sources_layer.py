"""The sources layer stands alone: serving and decoding sources never loads the planner or scipy."""

from __future__ import annotations

import subprocess
import sys


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
        (root / "sotu" / "meta.json").write_text("{}")
        with pytest.raises(SourceUnavailable, match=r"sotu.*meta\.json was removed or changed"):
            registry.get("sotu")
        assert any("sotu" in p and "meta.json changed" in p for p in registry.problems())
    finally:
        registry.close()
