"""Every error leaves the API as ``application/problem+json`` (RFC 9457), never as an HTML page or a trace.

Mapping: bad input → 4xx with what was wrong (422 lists each field), a missing resource → 404, an unusable
model or store → 503 with ``Retry-After`` (a replica without a model is not ready, a store outage passes; the
load balancer or client should retry), anything unexpected → 500 whose body says nothing about internals.

Every failed request logs exactly one line: a WARNING for a 503 (an expected outage: no traceback), one
traceback for a 500 (:class:`UnhandledErrorMiddleware` answers it, so the server does not log it a second time).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from persona.store import StoreUnavailable
from recsys.errors import PersonaError
from serving.schemas import Problem

log = logging.getLogger("persona.serving")

PROBLEM_MEDIA_TYPE = "application/problem+json"
#: Seconds a client is asked to wait after a 503 (a store outage, a replica still loading its model).
RETRY_AFTER_S = 5


class ServingError(PersonaError):
    """A user-fixable problem with an HTTP status; raised by the business logic, shaped here."""

    status: int = 400

    def __init__(self, message: str, hint: str | None = None, *, errors: Sequence[dict[str, Any]] | None = None):
        super().__init__(message, hint)
        self.errors = list(errors) if errors is not None else None


class InvalidInput(ServingError):
    status = 422


class NotFound(ServingError):
    status = 404


class Conflict(ServingError):
    status = 409


class Forbidden(ServingError):
    status = 403


class Unauthorized(ServingError):
    status = 401


class PayloadTooLarge(ServingError):
    status = 413


class Overloaded(ServingError):
    """Load shed: more work is waiting than the process takes on; the client retries shortly (``Retry-After``)."""

    status = 503
    retry_after_s = 1


def problem_response(
    status: int,
    detail: str | None,
    *,
    instance: str | None = None,
    errors: Sequence[dict[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """Build the problem body; ``title`` is the standard reason phrase so clients can rely on it."""
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail is not None:
        body["detail"] = detail
    if instance is not None:
        body["instance"] = instance
    if errors is not None:
        body["errors"] = list(errors)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def _persona_status(exc: PersonaError) -> int:
    if isinstance(exc, ServingError):
        return exc.status
    # Library errors reaching a request mean the service cannot serve (no model, bad bundle, lost DB).
    return 503


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else None
    return problem_response(exc.status_code, detail, instance=request.url.path, headers=exc.headers)


def validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Each error's location, message and type; the offending input is left out (it may be huge)."""
    return [
        {
            "loc": [p if isinstance(p, int) else str(p) for p in err.get("loc", ())],
            "msg": str(err.get("msg", "")),
            "type": str(err.get("type", "")),
        }
        for err in exc.errors()
    ]


async def _validation_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = validation_errors(exc)
    first = errors[0] if errors else None
    where = ".".join(str(p) for p in first["loc"]) if first else "request"
    detail = f"{where}: {first['msg']}" if first else "invalid request"
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more)"
    return problem_response(422, detail, instance=request.url.path, errors=errors)


async def _persona_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PersonaError)
    status = _persona_status(exc)
    if status >= 500:
        log.warning("%s %s: %d %s", request.method, request.url.path, status, exc)
    errors = exc.errors if isinstance(exc, ServingError) else None
    headers: dict[str, str] | None = None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    elif isinstance(exc, Overloaded):
        headers = {"Retry-After": str(exc.retry_after_s)}
    elif status == 503:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
    # The store's own message names its server: that goes to the log, not to clients.
    detail = "the store is unavailable; retry later" if isinstance(exc, StoreUnavailable) else str(exc)
    return problem_response(status, detail, instance=request.url.path, errors=errors, headers=headers)


class UnhandledErrorMiddleware:
    """Answer an unexpected exception with a bare 500 problem and log its traceback once.

    Starlette hands a handler registered for ``Exception`` to its outermost middleware, which calls it and then
    re-raises so that the server logs the error again: two tracebacks per failure. Catching it here, inside that
    middleware, answers the request and ends it. Installed innermost, so the metrics still count the 500.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:  # else the client sees the connection end: nothing more can be said
                response = problem_response(500, "internal error; see the server log", instance=scope.get("path"))
                await response(scope, receive, send)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_exception)
    app.add_exception_handler(PersonaError, _persona_exception)
    app.add_middleware(UnhandledErrorMiddleware)  # before any other middleware: the innermost of them


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting problem bodies for these statuses."""
    return {
        s: {"model": Problem, "description": HTTPStatus(s).phrase, "content": {PROBLEM_MEDIA_TYPE: {}}}
        for s in statuses
    }
