"""Batches and provenance. No handler holds the event loop: a batch is made in one hop to a few threads of
its own (``ServiceLimits.batch_threads``: with the GIL, more threads making batches at once only convoy on
it and on the store's and cache's locks; throughput fell as connections were added); provenance runs in
FastAPI's bounded pool. A slow store or a large batch never delays health checks or other routes."""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import parse_qsl

import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from mixer_contract import wire
from mixer_contract.errors import MixerError
from mixer_contract.job import JOB_ID_PATTERN, JobConfig
from mixer_contract.values import RANK, STEP, STEPS, WORLD, RankSlice, check_step
from mixer_service.engine import MixingEngine
from mixer_service.service.auth import require_reader, role_of
from mixer_service.service.jobs import JobManager, SharedHeadRead
from mixer_service.service.problems import ProblemError, from_error, responses
from mixer_service.service.routes.deps import jobs
from mixer_service.service.routes.models import JobId, Rank, Step, Steps, World
from mixer_service.sources.prefetch import prefetch_ahead

router = APIRouter(prefix="/v1/jobs/{job_id}", tags=["batches"], dependencies=[Depends(require_reader)])


@router.get("/batches/{step}", response_class=Response,
            responses=responses(404, 413, ok={"content": {wire.MEDIA_TYPE: {}},
                                              "description": "docs/protocol.md"}))
async def get_batch(request: Request, job_id: JobId, step: Step, rank: Rank = 0, world: World = 1,
                    compression: Literal["none", "zstd"] = "none", boundaries: bool = False,
                    steps: Steps = 1) -> Response:
    return await serve_batch(request.app.state, job_id, step, rank, world, compression, boundaries, steps)


async def serve_batch(state: Any, job_id: str, step: int, rank: int, world: int, compression: str,
                      boundaries: bool, steps: int = 1) -> Response:
    """One batch response (``steps`` framed batches back to back), made in one hop to the batch threads;
    the route and ``BatchFastPath`` share it. The request joins its job's shared head read on arrival,
    before it waits for a thread."""
    no_head_read = "head_read" in state.unsafe_off
    group = None if no_head_read else state.jobs.admit(job_id, step, rank, world,
                                                        state.limits.max_request_tokens, steps)
    try:
        body, tokens = await anyio.to_thread.run_sync(
            make_batch, state.jobs, state.limits.max_request_tokens, state.prefetched, job_id, step, rank,
            world, compression, boundaries, no_head_read, group, steps,
            limiter=getattr(state, "batch_limiter", None))
    except BaseException:
        if group is not None:  # never reached a thread (cancelled while queued): its steps are not served
            state.jobs.leave(job_id, group, step + steps - 1)
        raise
    metrics = state.metrics
    metrics.batches.labels(job_id).inc(steps)
    for name, count in tokens:
        metrics.tokens.labels(job_id, name).inc(count)
    return Response(body, media_type=wire.MEDIA_TYPE)


class BatchFastPath:
    """The batch route without the framework's per-request machinery (routing, dependency solving,
    parameter models: ~0.6 ms of CPU a request, as much as making the batch). It answers only requests
    whose every parameter is in the one canonical form the route accepts (what ``client/http.py`` sends),
    with the route's own checks and responses; anything else -- a bad or unusual parameter, a missing or
    wrong token -- goes on to the route, which answers it exactly as before. Sits below the limits and
    metrics middlewares, so those still apply; the route template is set for the metrics' labels."""

    _PATH = re.compile(r"/v1/jobs/([^/]+)/batches/(0|[1-9][0-9]{0,17})")
    _INT = re.compile(r"0|[1-9][0-9]{0,17}")
    _BOOL = {"true": True, "false": False, "1": True, "0": False}

    def __init__(self, app: ASGIApp, api: FastAPI) -> None:
        self.app, self.api = app, api
        self.route = next(r for r in router.routes if getattr(r, "endpoint", None) is get_batch)

    def _parse(self, scope: Scope) -> tuple[str, int, int, int, str, bool, int] | None:
        """The route's parameters when they are all canonical and in range, else None (the route decides)."""
        if scope["type"] != "http" or scope["method"] != "GET":
            return None
        found = self._PATH.fullmatch(scope["path"])
        if found is None or not JOB_ID_PATTERN.fullmatch(found[1]):
            return None
        query = dict(rank="0", world="1", compression="none", boundaries="false", steps="1")
        pairs = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        given = dict(pairs)
        if len(given) != len(pairs) or not given.keys() <= query.keys():
            return None
        query.update(given)
        if not all(self._INT.fullmatch(query[name]) for name in ("rank", "world", "steps")) \
                or query["compression"] not in ("none", "zstd") or query["boundaries"] not in self._BOOL:
            return None
        step, rank, world, steps = int(found[2]), int(query["rank"]), int(query["world"]), int(query["steps"])
        if not (STEP.low <= step <= STEP.high and RANK.low <= rank <= RANK.high
                and WORLD.low <= world <= WORLD.high and STEPS.low <= steps <= STEPS.high):
            return None
        return found[1], step, rank, world, query["compression"], self._BOOL[query["boundaries"]], steps

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = self._parse(scope)
        if params is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        state = self.api.state
        if state.tokens.enabled:
            try:
                role_of(request, state.tokens)
            except ProblemError:
                await self.app(scope, receive, send)  # the route answers 401 as it always has
                return
        scope["route"] = self.route
        try:
            response = await serve_batch(state, *params)
        except MixerError as exc:
            response = from_error(request, exc)
        await response(scope, receive, send)


