"""The FastAPI application: ``create_app()`` wires settings, store, model provider, routes and errors.

``uvicorn serving.app:create_server_app --factory`` (what ``persona serve`` runs) builds everything from
``PERSONA_*`` settings in the lifespan: open the store (migrating it), load the active model (registering
``PERSONA_MODEL_DIR`` first if set) and start the background refresh that hot-swaps a newly activated
version. Tests hand in their own store and provider instead.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

import torch
from fastapi import FastAPI

from persona.ingest import Ingestor
from persona.models import ModelProvider
from persona.settings import Settings, load_settings
from persona.store import Store
from serving import problems
from serving.admission import DOC_PATHS, OPEN_PATHS, ApiKeyMiddleware, RateLimitMiddleware, TokenBuckets
from serving.batching import RankBatcher
from serving.deps import ServingContext
from serving.limits import BodyLimitMiddleware
from serving.metrics import MetricsMiddleware, ServingMetrics
from serving.problems import PROBLEM_MEDIA_TYPE
from serving.ranking import Ranker
from serving.routes import admin, device, events, health, recommendations, sessions
from serving.schemas import MAX_BODY_BYTES, MAX_EVENTS, EventDoc

log = logging.getLogger("persona.serving")

API_DESCRIPTION = """Real-time recommendations with per-session parameter edits (Persona).

