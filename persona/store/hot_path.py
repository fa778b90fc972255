"""The three statements every ingested batch and every ranking runs, on the driver's own cursor.

SQLAlchemy Core spent more time preparing these statements than the databases spent running them: per row and
per parameter it resolves bind processors, re-validates timestamps through a type decorator and serialises
JSON, and on reads it builds a ``Row`` per result. Here the values are converted once, by code written for the
two dialects we support, and the SQL text is built once per dialect and row count. The stored representation
is exactly what SQLAlchemy writes and reads (SQLite: ``YYYY-MM-DD HH:MM:SS.ffffff`` UTC text and JSON text;
PostgreSQL: ``timestamptz`` and ``jsonb``), so the rest of the store keeps using Core on the same rows; the
store tests run both paths against both databases.

The cursor comes from the same connection as the surrounding :class:`~persona.store.repository.UnitOfWork`,
so these statements are part of its transaction.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Collection, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from persona.store.tables import events, sessions, to_utc

#: Rows per statement: keeps SQLite under its bound-parameter limit (32766) with room to spare.
CHUNK = 500

_SESSION_FIELDS = (
    "session_id",
    "device_id",
    "user_id",
    "recent_items",
    "event_count",
    "unknown_item_count",
    "prototype_id",
    "code",
    "user_state",
    "edit_version",
    "model_version",
    "last_event_at",
    "updated_at",
    "item_counts",
)
_EVENT_FIELDS = ("event_id", "session_id", "item_id", "type", "ts", "ingested_at", "known_item", "source", "attributes")


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    """``items`` in slices of at most ``size`` rows (one statement each)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


#: "00" … "99", for :func:`_sqlite_time`.
_TWO_DIGITS = tuple(f"{i:02d}" for i in range(100))


def _sqlite_time(value: datetime | None) -> str | None:
    """SQLAlchemy's SQLite ``DATETIME`` text for a UTC instant (what :class:`UTCDateTime` stores there), i.e.
    ``isoformat(" ", "microseconds")`` without the offset, written field by field: ``isoformat`` goes through C's
    ``printf`` and cost 3.0 µs a call here against 1.2, about two calls an ingested event (callgrind: 3.6 % of the
    consumer's instructions)."""
    if value is None:
        return None
    if value.tzinfo is not UTC:
        value = to_utc(value)
    year = value.year
    if year < 1000:  # four digits, zero-padded: rare enough for the slow path
        return value.isoformat(" ", "microseconds")[:26]
    d = _TWO_DIGITS
    return (
        f"{year}-{d[value.month]}-{d[value.day]} {d[value.hour]}:{d[value.minute]}:{d[value.second]}"
        f".{value.microsecond:06d}"
    )


#: Printable ASCII but the quote and the backslash: text JSON writes as it is.
_PLAIN = re.compile(r"[ !#-\[\]-~]*")


def _sqlite_json(value: Any) -> str | None:
    """``json.dumps(value)`` (what SQLAlchemy's JSON type writes), with a shortcut for the common values: a list of
    plain strings (a session's recent items: most of an upsert's conversion time went to this) and an empty
    object (most events' attributes)."""
    if value is None:
        return None
    if type(value) is list and value:
        try:
            plain = _PLAIN.fullmatch("".join(value)) is not None
        except TypeError:  # not all strings
            plain = False
        if plain:
            return '["' + '", "'.join(value) + '"]'
    elif type(value) is dict and not value:
        return "{}"
    text = getattr(value, "json_text", None)  # a value that carries its exact JSON text (a session's item counts)
    return json.dumps(value) if text is None else text


def _pg_json(jsonb: Callable[..., Any], value: Any) -> Any:
    """A ``jsonb`` parameter (``jsonb``: psycopg's ``Jsonb``, imported once by :class:`HotPath`); a value that carries
    its exact JSON text (``json_text``: a session's item counts) is sent as that text."""
    if value is None:
        return None
    text = getattr(value, "json_text", None)
    return jsonb(value) if text is None else jsonb(value, dumps=lambda _: text)


