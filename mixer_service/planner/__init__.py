"""Planner: turn pilot measurements into a domain fraction δ and a compression level for a budget.

Pure functions over measurements; the service and the CLI call them. The names below are loaded on first
use (PEP 562) because they need the optional "planner" extra (scipy, Pillow); importing the package, e.g.
for ``planner.plan_command.register``, must work without it. ``plots`` (matplotlib) is imported explicitly.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "CodecCurve": "codec",
    "measure_codec_curve": "codec",
    "EncodedSizes": "images",
    "OverfittingLaw": "overfitting_law",
    "SptFit": "overfitting_law",
    "fit_overfitting_law": "overfitting_law",
    "RandomizedAssignment": "randomized",
    "assign_randomized": "randomized",
    "FinetuneGain": "recommend",
    "Recommendation": "recommend",
    "fit_finetune_gain": "recommend",
    "recommend_delta": "recommend",
    "schedule_for_delta": "recommend",
    "SptRuns": "spt_runs",
    "load_runs": "spt_runs",
    "Allocation": "storage_law",
    "StorageFit": "storage_law",
    "StorageLaw": "storage_law",
    "allocate": "storage_law",
    "fit_storage_law": "storage_law",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