Every ranking reports the model version, prototype, edit version and fallback it used. Errors are
`application/problem+json` (RFC 9457); bad input is always 4xx. Admin routes need an API key
(`X-API-Key` or `Authorization: Bearer`)."""


def _context(settings: Settings, store: Store, models: ModelProvider, metrics: ServingMetrics) -> ServingContext:
    ranker = Ranker(store, models, on_fallback=lambda reason: metrics.fallbacks.labels(reason=reason).inc())
    ingestor = Ingestor(
        store,
        models,
        unknown_item_policy=settings.unknown_item_policy,
        prototype_idle_s=settings.prototype_idle_s,
        session_cache=settings.session_cache,
    )
    batcher = RankBatcher(
        ranker,
        max_batch=settings.rank_max_batch,
        workers=settings.rank_workers,
        max_pending=settings.rank_max_pending,
        on_batch=metrics.rank_batch_size.observe,
        on_shed=metrics.shed.inc,
    )
    return ServingContext(settings, store, models, ranker, ingestor, metrics, batcher)


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    models: ModelProvider | None = None,
    refresh_s: float = 5.0,
    torch_threads: int | None = None,
) -> FastAPI:
    """Build the API. A ``store``/``models`` passed in is used as is; the app opens (and closes) the rest.

    The provider's background refresh runs for the app's lifetime either way (that is what makes
    ``persona models activate`` reach a running API).

    ``torch_threads`` caps torch's intra-op threads (process-wide, so only the server factory sets it): a
    ranking is one small forward and the parallelism comes from concurrent requests in the threadpool;
    letting each also fan out over all cores oversubscribes the CPU (measured: 63 ms → 6.6 ms per ranking
    on a loaded 2-core machine).
    ``None`` (the default, for tests and embedding) leaves torch's setting alone.
    """
    settings = settings or load_settings()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    metrics = ServingMetrics()
    if models is not None and store is None:
        store = models.store

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned_store = None
        ctx: ServingContext | None = getattr(app.state, "ctx", None)
        if ctx is None:
            opened = store
            if opened is None:
                opened = owned_store = Store.open(settings.resolved_database_url)
            provider = models or ModelProvider(opened, model_dir=settings.model_dir, refresh_s=refresh_s)
            ctx = app.state.ctx = _context(settings, opened, provider, metrics)
        ctx.models.start()
        metrics.observe_model(ctx.models.version, ctx.models.reloads)
        log.info("serving model %s", ctx.models.version or "(none yet)")
        try:
            yield
        finally:
            ctx.batcher.close()
            ctx.models.stop()
            if owned_store is not None:
                owned_store.close()
                app.state.ctx = None

    app = FastAPI(
        title="Persona API",
        version="1",
        description=API_DESCRIPTION,
        lifespan=lifespan,
        # Enforced here as well as in the schema, so documented and actual behaviour agree.
        separate_input_output_schemas=False,
    )
    if store is not None and models is not None:
        app.state.ctx = _context(settings, store, models, metrics)  # usable without running the lifespan

    problems.install(app)  # first: its middleware must be the innermost
    routers = (health.live_router, health.router, recommendations.router, sessions.router, events.router, device.router)
    for router in routers:
        app.include_router(router)
    app.include_router(admin.router)
    # Middleware runs outermost-last-added: metrics, then rate limit, then key, then the body limit, so a request
    # is counted, then admitted (rate, key) from its headers alone before a byte of its body is read. Each is only
    # wired in when configured: a layer that does nothing still costs every request a call.
    app.add_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES)
    if settings.require_api_key:
        keys = [*settings.api_keys, *settings.admin_api_keys]
        app.add_middleware(ApiKeyMiddleware, keys=keys, open_docs=settings.open_docs)
    if settings.rate_limit_per_s > 0:
        app.add_middleware(
            RateLimitMiddleware, buckets=TokenBuckets(settings.rate_limit_per_s, settings.rate_limit_burst)
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics, access_log=settings.access_log)
    open_paths = OPEN_PATHS | DOC_PATHS if settings.open_docs else OPEN_PATHS
    limited = settings.rate_limit_per_s > 0
    app.openapi = lambda: _openapi(  # type: ignore[method-assign]
        app, keyed=settings.require_api_key, open_paths=open_paths, limited=limited
    )
    return app


def create_server_app() -> FastAPI:
    """The factory ``persona serve`` and the benchmark run under uvicorn: settings from the environment,
    one torch thread per request (see :func:`create_app`)."""
    return create_app(torch_threads=1)


def _document_event_body(schema: dict[str, Any], components: dict[str, Any]) -> None:
    """``POST /v1/events`` reads its body as plain JSON (so that it is validated exactly as Kafka's messages are);
    the document still says what that JSON is: one event, or ``{"events": [...]}``."""
    operation = schema.get("paths", {}).get("/v1/events", {}).get("post")
    if operation is None:
        return
    components["Event"] = EventDoc.model_json_schema(ref_template="#/components/schemas/{model}")
    components["EventBatch"] = {
        "title": "EventBatch",
        "type": "object",
        "properties": {
            "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}, "minItems": 1,
                       "maxItems": MAX_EVENTS}
        },
        "required": ["events"],
        "additionalProperties": False,
    }  # fmt: skip
    body = operation.setdefault("requestBody", {}).setdefault("content", {}).setdefault("application/json", {})
    body["schema"] = {"oneOf": [{"$ref": "#/components/schemas/Event"}, {"$ref": "#/components/schemas/EventBatch"}]}


SECURITY_SCHEMES = {
    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "Bearer": {"type": "http", "scheme": "bearer"},
}
EITHER_KEY: list[dict[str, list[str]]] = [{"ApiKey": []}, {"Bearer": []}]


def _openapi(
    app: FastAPI, *, keyed: bool, open_paths: frozenset[str] = OPEN_PATHS, limited: bool = False
) -> dict[str, Any]:
    """FastAPI's schema with every error response documented as ``application/problem+json`` Problem, and the key
    schemes each operation takes (admin routes always; every route but ``/healthz`` when ``keyed``) with the 401 and
    403 the key check answers, and the 429 of the rate limit when ``limited``.

    FastAPI adds its own 422 (``HTTPValidationError``) to every route with parameters; ours replace it, because
    that is what the handlers in :mod:`serving.problems` actually send.
    """
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    problem_ref = {"$ref": "#/components/schemas/Problem"}
    for path, path_item in schema.get("paths", {}).items():
        for operation in path_item.values():
            responses = operation.setdefault("responses", {})
            if path.startswith("/v1/admin/") or (keyed and path not in open_paths):
                operation["security"] = EITHER_KEY
                # what the key check answers, on every route behind it (/readyz and /metrics too)
                for code in ("401", "403"):
                    responses.setdefault(code, {"description": HTTPStatus(int(code)).phrase})
            if limited and path not in OPEN_PATHS:
                responses.setdefault("429", {"description": HTTPStatus.TOO_MANY_REQUESTS.phrase})
            for code, response in responses.items():
                if code.isdigit() and int(code) >= 400:
                    response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": problem_ref}}
            if "422" in responses:
                responses["422"]["description"] = "Invalid input (each field or event listed in `errors`)"
            responses.setdefault(
                "500", {"description": "Internal error", "content": {PROBLEM_MEDIA_TYPE: {"schema": problem_ref}}}
            )
    schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    components = schema["components"].setdefault("schemas", {})
    _document_event_body(schema, components)
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    app.openapi_schema = schema
    return schema
