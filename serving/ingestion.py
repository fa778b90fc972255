"""``POST /v1/events``: the HTTP door into the one ingestion path (:class:`persona.ingest.Ingestor`).

Events are validated with :func:`persona.events.validate_event_dict`, the Kafka consumer's own rules, so the
two doors accept exactly the same events. A request is all or nothing: one invalid event refuses the whole
request (422 listing each bad event), so a client never has to work out which half was applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from persona.events import Event, Rejection, validate_event_dict
from persona.ingest import Ingestor
from serving.problems import InvalidInput
from serving.schemas import MAX_EVENTS


@dataclass(frozen=True, slots=True)
class IngestSummary:
    accepted: int
    applied: int
    duplicates: int
    unknown_items: int
    sessions: list[str]


def parse_events(body: Any) -> list[Event]:
    """One event object, or ``{"events": [...]}`` with 1..1000 events → validated events (or 422)."""
    batch = isinstance(body, dict) and "events" in body and "event_id" not in body
    raw = body["events"] if batch else [body]
    where = ["body", "events"] if batch else ["body"]
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_EVENTS:
        raise InvalidInput(
            f"'events' must be a list of 1..{MAX_EVENTS} events",
            errors=[{"loc": where, "msg": f"expected 1..{MAX_EVENTS} events", "type": "invalid_batch"}],
        )
    events: list[Event] = []
    errors: list[dict[str, Any]] = []
    for n, item in enumerate(raw):
        checked = validate_event_dict(item)
        if isinstance(checked, Rejection):
            loc = [*where, n] if batch else where
            errors.append({"loc": loc, "msg": checked.detail, "type": str(checked.reason)})
        else:
            events.append(checked)
    if errors:
        first = errors[0]
        index = f"event {first['loc'][-1]}: " if batch else ""
        raise InvalidInput(
            f"{len(errors)} invalid event(s); nothing was applied ({index}{first['msg']})", errors=errors
        )
    return events


def ingest(ingestor: Ingestor, body: Any) -> IngestSummary:
    """Validate and apply; state is committed before this returns (read-your-writes for the next ranking)."""
    events = parse_events(body)
    result = ingestor.apply(events, source="http")
    return IngestSummary(
        accepted=len(events),
        applied=result.applied,
        duplicates=result.duplicates,
        unknown_items=result.unknown_items + len(result.rejected),
        sessions=sorted({e.session_id for e in events}),
    )
