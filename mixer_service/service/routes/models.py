"""Typed request bodies shared by the routes, so the OpenAPI schema is as strict as the real validation.

Bounds come from ``mixer_service.values`` and the engine's own patterns; the engine still checks what a
schema cannot say (weights sum to 1, a source exists, a once-source lasts).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field

from mixer_service.engine.config import _NAME, ROLES
from mixer_service.engine.epoch_order import MAX_WINDOW_SHARDS
from mixer_service.engine.mixture import MAX_SOURCES
from mixer_service.engine.schedule import MAX_PHASES, WEIGHT_PATTERN
from mixer_service.store.base import JOB_ID_PATTERN
from mixer_service.values import GLOBAL_BATCH, SEED, SEQ_LEN, STEP, TOTAL_STEPS

SourceName = Annotated[str, Field(pattern=_NAME.pattern)]
JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN.pattern, description="the job's id")]
Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)] | Annotated[
    str, Field(pattern=WEIGHT_PATTERN, description="decimal or 'p/q'")
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    def to_doc(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class SourceModel(_Strict):
    name: SourceName
    role: Literal[ROLES]  # type: ignore[valid-type]
    fingerprint: str | None = Field(default=None, max_length=128,
                                    description="content fingerprint to pin (409 if the server's differs)")
    root: str | None = Field(default=None, max_length=128,
                             description="Merkle root of the source's meta.json to pin (409 if the server's "
                             "differs); what GET /v1/jobs/{id} returns can be posted again")


class OrderModel(_Strict):
    kind: Literal["global", "window"] = Field(description="global: chunks permuted over the whole source; "
                                              "window: shards permuted, chunks shuffled inside W-shard "
                                              "windows (docs/epoch_order.md)")
    window_shards: int | None = Field(default=None, ge=1, le=MAX_WINDOW_SHARDS, description="W, for window")


class JobConfigModel(_Strict):
    sources: list[SourceModel] = Field(min_length=1, max_length=MAX_SOURCES)
    seq_len: SEQ_LEN.field()  # type: ignore[valid-type]
    global_batch: GLOBAL_BATCH.field()  # type: ignore[valid-type]
    seed: SEED.field() = 0  # type: ignore[valid-type]
    total_steps: TOTAL_STEPS.field()  # type: ignore[valid-type]
    allow_wrap: bool = Field(default=False, description="let a once-source start a second pass")
    order: OrderModel | None = None


class PhaseModel(_Strict):
    start_step: STEP.field()  # type: ignore[valid-type]
    weights: dict[SourceName, Weight] = Field(min_length=1, max_length=MAX_SOURCES)
    ramp: bool = False


class ScheduleModel(_Strict):
    phases: list[PhaseModel] = Field(min_length=1, max_length=MAX_PHASES)
