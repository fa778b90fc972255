"""Request dependencies: the per-app context (store, models, ranker, metrics) and API-key checks.

Everything a route needs arrives through here, so routes stay thin and tests can build an app around any
store and model provider (``create_app(store=..., models=...)``).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from persona.ingest import Ingestor
from persona.models import ModelProvider
from persona.settings import Settings
from persona.store import Store
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


def presented_key(request: Request) -> str | None:
    """The key from ``X-API-Key`` or ``Authorization: Bearer <key>``; never logged anywhere."""
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def key_matches(presented: str, keys: list[str]) -> bool:
    """Constant-time comparison against every configured key (no early exit that would leak which one)."""
    given = presented.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key.encode())
    return ok


def _check_key(request: Request, settings: Settings) -> None:
    if not settings.api_keys:
        raise Forbidden("admin API disabled: set PERSONA_API_KEYS")
    key = presented_key(request)
    if key is None:
        raise Unauthorized("missing API key", "send it as `X-API-Key: <key>` or `Authorization: Bearer <key>`")
    if not key_matches(key, settings.api_keys):
        raise Forbidden("invalid API key")


async def require_admin(request: Request, ctx: Context) -> None:
    """Admin routes always need a key; with no key configured the admin API is off (403)."""
    _check_key(request, ctx.settings)


async def require_key_if_configured(request: Request, ctx: Context) -> None:
    """With ``require_api_key`` every route but ``/healthz`` needs a key."""
    if ctx.settings.require_api_key:
        _check_key(request, ctx.settings)
