from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response

from mixer_service import wire
from mixer_service.service.auth import require_reader
from mixer_service.service.jobs import JobManager
from mixer_service.service.routes.deps import jobs

router = APIRouter(prefix="/v1/jobs/{job_id}", tags=["batches"], dependencies=[Depends(require_reader)])


@router.get("/batches/{step}", response_class=Response,
            responses={200: {"content": {wire.MEDIA_TYPE: {}}, "description": "docs/protocol.md"}})
async def get_batch(request: Request, job_id: str, step: int, rank: int = 0, world: int = 1,
              compression: Literal["none", "zstd"] = "none", manager: JobManager = Depends(jobs)) -> Response:
    runtime, engine = manager.for_step(job_id, step, rank, world)
    batch = engine.batch(step, rank, world)
    names = runtime.config.source_names
    header = {"job": job_id, "step": step, "rank": rank, "world": world, "sources": names,
              "schedule_version": engine.version_at(step)}
    body = wire.encode(batch.tokens, batch.source_ids, header, compression)
    metrics = request.app.state.metrics
    metrics.batches.labels(job_id).inc()
    counts = batch.source_ids.tolist()
    for k, name in enumerate(names):
        rows = counts.count(k)
        if rows:
            metrics.tokens.labels(job_id, name).inc(rows * runtime.config.seq_len)
    return Response(body, media_type=wire.MEDIA_TYPE)


@router.get("/provenance/{step}")
def get_provenance(job_id: str, step: int, rank: int = 0, world: int = 1,
                   manager: JobManager = Depends(jobs)) -> dict[str, Any]:
    """Which document spans make up each sequence of a step (an audit trail; does not mark it served)."""
    runtime = manager.get(job_id)
    rows = runtime.engine.provenance(step, rank, world)
    return {"job": job_id, "step": step, "rank": rank, "world": world, "sequences": [
        {"source": r.source, "seq_id": r.seq_id,
         "spans": [{"doc": s.doc, "offset": s.offset, "length": s.length} for s in r.spans]} for r in rows]}
