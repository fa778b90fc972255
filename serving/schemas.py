"""Request and response bodies of the serving API (v1).

Limits live here, on the fields, so FastAPI enforces them before any model or store work runs and the
OpenAPI document shows them to clients. The few limits that depend on the live model (history length
relative to ``max_len``) are checked in :mod:`serving.ranking`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_ID_LEN = 128
MAX_K = 1000
DEFAULT_K = 10
MAX_RECENT = 1000
MAX_CANDIDATES = 10_000
MAX_BATCH = 256
MAX_EVENTS = 1000
#: Request bodies above this are refused with 413 before they are parsed.
MAX_BODY_BYTES = 1 << 20

ItemId = Annotated[str, Field(min_length=1, max_length=MAX_ID_LEN, description="An item id of the catalogue.")]
SessionId = Annotated[
    str, Field(min_length=1, max_length=MAX_ID_LEN, description="Client-chosen opaque session id.", examples=["s-42"])
]
Fallback = Literal["prototype", "popularity", "base"]

FALLBACK_DOC = (
    "Why the ranking is not the session's own edit: null = the session's edit (stored, or computed from its "
    "items in this request); 'prototype' = the stored code did not fit the model, so the edit of its prototype "
    "alone was used; 'base' = the items are known but no edit could be built (empty prototype bank), so the "
    "unedited device model ranked; 'popularity' = no known item at all (cold start), so the most popular "
    "training items are returned."
)


class Strict(BaseModel):
    """Request bodies refuse unknown fields (a misspelt ``exclude_seen`` must not silently do nothing) and take the
    types they declare as they are: ``"k": "10"`` or ``"exclude_seen": 0`` are 422, not quietly converted."""

    model_config = ConfigDict(extra="forbid", strict=True)


FIELDS_DOC = (
    "Item attributes to return beside each item's title, e.g. year,genres for MovieLens-100K: the model's "
    "catalogue must have them (a 422 lists the ones it has)."
)
MAX_FIELDS = 32


class RankedItem(BaseModel):
    """A ranked item; with ``fields`` requested, each requested attribute is one more key (e.g. ``year``)."""

    item_id: str = Field(description="The item id.", examples=["50"])
    score: float = Field(description="Model score (higher is better); for popularity, the training count.")
    rank: int = Field(ge=1, description="1-based position in the ranking.")
    title: str | None = Field(
        default=None,
        description="The item's title when the model's catalogue has item metadata; null otherwise.",
        examples=["Star Wars"],
    )

    model_config = ConfigDict(extra="allow")


def parse_fields(raw: str | None) -> tuple[str, ...]:
    """``?fields=year,genres`` → ``("year", "genres")``: comma separated, blanks dropped, duplicates once."""
    if not raw:
        return ()
    return tuple(dict.fromkeys(f.strip() for f in raw.split(",") if f.strip()))


class Recommendations(BaseModel):
    """One ranking with everything needed to trace it to a model, a prototype and an edit."""

    session_id: str | None = Field(description="The session ranked for; null for a stateless request.")
    items: list[RankedItem] = Field(description="Best first; fewer than k when fewer items are rankable.")
    model_version: str = Field(description="The model version that ranked.", examples=["20261124T071200Z-1a2b3c4d"])
    prototype_id: int | None = Field(description="The prototype whose edit was applied; null without an edit.")
    edit_version: int = Field(description="The stored session's edit version (0 for stateless requests).")
    fallback: Fallback | None = Field(description=FALLBACK_DOC)
    known_session: bool = Field(description="False when the session id has no stored state (cold start).")
    unknown_items_ignored: list[str] = Field(
        default_factory=list, description="Items of ``recent_items`` the model does not know (skipped)."
    )
    unknown_candidates: list[str] = Field(
        default_factory=list, description="Items of ``candidates`` the model does not know (never ranked)."
    )

    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "session_id": "s-42",
                    "items": [
                        {"item_id": "50", "score": 7.1, "rank": 1, "title": "Star Wars"},
                        {"item_id": "181", "score": 6.9, "rank": 2, "title": "Return of the Jedi"},
                    ],
                    "model_version": "20261124T071200Z-1a2b3c4d",
                    "prototype_id": 3,
                    "edit_version": 12,
                    "fallback": None,
                    "known_session": True,
                    "unknown_items_ignored": [],
                    "unknown_candidates": [],
                }
            ]
        },
    )


class RecommendationRequest(Strict):
    """Rank for a stored session, for a history carried in the request, or both (carried items appended)."""

    session_id: SessionId | None = Field(default=None, description="Rank with this session's stored state.")
    recent_items: list[ItemId] | None = Field(
        default=None,
        max_length=MAX_RECENT,
        description=(
            "Items the client saw, oldest first. Alone: a stateless ranking (the adapter runs in the request). "
            "With session_id: appended to the stored history (read-your-writes for clients that carry their "
            "latest items). At most 4 × the model's max_len; only the last max_len are used."
        ),
    )
    candidates: list[ItemId] | None = Field(
        default=None, max_length=MAX_CANDIDATES, description="Rank only these items (unknown ones are reported)."
    )
    k: int = Field(default=DEFAULT_K, ge=1, le=MAX_K, description="How many items to return.")
    exclude_seen: bool | None = Field(
        default=None,
        description="Leave out items of the history (default: yes, unless the model recommends items again).",
    )
    fields: list[Annotated[str, Field(min_length=1, max_length=MAX_ID_LEN)]] = Field(
        default_factory=list, max_length=MAX_FIELDS, description=FIELDS_DOC, examples=[["year", "genres"]]
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"session_id": "s-42", "recent_items": ["50", "172"], "k": 10}]},
    )


class BatchRequest(Strict):
    requests: list[RecommendationRequest] = Field(
        min_length=1, max_length=MAX_BATCH, description="Up to 256 rankings, computed in one batched forward."
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"requests": [{"session_id": "s-42"}, {"recent_items": ["50", "172"]}]}]},
    )


class BatchResponse(BaseModel):
    results: list[Recommendations] = Field(description="One ranking per request, in request order.")


class ItemCounts(BaseModel):
    """A session's whole-history item counts as stored (recsys.repeats.RepeatCounts; docs/device.md)."""

    n: int = Field(description="Events counted (items the model knew when they were applied).")
    items: list[tuple[str, int, int, float, float]] = Field(
        description="[item_id, count, last, decayed_short, decayed_long] per entry, in the order the entries entered "
        "(last = index of the item's latest occurrence among the counted events; decayed as of that occurrence)."
    )


