"""``POST /v1/events``: HTTP ingestion for clients without Kafka."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body

from serving.deps import Context
from serving.ingestion import ingest
from serving.problems import problem_responses
from serving.schemas import IngestResponse

router = APIRouter(tags=["events"])

_EVENT = {
    "event_id": "9f0c2d4e",
    "session_id": "s-42",
    "device_id": "phone-7",
    "user_id": "u-1",
    "item_id": "1193",
    "type": "click",
    "ts": "2026-11-23T10:00:00Z",
}


@router.post(
    "/v1/events",
    response_model=IngestResponse,
    summary="Ingest events over HTTP (same validation and path as Kafka)",
    description=(
        "Body: one event (the Kafka JSON: `event_id`, `session_id`, `item_id`, `ts` required; `type`, "
        '`user_id`, `device_id` optional; other fields kept as attributes) or `{"events": [...]}` with up '
        "to 1000. All or nothing: any invalid event → 422 listing each one's index, reason and detail. "
        "Duplicates (same `event_id`) are accepted and have no effect. State is committed before the reply."
    ),
    responses=problem_responses(401, 403, 413, 422, 503),
)
def post_events(
    ctx: Context,
    body: Annotated[
        dict[str, Any],
        Body(
            openapi_examples={
                "one": {"summary": "One event", "value": _EVENT},
                "batch": {"summary": "A batch", "value": {"events": [_EVENT]}},
            }
        ),
    ],
) -> IngestResponse:
    s = ingest(ctx.ingestor, body)
    return IngestResponse(
        accepted=s.accepted,
        applied=s.applied,
        duplicates=s.duplicates,
        unknown_items=s.unknown_items,
        sessions=s.sessions,
    )
