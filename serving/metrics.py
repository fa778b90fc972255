"""The API's Prometheus metrics, on a registry of its own (one per app, so tests can build many apps).

Labels stay bounded: ``route`` is the route *template* (``/v1/sessions/{session_id}/recommendations``),
never the raw path, and nothing is labelled per session or user (DESIGN.md "Metrics").
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.admission import key_id

#: ``PERSONA_ACCESS_LOG``: one line per request (method, route template, status, latency, key id).
access = logging.getLogger("persona.access")

#: Millisecond-range buckets: the ranking target is p99 ≤ 10 ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
UNMATCHED = "unmatched"


class ServingMetrics:
    """Request latency and counts, fallbacks, and which model is live."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.request_seconds = Histogram(
            "persona_request_seconds",
            "Request latency by route template.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "persona_requests",
            "Requests by route template and HTTP status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "persona_fallbacks",
            "Rankings that did not use the session's own edit, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.model_info = Gauge(
            "persona_model_info", "1 for the model version this replica serves.", ["version"], registry=self.registry
        )
        self.model_reloads = Counter(
            "persona_model_reloads", "Model versions swapped in without restart.", registry=self.registry
        )
        self.rank_batch_size = Histogram(
            "persona_rank_batch_size",
            "Ranking requests served by one batched forward (micro-batching of concurrent requests).",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.shed = Counter(
            "persona_rank_shed",
            "Ranking requests refused with 503 because the process's queue was full (load shedding).",
            registry=self.registry,
        )
        self._version: str | None = None
        self._reloads_seen = 0

    def observe_model(self, version: str | None, reloads: int) -> None:
        """Sync the model gauges with the provider (cheap; called on scrape and on admin actions)."""
        if version != self._version:
            if self._version is not None:
                self.model_info.remove(self._version)
            if version is not None:
                self.model_info.labels(version=version).set(1)
            self._version = version
        if reloads > self._reloads_seen:
            self.model_reloads.inc(reloads - self._reloads_seen)
            self._reloads_seen = reloads


class MetricsMiddleware:
    """Pure ASGI middleware (no per-request task like ``BaseHTTPMiddleware``): times every HTTP request."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics, *, access_log: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = _route_template(scope)
            seconds = time.perf_counter() - start
            self.metrics.request_seconds.labels(route=route).observe(seconds)
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            if self.access_log:  # the route template, never the path: ids and payloads stay out of the log
                access.info("%s %s %d %.1fms key=%s", scope["method"], route, status, seconds * 1e3, key_id(scope))


def _route_template(scope: Scope) -> str:
    route: Any = scope.get("route")  # set by FastAPI's router once a route matched
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED
