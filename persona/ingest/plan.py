"""What a batch does to its sessions before any model work: :func:`walk` takes the events in order through the
sessions' states and lists every history the model must encode and every prediction it must score."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from persona.events import Event
from persona.store import SessionState
from recsys.online import OnlineModel
from recsys.repeats import CountsSnapshots, RepeatCounts
from recsys.windows import window_length


@dataclass(frozen=True, slots=True)
class StoredState:
    """What a stored session state was computed with, as read from the store; or, for a session a pending batch
    touches (``origin``), that batch's state of it, read once it has committed."""

    model_version: str | None
    code: bytes | None
    user_state: bytes | None
    prototype_id: int | None
    edit_version: int
    origin: SessionState | None = None

    def resolved(self) -> StoredState:
        o = self.origin
        return self if o is None else StoredState(o.model_version, o.code, o.user_state, o.prototype_id, o.edit_version)


@dataclass(slots=True)
class Touched:
    """A touched session while a batch is applied: its state and its history as vocabulary indices."""

    state: SessionState
    indices: list[int]  # vocabulary indices of state.recent_items (UNK for items the model lost)
    # Row of its current state (code, user state): >= 0 in this batch's post-event rows; -(j + 2) for the
    # j-th stored previous state; -1 before either is known.
    row: int = -1
    origin: SessionState | None = None  # the pending batch's state this one was copied from (see Ingestor.prepare)
    rows: list[tuple[int, int]] = field(default_factory=list)  # (post-event row, its window's start) per event
    counts: RepeatCounts[str] | None = None  # its whole-history item counts (models with a repeat part)


@dataclass
class Plan:
    """What a batch does to its sessions, before any model work: the result of :func:`walk`."""

    sessions: dict[str, Touched] = field(default_factory=dict)
    post_hist: list[list[int]] = field(default_factory=list)  # history after each applied event
    pre_rows: list[tuple[int, int]] = field(default_factory=list)  # (row of the previous state, target) per prediction
    stored_prev: list[tuple[StoredState, list[int]]] = field(
        default_factory=list
    )  # stored states that predict an event
    event_ts: list[float] = field(default_factory=list)  # per applied event
    item_indices: list[int] = field(default_factory=list)  # per applied event
    unknown_items: int = 0
    pre_counts: CountsSnapshots[str] | None = None  # per prediction: counts before it (models with a repeat part)


def walk(
    online: OnlineModel,
    fresh: list[tuple[Event, bool]],
    stored: dict[str, SessionState],
    cap: int,
    now: datetime,
    origins: dict[str, SessionState],
    known_indices: dict[str, list[int]] | None = None,
) -> Plan:
    """Walk the new events in order, updating the sessions' states (in place) and building their histories.

    The sequence encoder then runs once per applied event, on its post-event history: that user state is stored
    with the session, and it is exactly what the session's *next* event is scored with. So a prediction never
    re-encodes the previous history (the stored state, or the in-batch one, is it). ``known_indices`` are the
    vocabulary indices of some sessions' recent items when already known (from a pending batch, or remembered).
    """
    plan = Plan()
    repeats = online.has_repeat_part
    pre_counts = plan.pre_counts = CountsSnapshots(online.item_codes) if repeats else None
    known_indices = known_indices or {}
    sessions = plan.sessions
    index_of, indices_of = online.index_of, online.indices_of
    max_len, stride = online.cfg.max_len, online.cfg.stride
    for e, known in fresh:
        w = sessions.get(e.session_id)
        if w is None:
            st = stored.get(e.session_id)
            if st is None:
                st = SessionState(session_id=e.session_id, device_id=e.device_id, user_id=e.user_id)
            indices = known_indices.get(e.session_id)
            if indices is None:
                indices = indices_of(st.recent_items[-cap:])
            w = Touched(st, indices, origin=origins.get(e.session_id))
            if repeats:
                w.counts = online.session_counts(st.item_counts, st.recent_items)
            sessions[e.session_id] = w
        st = w.state
        if e.device_id is not None:
            st.device_id = e.device_id
        if e.user_id is not None:
            st.user_id = e.user_id
        st.last_event_at = e.ts if st.last_event_at is None else max(st.last_event_at, e.ts)
        st.updated_at = now
        if not known:
            st.unknown_item_count += 1
            plan.unknown_items += 1
            continue

        item = index_of(e.item_id)
        if w.indices:
            if w.row == -1:
                w.row = -(len(plan.stored_prev) + 2)
                # Snapshot what the stored state was computed with: the loop re-stamps model_version below.
                snapshot = StoredState(
                    st.model_version, st.code, st.user_state, st.prototype_id, st.edit_version, origin=w.origin
                )
                size = min(window_length(st.event_count, max_len, stride), len(w.indices))
                plan.stored_prev.append((snapshot, w.indices[len(w.indices) - size :]))
            plan.pre_rows.append((w.row, item))
            if pre_counts is not None and w.counts is not None:
                pre_counts.take(w.counts)
        if w.counts is not None:
            w.counts.add(e.item_id)
        w.indices = [*w.indices, item][-cap:]
        st.recent_items = [*st.recent_items, e.item_id][-cap:]
        st.event_count += 1
        st.edit_version += 1
        st.model_version = online.version
        w.row = len(plan.post_hist)
        size = min(window_length(st.event_count, max_len, stride), len(w.indices))
        w.rows.append((w.row, st.event_count - size))
        plan.post_hist.append(w.indices[len(w.indices) - size :])
        plan.event_ts.append(e.ts.timestamp())
        plan.item_indices.append(item)
    for w in sessions.values():
        if w.counts is not None:
            w.state.item_counts = w.counts.to_json()
    return plan
