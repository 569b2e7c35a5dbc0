from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query, Request, Response

from mixer_contract import wire
from mixer_contract.values import SEED
from mixer_service.engine.samples import sample_indices
from mixer_service.service.auth import require_reader
from mixer_service.service.problems import responses
from mixer_service.service.routes.models import Rank, Step, World, bounded

router = APIRouter(prefix="/v1/images", tags=["images"], dependencies=[Depends(require_reader)])


@router.get("/{source}/batches/{step}", response_class=Response,
            responses=responses(404, ok={"content": {wire.MEDIA_TYPE: {}},
                                         "description": "docs/protocol.md (samples)"}))
def get_image_batch(request: Request, source: str, step: Step, batch_size: int = Query(ge=1, le=65536),
                    seed: bounded(SEED) = 0, rank: Rank = 0, world: World = 1,  # type: ignore[valid-type]
                    compression: Literal["none", "zstd"] = "none") -> Response:
    """Encoded images (JPEG/PNG as stored: the storage budget is what the trainer decodes) and labels."""
    images = request.app.state.jobs.sources.image(source)
    ids = sample_indices(len(images), source, seed, step, batch_size, rank, world)
    samples = [images.sample(i) for i in ids.tolist()]
    header = {"source": source, "step": step, "rank": rank, "world": world, "batch_size": batch_size,
              "seed": seed, "sample_ids": ids.tolist(), "image_shape": list(images.meta.image_shape)}
    body = wire.encode_samples([s[0] for s in samples], [s[1] for s in samples], header, compression)
    return Response(body, media_type=wire.MEDIA_TYPE)