PREFETCH_STEPS = 2  # steps ahead of the one asked for whose shards are loaded before they are asked for...
PREFETCH_TOKENS = 1 << 22  # ...or more steps, until they hold this many tokens: a shard's build (0.1-0.3 s
# from S3) then overlaps serving ~4M tokens, which at full speed is what hides it (docs/scale.md)
PREFETCH_MAX_STEPS = 128  # below the engine's 256 remembered steps: those planned ahead are still there


def prefetch_horizon(config: JobConfig) -> int:
    """How many steps ahead of a request the shards are loaded: ``PREFETCH_STEPS``, more for small steps."""
    step_tokens = config.global_batch * config.seq_len
    return min(PREFETCH_MAX_STEPS, max(PREFETCH_STEPS, -(-PREFETCH_TOKENS // step_tokens)))


def prefetch_new_steps(engine: MixingEngine, prefetched: dict[tuple[str, str], int], key: tuple[str, str],
                       step: int) -> None:
    """The schedule makes the future known: start loading the shards of steps up to ``step +
    prefetch_horizon`` that no earlier request of ``key`` (job, incarnation) asked for. Each step's shards
    are worked out once (the whole step: ranks usually come to every replica), not once per step that looks
    ahead to it; ``prefetched`` keeps the highest step asked for."""
    first, last = max(prefetched.get(key, -1), step) + 1, step + prefetch_horizon(engine.config)
    if first <= last:
        prefetched[key] = last
        prefetch_ahead(engine, first - 1, lookahead=last - first + 1)


def make_batch(manager: JobManager, max_tokens: int, prefetched: dict[tuple[str, str], int], job_id: str,
               step: int, rank: int, world: int, compression: str, boundaries: bool,
               no_head_read: bool = False, group: SharedHeadRead | None = None,
               steps: int = 1) -> tuple[bytes, list[tuple[str, int]]]:
    """The response body of one batch request -- ``steps`` framed batches from ``step``, the last of them
    marked served first -- and the tokens it carries per source. ``prefetched``: (job, incarnation) -> the
    highest step whose successors were prefetched. ``group``: the shared head read the request joined on
    arrival (``JobManager.admit``). ``no_head_read`` (benchmarks only, ``app.unsafe_switches``): the
    runtime this process holds, unproven."""
    if no_head_read and (held := manager._jobs.get(job_id)) is not None:
        check_step(step + steps - 1, held.config.total_steps)
        runtime, ranks = held, RankSlice.of(rank, world, held.config.global_batch)
    else:
        # Marking the last step served fixes every step up to it: a schedule change committed later takes
        # effect after it, so the runtime of this head plans all of them.
        view, ranks = manager.serve(job_id, step, rank, world, max_tokens, group, steps)
        runtime = view.runtime
    config = runtime.config
    engine = runtime.engine
    names = config.source_names
    bodies, counts = [], np.zeros(len(names), dtype=np.int64)
    for at in range(step, step + steps):
        batch = engine.batch(at, ranks.rank, ranks.world)
        header = {"job": job_id, "incarnation": runtime.incarnation, "step": at, "rank": ranks.rank,
                  "world": ranks.world, "sources": names, "schedule_version": engine.version_at(at),
                  **runtime.log_pin(at)}
        starts = engine.row_boundaries(at, ranks.rank, ranks.world) if boundaries else None
        bodies.append(wire.encode(batch.tokens, batch.source_ids, header, compression, boundaries=starts))
        counts += np.bincount(batch.source_ids, minlength=len(names))
    # once, from the last step: the request's own steps were just read, so their shards are in
    prefetch_new_steps(engine, prefetched, (job_id, runtime.incarnation), step + steps - 1)
    body = bodies[0] if steps == 1 else b"".join(bodies)
    return body, [(name, int(n) * config.seq_len) for name, n in zip(names, counts, strict=True) if n]


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
