"""The layout's arrows point one way: contract <- engine/sources <- service; contract <- client <- trainer.

Each side is imported, every module of it, in a fresh interpreter that refuses the packages that side must
not need, so a new import of pydantic in the engine or of the service in the client fails here, not on a
trainer node that has no server extra installed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

# Imports every module under each root with the given top-level packages (or dotted prefixes) refused,
# then prints the top-level packages those imports loaded.
_PROBE = r"""
import importlib, importlib.abc, pkgutil, sys
before = set(sys.modules)
blocked = [b for b in sys.argv[1].split(",") if b]
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if any(name == b or name.startswith(b + ".") for b in blocked):
            raise ImportError(f"layering: {name} must not be imported here")
sys.meta_path.insert(0, Refuse())
for root in sys.argv[2].split(","):
    module = importlib.import_module(root)
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), root + "."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
print(",".join(sorted({name.split(".")[0] for name in set(sys.modules) - before})))
"""

SERVER_ONLY = ["fastapi", "pydantic", "starlette", "uvicorn", "scipy", "redis", "prometheus_client"]
LAYERS = {
    "engine": (["mixer_service.engine"], SERVER_ONLY + [
        "mixer_service.sources", "mixer_service.service", "mixer_service.store", "mixer_service.planner",
        "client", "trainer"]),
    "sources": (["mixer_service.sources"], SERVER_ONLY + [
        "mixer_service.service", "mixer_service.store", "mixer_service.planner", "client", "trainer"]),
    "client": (["client"], SERVER_ONLY + ["mixer_service", "trainer", "mixer_demo"]),
    "trainer": (["trainer"], SERVER_ONLY + ["mixer_service", "mixer_demo"]),
    # every `mixer` sub-command registers without the server extra (serve loads it when it runs)
    "command": (["mixer_service.cli"], ["fastapi", "pydantic", "starlette", "uvicorn", "prometheus_client"]),
    "planner": (["mixer_service.planner"], ["fastapi", "pydantic", "starlette", "uvicorn",
                                            "mixer_service.service", "client", "trainer"]),
}


def _probe(roots: list[str], blocked: list[str]) -> set[str]:
    run = subprocess.run([sys.executable, "-c", _PROBE, ",".join(blocked), ",".join(roots)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return set(run.stdout.strip().split(","))


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layer_imports_without_what_it_must_not_need(layer: str) -> None:
    roots, blocked = LAYERS[layer]
    _probe(roots, blocked)


def test_contract_needs_only_the_standard_library_and_numpy() -> None:
    loaded = _probe(["mixer_contract"], [])
    third_party = loaded - set(sys.stdlib_module_names) - {"numpy", "mixer_contract"}
    assert not third_party, f"mixer_contract imports {sorted(third_party)}"


def test_the_probe_refuses_what_it_blocks() -> None:
    """The layering checks above mean something only if a blocked import really fails."""
    run = subprocess.run([sys.executable, "-c", _PROBE, "pydantic", "mixer_service.service.routes.models"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "layering: pydantic" in run.stderr
