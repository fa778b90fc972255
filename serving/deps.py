"""Request dependencies: the per-app context (store, models, ranker, metrics) and the admin-key check.

Everything a route needs arrives through here, so routes stay thin and tests can build an app around any
store and model provider (``create_app(store=..., models=...)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from persona.ingest import Ingestor
from persona.models import ModelProvider
from persona.settings import Settings
from persona.store import Store
from serving.admission import key_matches, missing_key_hint, presented_key
from serving.batching import RankBatcher
from serving.metrics import ServingMetrics
from serving.problems import Forbidden, ServingError, Unauthorized
from serving.ranking import Ranker


class NotReady(ServingError):
    status = 503


@dataclass
class ServingContext:
    """What one app instance serves with; built by the lifespan (or eagerly when handed a store and models)."""

    settings: Settings
    store: Store
    models: ModelProvider
    ranker: Ranker
    ingestor: Ingestor
    metrics: ServingMetrics
    batcher: RankBatcher


# The dependencies are ``async def`` on purpose: they do no I/O, and FastAPI runs every sync dependency in the
# threadpool, one thread hop each (measured: three hops cost more than a whole ranking).
async def get_context(request: Request) -> ServingContext:
    ctx: ServingContext | None = getattr(request.app.state, "ctx", None)
    if ctx is None:
        raise NotReady("the service is starting", "retry in a moment")
    return ctx


Context = Annotated[ServingContext, Depends(get_context)]


async def require_admin(request: Request, ctx: Context) -> None:
    """Admin routes take admin keys only (``PERSONA_ADMIN_API_KEYS``); with none configured the admin API is off."""
    settings = ctx.settings
    if not settings.admin_api_keys:
        raise Forbidden("admin API disabled: set PERSONA_ADMIN_API_KEYS")
    key = presented_key(request.scope)
    if key is None:
        raise Unauthorized("missing API key", missing_key_hint())
    if not key_matches(key, settings.admin_api_keys):
        if key_matches(key, settings.api_keys):
            raise Forbidden("this client key may not use admin routes", "use a key from PERSONA_ADMIN_API_KEYS")
        raise Forbidden("invalid API key")
