"""Model admin behind an API key: list versions, activate one, reload now."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path

from serving import registry
from serving.deps import Context, require_admin
from serving.problems import problem_responses
from serving.schemas import ModelInfo, ModelList, ReloadResponse

router = APIRouter(
    prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)], responses=problem_responses(401, 403)
)


@router.get("/models", response_model=ModelList, summary="Registered model versions")
def list_models(ctx: Context) -> ModelList:
    serving = ctx.models.version
    rows = registry.list_models(ctx.store)
    return ModelList(
        serving=serving,
        models=[
            ModelInfo(
                version=r.version,
                path=r.path,
                sha256=r.sha256,
                active=r.active,
                loaded=r.version == serving,
                created_at=r.created_at,
                metrics=r.metrics,
            )
            for r in rows
        ],
    )


@router.post(
    "/models/{version}/activate",
    response_model=ReloadResponse,
    summary="Activate a registered version (this replica swaps now, others within refresh_s)",
    responses=problem_responses(404, 422, 503),
)
def activate(version: Annotated[str, Path(min_length=1, max_length=64)], ctx: Context) -> ReloadResponse:
    swapped = registry.activate(ctx.store, ctx.models, version)
    ctx.metrics.observe_model(ctx.models.version, ctx.models.reloads)
    return ReloadResponse(swapped=swapped, version=ctx.models.version, reloads=ctx.models.reloads)


@router.post(
    "/models/reload",
    response_model=ReloadResponse,
    summary="Re-read the registry now",
    responses=problem_responses(503),
)
def reload(ctx: Context) -> ReloadResponse:
    swapped = registry.reload(ctx.models)
    ctx.metrics.observe_model(ctx.models.version, ctx.models.reloads)
    return ReloadResponse(swapped=swapped, version=ctx.models.version, reloads=ctx.models.reloads)
