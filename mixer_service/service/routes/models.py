"""The HTTP edge of the contract: the only module that knows pydantic.

Every request body and problem document of the API, as pydantic models, so the OpenAPI schema is as strict
as the real validation. Bounds, patterns and limits are read from ``mixer_contract`` (never restated);
the contract's ``parse`` stays the one validation of meaning (weights sum to 1, a source exists, a
once-source lasts) and runs on every body the routes accept.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mixer_contract.job import (
    DEFAULT_WINDOW_SHARDS,
    JOB_ID_PATTERN,
    MAX_SOURCES,
    MAX_WINDOW_SHARDS,
    NAME_PATTERN,
    ORDER_KINDS,
    ROLES,
)
from mixer_contract.schedule import MAX_PHASES, WEIGHT_PATTERN
from mixer_contract.values import (
    COUNT,
    GLOBAL_BATCH,
    RANK,
    SEED,
    SEQ_LEN,
    STEP,
    STEPS,
    TOTAL_STEPS,
    TRAINED_STEP,
    WORLD,
    IntRange,
)
from mixer_service.store.evals import MAX_LOSS


def bounded(bounds: IntRange, **kwargs: Any) -> Any:
    """An integer field with ``bounds`` (strictness comes from the model config)."""
    return Annotated[int, Field(ge=bounds.low, le=bounds.high, description=bounds.doc, **kwargs)]


Step = bounded(STEP)
TrainedStep = bounded(TRAINED_STEP)
Rank = bounded(RANK)
World = bounded(WORLD)
Steps = bounded(STEPS)
Seed = bounded(SEED)
Count = bounded(COUNT)
SourceName = Annotated[str, Field(pattern=NAME_PATTERN.pattern)]
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
    kind: Literal[ORDER_KINDS] = Field(  # type: ignore[valid-type]
        description="global: chunks permuted over the whole source; window: shards permuted, chunks shuffled "
        "inside W-shard windows; sliding: shards permuted and admitted one at a time into a window of W "
        "(docs/epoch_order.md)")
    window_shards: int | None = Field(default=None, ge=1, le=MAX_WINDOW_SHARDS,
                                      description="W, for window and sliding")


class JobConfigModel(_Strict):
    sources: list[SourceModel] = Field(min_length=1, max_length=MAX_SOURCES)
    seq_len: bounded(SEQ_LEN)  # type: ignore[valid-type]
    global_batch: bounded(GLOBAL_BATCH)  # type: ignore[valid-type]
    seed: bounded(SEED) = 0  # type: ignore[valid-type]
    total_steps: bounded(TOTAL_STEPS)  # type: ignore[valid-type]
    allow_wrap: bool = Field(default=False, description="let a once-source start a second pass")
    order: OrderModel | None = Field(default=None, description="epoch order; a new job without it gets "
                                     f"sliding order with W={DEFAULT_WINDOW_SHARDS}, written into its config")


class PhaseModel(_Strict):
    start_step: bounded(STEP)  # type: ignore[valid-type]
    weights: dict[SourceName, Weight] = Field(min_length=1, max_length=MAX_SOURCES)
    ramp: bool = False


class ScheduleModel(_Strict):
    phases: list[PhaseModel] = Field(min_length=1, max_length=MAX_PHASES)


# Jobs and schedule changes

class CreateJob(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    job_id: str = Field(pattern=JOB_ID_PATTERN.pattern)
    config: JobConfigModel
    schedule: ScheduleModel
    author: str = Field(default="", max_length=200)
    reason: str = Field(default="", max_length=2000)


class Progress(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    trained_step: TrainedStep = Field(  # type: ignore[valid-type]
        description="last step trained, in [-1, total_steps); -1: nothing")


class ScheduleChange(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    schedule: ScheduleModel
    requested_step: Step = Field(default=0,  # type: ignore[valid-type]
                                 description="takes effect at max(this, first step not yet "
                                 "served or committed)")
    author: str = Field(min_length=1, max_length=200)
    reason: str = Field(min_length=1, max_length=2000)


# Planner requests (bounds beyond the schema: PlanLimits in routes/plan.py)

HARD_MAX_ITEMS = 100_000  # schema bound; the configured PlanLimits are far below it


class SptRun(BaseModel):
    tokens: float = Field(gt=0, description="pretraining tokens T at the measurement")
    delta: float = Field(ge=0, le=1, description="domain fraction δ (a fraction: 0.05 = 5%)")
    domain_loss: float = Field(gt=0, description="held-out domain loss")
    domain_train_loss: float | None = Field(default=None, gt=0, description="domain training-set loss")


class FinetunePoint(BaseModel):
    tokens: float = Field(gt=0)
    gain: float = Field(description="domain loss before finetuning − after")
    delta: float | None = Field(default=None, ge=0, le=1, description="δ of the run (all or none)")


class SptRequest(BaseModel):
    runs: list[SptRun] = Field(min_length=1, max_length=HARD_MAX_ITEMS)
    target_tokens: float | list[float] = Field(description="token budget T, or several: δ*(T) from one fit")
    domain_tokens: float = Field(gt=0, description="|D|: domain set size in tokens")
    delta_range: tuple[float, float] | None = Field(default=None, description="δ search range [low, high]")
    bootstrap: int = Field(default=50, ge=0)
    seed: int = 0
    tokens_unit: float = Field(default=1e9, gt=0, description="unit of T of the reported constants; the "
                               "fit and its answers do not depend on it")
    max_seconds: float | None = Field(default=None, gt=0, description="wall-clock budget, at most the "
                                      "server's (MIXER_PLAN_MAX_SECONDS)")
    holdout_delta: float | None = Field(default=None, ge=0, le=1, description="§5.3 holdout check at this δ")
    predict_deltas: list[float] = Field(default_factory=list, max_length=100)
    finetune: list[FinetunePoint] | None = Field(
        default=None, max_length=HARD_MAX_ITEMS, description="Eq. 7 gains; with δ the post-finetune δ*"
    )
    domain_source: str | None = Field(default=None, description="with web_source: also return a schedule")
    web_source: str | None = None

    @model_validator(mode="after")
    def _both_sources_or_none(self) -> SptRequest:
        if (self.domain_source is None) != (self.web_source is None):
            raise ValueError("give both domain_source and web_source, or neither")
        if isinstance(self.target_tokens, list) and not 1 <= len(self.target_tokens) <= 100:
            raise ValueError("give 1 to 100 target token budgets")
        return self


class StoragePoint(BaseModel):
    n: float = Field(gt=0)
    bytes_per_sample: float = Field(gt=0)
    error: float


class StorageRequest(BaseModel):
    points: list[StoragePoint] = Field(min_length=1, max_length=HARD_MAX_ITEMS)
    budgets: list[float] = Field(min_length=1, max_length=100)
    variant: Literal["additive", "additive_no_floor", "multiplicative"] = "additive"
    bootstrap: int = Field(default=50, ge=0)
    seed: int = 0


# The overfitting watch

class Eval(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    step: Step = Field(description="last data step trained when the model was evaluated")  # type: ignore[valid-type]
    source: str = Field(min_length=1, max_length=200, description="the job source the held-out rows are from")
    loss: float = Field(ge=0, le=MAX_LOSS, allow_inf_nan=False, description="mean loss per token (nats)")
    tokens: Count = Field(default=0, description="tokens trained through step")  # type: ignore[valid-type]


class LawBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    law: dict[str, float] = Field(description="the `law` object of `mixer plan spt --json`")



class PolicyBody(BaseModel):
    """The whole policy (fields left out take their defaults); see ``WatchPolicy``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    auto_apply: bool = Field(default=False, description="apply warned proposals within these limits")
    max_web_loss_increase: float = Field(default=0.01, ge=0, le=10, allow_inf_nan=False,
                                         description="web loss (nats) a proposal may cost at the final step")
    min_gain: float = Field(default=0.01, ge=0, le=10, allow_inf_nan=False,
                            description="auto-apply: least predicted final domain-loss gain (nats)")
    max_weight_change: float = Field(default=0.1, gt=0, le=1, allow_inf_nan=False,
                                     description="auto-apply: largest change of the source's weight")
    cooldown_evals: int = Field(default=6, ge=0, le=100_000,
                                description="auto-apply: evals after an automatic change before another")


# Errors

class Problem(BaseModel):
    """RFC 9457 problem details, as every error of this API is reported."""

    type: str = Field(default="about:blank")
    title: str
    status: int
    detail: str
    instance: str
    fault: str | None = Field(default=None, description="503 only: why the service is unavailable "
                              "(store_unavailable, overloaded, source_unavailable, corrupt_data, "
                              "job_missing, incarnation_changed, version_rollback, high_water_rollback, "
                              "chain_broken)")
