"""Batches and provenance. Handlers are plain ``def``: FastAPI runs them in its bounded thread pool, so a
slow store or a large batch never holds the event loop (health checks and other jobs keep answering)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response

from mixer_service import wire
from mixer_service.service.auth import require_reader
from mixer_service.service.jobs import JobManager
from mixer_service.service.problems import responses
from mixer_service.service.routes.deps import jobs
from mixer_service.service.routes.models import JobId
from mixer_service.sources.prefetch import prefetch_ahead
from mixer_service.values import Rank, Step, World, check_step

router = APIRouter(prefix="/v1/jobs/{job_id}", tags=["batches"], dependencies=[Depends(require_reader)])


@router.get("/batches/{step}", response_class=Response,
            responses=responses(404, 413, ok={"content": {wire.MEDIA_TYPE: {}},
                                              "description": "docs/protocol.md"}))
def get_batch(request: Request, job_id: JobId, step: Step, rank: Rank = 0, world: World = 1,
              compression: Literal["none", "zstd"] = "none", boundaries: bool = False,
              manager: JobManager = Depends(jobs)) -> Response:
    view, ranks = manager.serve(job_id, step, rank, world, request.app.state.limits.max_request_tokens)
    runtime = view.runtime
    config = runtime.config
    batch = runtime.engine.batch(step, ranks.rank, ranks.world)
    # The schedule makes the future known: load the shards this rank's next steps read before it asks.
    prefetch_ahead(runtime.engine, step, ranks.rank, ranks.world)
    names = config.source_names
    header = {"job": job_id, "incarnation": runtime.incarnation, "step": step, "rank": ranks.rank,
              "world": ranks.world, "sources": names, "schedule_version": runtime.engine.version_at(step),
              "log_chain": runtime.log_chain_at(step)}
    starts = runtime.engine.row_boundaries(step, ranks.rank, ranks.world) if boundaries else None
    body = wire.encode(batch.tokens, batch.source_ids, header, compression, boundaries=starts)
    metrics = request.app.state.metrics
    metrics.batches.labels(job_id).inc()
    rows = batch.source_ids.tolist()
    for k, name in enumerate(names):
        if count := rows.count(k):
            metrics.tokens.labels(job_id, name).inc(count * config.seq_len)
    return Response(body, media_type=wire.MEDIA_TYPE)


@router.get("/provenance/{step}", responses=responses(404))
def get_provenance(job_id: JobId, step: Step, rank: Rank = 0, world: World = 1,
                   manager: JobManager = Depends(jobs)) -> dict[str, Any]:
    """Which document spans make up each sequence of a step (an audit trail; does not mark it served)."""
    runtime = manager.view(job_id).runtime
    check_step(step, runtime.config.total_steps)
    rows = runtime.engine.provenance(step, rank, world)
    return {"job": job_id, "incarnation": runtime.incarnation, "step": step, "rank": rank, "world": world,
            "schedule_version": runtime.engine.version_at(step), "sequences": [
                {"source": r.source, "seq_id": r.seq_id,
                 "spans": [{"doc": s.doc, "offset": s.offset, "length": s.length} for s in r.spans]}
                for r in rows]}