def _sqlite_time_in(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


def _memo(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``convert`` that reuses its last answer when given the same object again (a batch stamps every row with
    one ``now``). Built per call: holds no state beyond it."""
    last: list[Any] = [_MISSING, None]

    def converted(value: Any) -> Any:
        if value is not last[0]:
            last[0], last[1] = value, convert(value)
        return last[1]

    return converted


_MISSING = object()


def _pg_time(value: datetime | None) -> datetime | None:
    return None if value is None else to_utc(value)


def _pg_time_in(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


class HotPath:
    """Dialect-specific SQL and value conversion for event inserts and session reads and upserts.

    Methods take a DBAPI cursor (``sqlite3`` or ``psycopg``) inside an open transaction. Built once per dialect
    (:func:`hot_path`); holds no connection state.
    """

    def __init__(self, dialect: str) -> None:
        if dialect == "sqlite":
            self.mark = "?"
            self._time: Callable[[datetime | None], Any] = _sqlite_time
            self._time_in: Callable[[Any], datetime | None] = _sqlite_time_in
            self._json: Callable[[Any], Any] = _sqlite_json
            self._json_in: Callable[[Any], Any] = lambda v: None if v is None else json.loads(v)
        elif dialect == "postgresql":
            from psycopg.types.json import Jsonb

            self.mark = "%s"
            self._time = _pg_time
            self._time_in = _pg_time_in
            self._json = functools.partial(_pg_json, Jsonb)
            self._json_in = lambda v: v  # psycopg decodes jsonb itself
        else:
            raise ValueError(f"no hot path for dialect {dialect!r}")
        self.dialect = dialect
        names = ", ".join(_SESSION_FIELDS)
        updates = ", ".join(f"{n} = excluded.{n}" for n in _SESSION_FIELDS if n != "session_id")
        self._upsert_sql = (
            f"INSERT INTO {sessions.name} ({names}) VALUES ({', '.join([self.mark] * len(_SESSION_FIELDS))}) "
            f"ON CONFLICT (session_id) DO UPDATE SET {updates}"
        )
        self._select_sessions = f"SELECT {names} FROM {sessions.name} WHERE session_id"
        self._insert_sql: dict[int, str] = {}  # by row count: a handful per process

    # -- events ---------------------------------------------------------------------------------------------

    def _insert_events_sql(self, rows: int) -> str:
        sql = self._insert_sql.get(rows)
        if sql is None:
            one = "(" + ", ".join([self.mark] * len(_EVENT_FIELDS)) + ")"
            sql = self._insert_sql[rows] = (
                f"INSERT INTO {events.name} ({', '.join(_EVENT_FIELDS)}) VALUES {', '.join([one] * rows)} "
                "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
            )
        return sql

    def insert_events(self, cursor: Any, rows: Sequence[Any]) -> set[str]:
        """Log ``NewEvent`` rows (unique ``event_id``s), skipping ids already logged; returns those inserted."""
        to_time, to_json, stamp = self._time, self._json, _memo(self._time)
        inserted: set[str] = set()
        for chunk in chunks(rows):
            params: list[Any] = []
            for e in chunk:
                params += (
                    e.event_id,
                    e.session_id,
                    e.item_id,
                    e.type,
                    to_time(e.ts),
                    stamp(e.ingested_at),
                    bool(e.known_item),
                    e.source,
                    to_json(e.attributes),
                )
            cursor.execute(self._insert_events_sql(len(chunk)), params)
            inserted.update(row[0] for row in cursor.fetchall())
        return inserted

    # -- sessions -------------------------------------------------------------------------------------------

    def get_sessions(self, cursor: Any, session_ids: Collection[str]) -> list[tuple[Any, ...]]:
        """The stored sessions among ``session_ids`` as value tuples in :data:`SESSION_FIELDS` order (the fields
        of :class:`~persona.store.repository.SessionState`)."""
        from_time, from_json = self._time_in, self._json_in
        found: list[tuple[Any, ...]] = []
        for chunk in chunks(list(set(session_ids))):
            if len(chunk) == 1:
                cursor.execute(f"{self._select_sessions} = {self.mark}", (chunk[0],))
            else:
                cursor.execute(f"{self._select_sessions} IN ({', '.join([self.mark] * len(chunk))})", list(chunk))
            for row in cursor.fetchall():
                (sid, device, user, recent, count, unknown, proto, code, state, edit, model, last, updated, counts) = (
                    row
                )
                found.append(
                    (
                        sid,
                        device,
                        user,
                        list(from_json(recent)),
                        count,
                        unknown,
                        proto,
                        None if code is None else bytes(code),
                        None if state is None else bytes(state),
                        edit,
                        model,
                        from_time(last),
                        from_time(updated),
                        from_json(counts),
                    )
                )
        return found

    def session_versions(self, cursor: Any, session_ids: Collection[str]) -> dict[str, tuple[int, int, datetime]]:
        """(edit_version, unknown_item_count, updated_at) of the stored sessions among ``session_ids``: every write
        of a session changes one of them, so a reader can tell cheaply whether what it read still holds."""
        from_time = self._time_in
        found: dict[str, tuple[int, int, datetime]] = {}
        for chunk in chunks(list(set(session_ids))):
            marks = ", ".join([self.mark] * len(chunk))
            cursor.execute(
                f"SELECT session_id, edit_version, unknown_item_count, updated_at FROM {sessions.name} "
                f"WHERE session_id IN ({marks})",
                list(chunk),
            )
            for sid, edit, unknown, updated in cursor.fetchall():
                stamp = from_time(updated)
                assert stamp is not None  # a non-null column
                found[sid] = (edit, unknown, stamp)
        return found

    def upsert_sessions(self, cursor: Any, states: Sequence[Any]) -> None:
        """Insert or overwrite ``SessionState`` rows (ids unique within ``states``)."""
        to_time, to_json, stamp = self._time, self._json, _memo(self._time)
        params = [
            (
                s.session_id,
                s.device_id,
                s.user_id,
                to_json(s.recent_items),
                s.event_count,
                s.unknown_item_count,
                s.prototype_id,
                s.code,
                s.user_state,
                s.edit_version,
                s.model_version,
                to_time(s.last_event_at),
                stamp(s.updated_at),
                to_json(s.item_counts),
            )
            for s in states
        ]
        if params:
            cursor.executemany(self._upsert_sql, params)


#: The columns of a session row, in the order :meth:`HotPath.get_sessions` returns them.
SESSION_FIELDS = _SESSION_FIELDS


@functools.cache
def hot_path(dialect: str) -> HotPath:
    """The :class:`HotPath` of a dialect (``"sqlite"`` or ``"postgresql"``), built once per process."""
    return HotPath(dialect)
