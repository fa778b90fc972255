"""Every error leaves the API as ``application/problem+json`` (RFC 9457), never as an HTML page or a trace.

Mapping: bad input → 4xx with what was wrong (422 lists each field), a missing resource → 404, an unusable
model or store → 503 (a replica without a model is not ready; the load balancer should retry elsewhere),
anything unexpected → 500 whose body says nothing about internals (the trace goes to the log only).
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

from recsys.errors import PersonaError
from serving.schemas import Problem

log = logging.getLogger("persona.serving")

PROBLEM_MEDIA_TYPE = "application/problem+json"


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
        log.warning("%s %s: %s", request.method, request.url.path, exc)
    errors = exc.errors if isinstance(exc, ServingError) else None
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if isinstance(exc, Overloaded):
        headers = {"Retry-After": str(exc.retry_after_s)}
    return problem_response(status, str(exc), instance=request.url.path, errors=errors, headers=headers)


async def _unexpected_exception(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(500, "internal error; see the server log", instance=request.url.path)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_exception)
    app.add_exception_handler(PersonaError, _persona_exception)
    app.add_exception_handler(Exception, _unexpected_exception)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting problem bodies for these statuses."""
    return {
        s: {"model": Problem, "description": HTTPStatus(s).phrase, "content": {PROBLEM_MEDIA_TYPE: {}}}
        for s in statuses
    }
