"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.deps import Context, NotReady
from serving.problems import problem_responses
from serving.schemas import Health, Ready

router = APIRouter(tags=["health"])
#: ``/healthz``: liveness, never behind a key or a rate limit (``serving.admission.OPEN_PATHS``).
live_router = APIRouter(tags=["health"])


@live_router.get("/healthz", response_model=Health, summary="Liveness: the process answers (no I/O)")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Ready,
    summary="Readiness: the store answers and a model is loaded",
    responses=problem_responses(503),
)
def readyz(ctx: Context) -> Ready:
    try:
        ctx.store.active_model()
    except Exception as exc:  # any driver error means "not ready", never a 500
        raise NotReady(f"store unreachable: {type(exc).__name__}") from None
    version = ctx.models.version
    if version is None:
        raise NotReady("no active model", "register and activate one: `persona models activate VERSION`")
    return Ready(model_version=version)


@router.get(
    "/metrics",
    summary="Prometheus metrics of this replica",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}, "description": "Metrics"}},
)
def metrics(ctx: Context) -> Response:
    ctx.metrics.observe_model(ctx.models.version, ctx.models.reloads)
    return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)