class SessionSummary(BaseModel):
    session_id: str
    device_id: str | None = None
    user_id: str | None = None
    event_count: int = Field(description="Events applied to this session.")
    recent_items: list[str] = Field(description="Most recent last.")
    prototype_id: int | None = Field(description="The session's prototype under its model version.")
    edit_version: int = Field(description="Bumped on every stored edit change.")
    model_version: str | None = Field(description="The model version its code was computed with.")
    last_event_at: datetime | None = None
    updated_at: datetime
    item_counts: ItemCounts | None = Field(
        default=None,
        description="Its whole-history item counts, kept while a model with a repeat part serves (a device feeds "
        "them to the graph's `repeat_entries`); null otherwise.",
    )

    model_config = ConfigDict(protected_namespaces=())


class EditLayer(BaseModel):
    weight: list[list[float]] = Field(description="ΔW of this editable layer, D×D (added to the layer's weight).")
    bias: list[float] = Field(description="Δb of this editable layer, D.")


class SessionEdit(BaseModel):
    """The additive edit a device applies to its copy of the model: ``W_l + ΔW_l``, ``b_l + Δb_l``."""

    session_id: str
    model_version: str = Field(description="The edit only fits this model version.")
    prototype_id: int | None
    edit_version: int
    layers: list[EditLayer] = Field(description="One entry per editable layer, in order.")
    code: list[list[float]] = Field(description="The session's edit code, L×d.")
    item_bias: list[float] | None = Field(
        default=None,
        description="Added to every item's score (index = vocabulary index): the session's prototype's group bias. "
        "null when the model has none.",
    )
    binary_bytes: dict[str, int] = Field(
        default_factory=dict,
        description="Size of this edit with format=binary: per dtype, and per dtype at the factor rank when low-rank.",
    )
    encoding: Literal["float32"] = Field(default="float32", description="Values are float32 numbers.")

    model_config = ConfigDict(protected_namespaces=())


