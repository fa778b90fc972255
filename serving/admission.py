"""Who gets in, and how much: API keys and per-client rate limits, checked before a request's body is read.

Both run as plain ASGI middleware, ahead of FastAPI's routing and body parsing, so a request without a valid key
or over its rate costs the server a header lookup, never a JSON parse (a dependency would run after the body is
parsed). Two classes of key: client keys (``PERSONA_API_KEYS``) open the ranking, session and event routes when
``PERSONA_REQUIRE_API_KEY`` is set; admin keys (``PERSONA_ADMIN_API_KEYS``) are the only ones the admin routes
accept (checked by :func:`serving.deps.require_admin`), and open everything else too. Keys are compared in
constant time and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from serving.problems import problem_response

#: Routes that stay open when every other route needs a key: liveness, for load balancers and supervisors.
OPEN_PATHS = frozenset({"/healthz"})
#: What ``PERSONA_OPEN_DOCS`` opens as well: the API's documentation (it describes routes, it serves no data).
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def header(scope: Scope, name: bytes) -> str | None:
    """One request header (latin-1, as HTTP/1.1 defines them), or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def presented_key(scope: Scope) -> str | None:
    """The key from ``X-API-Key`` or ``Authorization: Bearer <key>``."""
    key = header(scope, b"x-api-key")
    if key:
        return key
    scheme, _, value = (header(scope, b"authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def key_matches(presented: str, keys: Sequence[str]) -> bool:
    """Constant-time comparison against every configured key (no early exit that would leak which one)."""
    given = presented.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key.encode())
    return ok


def missing_key_hint() -> str:
    return "send it as `X-API-Key: <key>` or `Authorization: Bearer <key>`"


class ApiKeyMiddleware:
    """With ``PERSONA_REQUIRE_API_KEY``: every HTTP route but :data:`OPEN_PATHS` needs a client or admin key."""

    def __init__(self, app: ASGIApp, keys: Sequence[str], *, open_docs: bool = False) -> None:
        self.app = app
        self.keys = list(keys)
        self.open_paths = OPEN_PATHS | DOC_PATHS if open_docs else OPEN_PATHS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        key = presented_key(scope)
        if key is None:
            detail = f"missing API key; {missing_key_hint()}"
            response = problem_response(401, detail, instance=scope["path"], headers={"WWW-Authenticate": "Bearer"})
        elif not key_matches(key, self.keys):
            response = problem_response(403, "invalid API key", instance=scope["path"])
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


class TokenBuckets:
    """Per-client token buckets: ``rate`` requests a second, ``burst`` at once; the least recently seen forgotten.

    Memory is bounded by ``max_clients`` (an idle client's bucket is full again after ``burst / rate`` seconds, so
    forgetting it changes nothing it would notice).
    """

    def __init__(self, rate: float, burst: int, *, max_clients: int = 100_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1, got {rate} and {burst}")
        self.rate, self.burst, self.max_clients = rate, float(burst), max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str, now: float | None = None) -> float:
        """Take one token: 0.0 when allowed, else the seconds until a token is there (for ``Retry-After``)."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


def key_id(scope: Scope) -> str:
    """A short, stable id of the request's key for logs (a hash prefix: the key itself is never written), or -."""
    key = presented_key(scope)
    return "-" if key is None else hashlib.sha256(key.encode()).hexdigest()[:12]


def client_id(scope: Scope) -> str:
    """Who a request counts against: its key (hashed, so no key sits in memory twice), else its address."""
    key = presented_key(scope)
    if key is not None:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:32]
    client = scope.get("client")
    return f"addr:{client[0]}" if client else "addr:unknown"


class RateLimitMiddleware:
    """429 with ``Retry-After`` for a client over its rate; :data:`OPEN_PATHS` are never limited."""

    def __init__(self, app: ASGIApp, buckets: TokenBuckets) -> None:
        self.app = app
        self.buckets = buckets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        wait = self.buckets.take(client_id(scope))
        if wait == 0.0:
            await self.app(scope, receive, send)
            return
        retry = max(1, math.ceil(wait))
        response = problem_response(
            429,
            f"rate limit exceeded ({self.buckets.rate:g} requests/s per client); retry in {retry} s",
            instance=scope["path"],
            headers={"Retry-After": str(retry)},
        )
        await response(scope, receive, send)