Identifier = Annotated[str, Field(min_length=1, max_length=MAX_ID_LEN)]


class EventDoc(BaseModel):
    """One interaction event as the API and Kafka take it (documentation: ``persona.events`` validates it).

    Any other field is kept as an attribute of the event. At most 16 KB as compact JSON.
    """

    event_id: Identifier = Field(description="Unique per event: a redelivered event_id has no effect.")
    session_id: Identifier = Field(description="The session (the Kafka key); its events are applied in order.")
    item_id: Identifier | int = Field(description="An item id of the catalogue (unknown ones are counted, skipped).")
    ts: Annotated[str, Field(max_length=64, description="ISO 8601 (UTC if no offset)")] | float = Field(
        description="When it happened: ISO 8601 text or epoch seconds; not far in the future."
    )
    type: Annotated[str, Field(min_length=1, max_length=32)] = Field("click", description="Kind of interaction.")
    user_id: Identifier | int | None = Field(None, description="Optional, kept with the session.")
    device_id: Identifier | None = Field(None, description="Optional, kept with the session.")

    model_config = ConfigDict(extra="allow", title="Event")


class EventsBatch(Strict):
    events: list[dict[str, Any]] = Field(
        min_length=1,
        max_length=MAX_EVENTS,
        description="Up to 1000 events, each the Kafka JSON (DESIGN.md 'Events').",
    )


class IngestResponse(BaseModel):
    accepted: int = Field(description="Events in the request.")
    applied: int = Field(description="Events applied to session state now.")
    duplicates: int = Field(description="Events already applied earlier (same event_id): no effect.")
    unknown_items: int = Field(description="Events whose item the model does not know (logged, skipped).")
    sessions: list[str] = Field(description="Sessions touched.")


class ModelInfo(BaseModel):
    version: str
    path: str
    sha256: str
    active: bool
    loaded: bool = Field(description="True for the version this replica is serving.")
    created_at: datetime
    metrics: dict[str, Any]


class ModelList(BaseModel):
    serving: str | None = Field(description="The version this replica serves now.")
    models: list[ModelInfo]


class ReloadResponse(BaseModel):
    swapped: bool = Field(description="True when a different version was swapped in.")
    version: str | None
    reloads: int


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    model_version: str

    model_config = ConfigDict(protected_namespaces=())


class ProblemError(BaseModel):
    """One invalid field or event."""

    loc: list[str | int] = Field(description="Where: e.g. ['body', 'k'], or ['body', 'events', 3].")
    msg: str
    type: str | None = None


class Problem(BaseModel):
    """RFC 9457 problem details (media type ``application/problem+json``)."""

    type: str = Field(default="about:blank", description="A URI naming the kind of problem.")
    title: str = Field(description="Short, fixed per status.")
    status: int
    detail: str | None = Field(default=None, description="What went wrong with this request, in one line.")
    instance: str | None = Field(default=None, description="The request path.")
    errors: list[ProblemError] | None = Field(default=None, description="Each invalid field or event (422).")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "about:blank",
                    "title": "Unprocessable Content",
                    "status": 422,
                    "detail": "1 invalid field",
                    "instance": "/v1/recommendations",
                    "errors": [{"loc": ["body", "k"], "msg": "Input should be less than or equal to 1000"}],
                }
            ]
        }
    )
