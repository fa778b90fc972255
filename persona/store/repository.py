"""The store's operations, as plain dataclasses in and out (callers never see ORM objects).

One :class:`UnitOfWork` is one database transaction: the consumer inserts a batch of events, updates the
sessions they touch and refines prototypes inside it, then commits Kafka offsets only after it commits.
Deduplication on ``event_id`` is what turns at-least-once delivery into an exactly-once effect.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Insert, Table, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from persona.store.engine import READ_ONLY, ensure_schema, make_engine, mask_url
from persona.store.hot_path import SESSION_FIELDS, HotPath, chunks, hot_path
from persona.store.tables import events, model_versions, online_counters, prototypes
from recsys.errors import PersonaError

try:  # the PostgreSQL driver we ship; the hot path raises its errors unwrapped
    import psycopg

    _DRIVER_OUTAGES: tuple[type[Exception], ...] = (sqlite3.OperationalError, psycopg.OperationalError)
except ImportError:  # pragma: no cover - psycopg is a dependency
    _DRIVER_OUTAGES = (sqlite3.OperationalError,)

#: Errors that say the database cannot be used right now (not that it refused a statement): no server, lost
#: connection, locked or unopenable file. SQLAlchemy's wrappers and, for the hot path's raw cursors, the drivers'.
_OUTAGES: tuple[type[Exception], ...] = (OperationalError, InterfaceError, *_DRIVER_OUTAGES)


class StoreUnavailable(PersonaError):
    """The database cannot be reached or used right now: an outage to wait out (the API answers 503, the consumer
    backs off), as opposed to an error about what was sent to it."""


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class SessionState:
    """A session as the consumer and the API see it.

    ``code`` is the float32 bytes of its edit code [L, d]; ``user_state`` the device encoder's output h [D] for
    ``recent_items``, tagged with its edit version (:mod:`persona.user_state`); both belong to ``model_version``
    and are recomputed when that is not the live one.
    """

    session_id: str
    device_id: str | None = None
    user_id: str | None = None
    recent_items: list[str] = field(default_factory=list)
    event_count: int = 0
    unknown_item_count: int = 0
    prototype_id: int | None = None
    code: bytes | None = None
    user_state: bytes | None = None
    edit_version: int = 0
    model_version: str | None = None
    last_event_at: datetime | None = None
    updated_at: datetime = field(default_factory=utcnow)
    # The session's whole history as bounded item counts (recsys.repeats.RepeatCounts.to_json: item ids, counts and
    # latest positions), for the device model's repeat part; None = none kept yet (rows from before 0005)
    item_counts: dict[str, Any] | None = None

    def copy(self) -> SessionState:
        """A shallow copy (what ``dataclasses.replace(self)`` makes, at a seventh of its cost: the consumer copies
        every session a batch touches)."""
        return SessionState(
            self.session_id,
            self.device_id,
            self.user_id,
            self.recent_items,
            self.event_count,
            self.unknown_item_count,
            self.prototype_id,
            self.code,
            self.user_state,
            self.edit_version,
            self.model_version,
            self.last_event_at,
            self.updated_at,
            self.item_counts,
        )


@dataclass(slots=True)
class NewEvent:
    """A validated event about to be logged; ``source`` is ``"kafka"`` or ``"http"``."""

    event_id: str
    session_id: str
    item_id: str
    ts: datetime
    type: str = "click"
    known_item: bool = True
    source: str = "kafka"
    attributes: dict[str, Any] | None = None
    ingested_at: datetime = field(default_factory=utcnow)


@dataclass(slots=True)
class StoredEvent:
    """An event as logged, with its store sequence number ``id`` (insertion order)."""

    id: int
    event_id: str
    session_id: str
    item_id: str
    type: str
    ts: datetime
    ingested_at: datetime
    known_item: bool
    source: str
    attributes: dict[str, Any] | None


@dataclass(slots=True)
class PrototypeRow:
    """One prototype of a bank; ``centre`` is float32 bytes, ``version`` counts its changes; ``next_items``: its
    decayed next-item counts as float32 bytes [N] and ``switches``: its switch state for the edit and the group
    terms as float64 bytes [3] (:mod:`recsys.switch`; ``None`` each: not stored yet, the bundle's apply)."""

    prototype_id: int
    centre: bytes
    count: float = 0.0
    version: int = 0
    next_items: bytes | None = None
    switches: bytes | None = None
    last_assigned_at: datetime | None = None
    updated_at: datetime = field(default_factory=utcnow)


@dataclass(slots=True)
class ModelVersionRow:
    """A registered model bundle."""

    version: str
    path: str
    sha256: str
    metrics: dict[str, Any]
    created_at: datetime
    active: bool


def _model_columns() -> list[Any]:
    return [model_versions.c[name] for name in _MODEL_COLUMNS]


# Reads and writes name the columns this code knows, never "all columns": a later additive migration then
# does not break replicas of this version still running beside upgraded ones.
_SESSION_COLUMNS = tuple(f.name for f in fields(SessionState))
_EVENT_COLUMNS = tuple(f.name for f in fields(StoredEvent))
_MODEL_COLUMNS = tuple(f.name for f in fields(ModelVersionRow))
_PROTOTYPE_COLUMNS = tuple(f.name for f in fields(PrototypeRow))
assert SESSION_FIELDS == _SESSION_COLUMNS, "the hot path's session columns must follow SessionState"


class UnitOfWork:
    """The operations of one transaction, on one SQLAlchemy ``Connection``."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._dialect = connection.dialect.name
        self._hot: HotPath | None = None

    @contextmanager
    def _hot_cursor(self) -> Iterator[tuple[HotPath, Any]]:
        """The dialect's :class:`HotPath` and a driver cursor on this transaction's connection (closed after)."""
        if self._hot is None:
            if self._dialect not in ("sqlite", "postgresql"):
                self._insert(events)  # raises the one-line "unsupported database" error
            self._hot = hot_path(self._dialect)
        cursor = self.connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            yield self._hot, cursor
        finally:
            cursor.close()

    def _insert(self, table: Table) -> Any:
        """A dialect ``INSERT`` that knows ``ON CONFLICT`` (PostgreSQL and SQLite ≥ 3.24)."""
        if self._dialect == "postgresql":
            return postgresql.insert(table)
        if self._dialect == "sqlite":
            return sqlite.insert(table)
        raise PersonaError(f"the store supports SQLite and PostgreSQL, not {self._dialect}", "fix PERSONA_DATABASE_URL")

    # -- events -------------------------------------------------------------------------------------------

    def insert_events(self, rows: Sequence[NewEvent]) -> set[str]:
        """Log events, skipping known ``event_id``s; returns the ids actually inserted (the rest: dupes)."""
        unique: dict[str, NewEvent] = {}
        for row in rows:
            unique.setdefault(row.event_id, row)
        if not unique:
            return set()
        with self._hot_cursor() as (hot, cursor):
            return hot.insert_events(cursor, list(unique.values()))

    def get_events(self, session_id: str | None = None, limit: int | None = None) -> list[StoredEvent]:
        """Logged events (one session's, or all), oldest first; ``limit`` keeps only the latest ones."""
        query = select(*(events.c[name] for name in _EVENT_COLUMNS))
        if session_id is not None:
            query = query.where(events.c.session_id == session_id)
        if limit is not None:
            latest = query.order_by(events.c.id.desc()).limit(limit).subquery()
            query = select(latest)
            order = latest.c.id
        else:
            order = events.c.id
        return [StoredEvent(**row._asdict()) for row in self.connection.execute(query.order_by(order))]

    def count_events(self, session_id: str | None = None) -> int:
        query = select(func.count()).select_from(events)
        if session_id is not None:
            query = query.where(events.c.session_id == session_id)
        return int(self.connection.execute(query).scalar_one())

    # -- sessions -----------------------------------------------------------------------------------------

    def get_sessions(self, session_ids: Collection[str]) -> dict[str, SessionState]:
        """The stored state of these sessions; unknown ids are simply absent."""
        if not session_ids:
            return {}
        with self._hot_cursor() as (hot, cursor):
            return {values[0]: SessionState(*values) for values in hot.get_sessions(cursor, session_ids)}

    def session_versions(self, session_ids: Collection[str]) -> dict[str, tuple[int, int, datetime]]:
        """(edit_version, unknown_item_count, updated_at) of these sessions, for checking that a read still holds."""
        if not session_ids:
            return {}
        with self._hot_cursor() as (hot, cursor):
            return hot.session_versions(cursor, session_ids)

    def upsert_sessions(self, states: Sequence[SessionState]) -> None:
        """Insert or fully overwrite these sessions (the last state wins if an id repeats)."""
        latest = {s.session_id: s for s in states}
        if latest:
            with self._hot_cursor() as (hot, cursor):
                hot.upsert_sessions(cursor, list(latest.values()))

    # -- prototypes ---------------------------------------------------------------------------------------

    def _prototypes(self, model_version: str, *, for_update: bool) -> list[PrototypeRow]:
        query = (
            select(*(prototypes.c[name] for name in _PROTOTYPE_COLUMNS))
            .where(prototypes.c.model_version == model_version)
            .order_by(prototypes.c.prototype_id)
        )
        if for_update:
            query = query.with_for_update()  # rendered on PostgreSQL; SQLite already holds the write lock
        return [PrototypeRow(**row._asdict()) for row in self.connection.execute(query)]

    def load_prototypes(self, model_version: str) -> list[PrototypeRow]:
        """The bank of ``model_version`` ordered by prototype id, without locking (for readers)."""
        return self._prototypes(model_version, for_update=False)

    def lock_prototypes(self, model_version: str) -> list[PrototypeRow]:
        """The bank, locked until this transaction ends, so two consumers refining it take turns."""
        return self._prototypes(model_version, for_update=True)

    def save_prototypes(self, model_version: str, rows: Sequence[PrototypeRow]) -> list[PrototypeRow]:
        """Upsert prototypes; an existing one gets ``version`` = stored version + 1. Returns the bank."""
        if rows:
            stmt: Insert = self._insert(prototypes)
            excluded = stmt.excluded  # type: ignore[attr-defined]
            stmt = stmt.on_conflict_do_update(  # type: ignore[attr-defined]
                index_elements=[prototypes.c.model_version, prototypes.c.prototype_id],
                set_={
                    "centre": excluded.centre,
                    "count": excluded.count,
                    "next_items": excluded.next_items,
                    "switches": excluded.switches,
                    "version": prototypes.c.version + 1,
                    "last_assigned_at": excluded.last_assigned_at,
                    "updated_at": excluded.updated_at,
                },
            )
            now = utcnow()
            params = [
                {
                    "model_version": model_version,
                    "prototype_id": r.prototype_id,
                    "centre": r.centre,
                    "count": r.count,
                    "next_items": r.next_items,
                    "switches": r.switches,
                    "version": r.version,
                    "last_assigned_at": r.last_assigned_at,
                    "updated_at": now,
                }
                for r in rows
            ]
            for chunk in chunks(params):
                self.connection.execute(stmt, list(chunk))
        return self.load_prototypes(model_version)

    # -- online evaluation counters ------------------------------------------------------------------------

    def add_online_counters(self, increments: Mapping[tuple[str, str, int], float]) -> None:
        """Add ``{(name, variant, k): amount}`` to the running counters (created at 0), in this transaction."""
        todo = [{"name": n, "variant": v, "k": k, "value": float(x)} for (n, v, k), x in increments.items() if x]
        if not todo:
            return
        stmt: Insert = self._insert(online_counters)
        excluded = stmt.excluded  # type: ignore[attr-defined]
        stmt = stmt.on_conflict_do_update(  # type: ignore[attr-defined]
            index_elements=[online_counters.c.name, online_counters.c.variant, online_counters.c.k],
            set_={"value": online_counters.c.value + excluded.value},
        )
        # a fixed order: two transactions adding to the same rows lock them in the same order (no deadlock)
        self.connection.execute(stmt, sorted(todo, key=lambda r: (r["name"], r["variant"], r["k"])))

    def online_counters(self) -> dict[tuple[str, str, int], float]:
        """Every counter as ``{(name, variant, k): value}``."""
        rows = self.connection.execute(
            select(online_counters.c.name, online_counters.c.variant, online_counters.c.k, online_counters.c.value)
        )
        return {(r.name, r.variant, int(r.k)): float(r.value) for r in rows}

    # -- model registry -----------------------------------------------------------------------------------

    def _model(self, version: str) -> ModelVersionRow | None:
        row = self.connection.execute(select(*_model_columns()).where(model_versions.c.version == version)).first()
        return ModelVersionRow(**row._asdict()) if row is not None else None

    def register_model(
        self, version: str, path: str, sha256: str, metrics: dict[str, Any] | None = None
    ) -> ModelVersionRow:
        """Record a bundle (inactive). Registering the same version with the same sha256 again is a no-op."""
        sha256 = sha256.lower()
        stmt = (
            self._insert(model_versions)
            .values(
                version=version,
                path=path,
                sha256=sha256,
                metrics=metrics or {},
                created_at=utcnow(),
                active=False,
            )
            .on_conflict_do_nothing(index_elements=[model_versions.c.version])
        )
        self.connection.execute(stmt)
        row = self._model(version)
        assert row is not None
        if row.sha256 != sha256:
            raise PersonaError(
                f"model version {version!r} is already registered with sha256 {row.sha256[:12]}…, not {sha256[:12]}…",
                "register the new bundle under a new version",
            )
        return row

    def activate(self, version: str) -> ModelVersionRow:
        """Make ``version`` the single active model (one transaction: no moment with two active)."""
        # Lock the registry so concurrent activations take turns (a no-op on SQLite: already locked).
        known = self.connection.execute(
            select(model_versions.c.version).order_by(model_versions.c.created_at).with_for_update()
        ).scalars()
        names = list(known)
        if version not in names:
            raise PersonaError(
                f"unknown model version {version!r}; registered: {', '.join(names) or 'none'}",
                "register it first with `persona models register`",
            )
        self.connection.execute(
            update(model_versions)
            .where(model_versions.c.active, model_versions.c.version != version)
            .values(active=False)
        )
        self.connection.execute(update(model_versions).where(model_versions.c.version == version).values(active=True))
        row = self._model(version)
        assert row is not None
        return row

    def active_model(self) -> ModelVersionRow | None:
        row = self.connection.execute(select(*_model_columns()).where(model_versions.c.active)).first()
        return ModelVersionRow(**row._asdict()) if row is not None else None

    def list_models(self) -> list[ModelVersionRow]:
        """Every registered version, oldest first."""
        query = select(*_model_columns()).order_by(model_versions.c.created_at, model_versions.c.version)
        return [ModelVersionRow(**row._asdict()) for row in self.connection.execute(query)]


class Store:
    """The store behind one engine; share one per process (the engine pools connections)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, url: str, *, migrate: bool = True) -> Store:
        """Connect to ``url`` and (by default) bring the schema to head first."""
        engine = make_engine(url)
        if migrate:
            ensure_schema(engine)
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[UnitOfWork]:
        """One write transaction: commits on normal exit, rolls back everything if the block raises.

        Raises :class:`StoreUnavailable` when the database cannot be reached or the connection is lost.
        """
        with self._outages_as_unavailable(), self.engine.begin() as conn:
            yield UnitOfWork(conn)

    @contextmanager
    def read(self) -> Iterator[UnitOfWork]:
        """A read-only transaction; on SQLite it runs beside writers instead of queueing behind them.

        Raises :class:`StoreUnavailable` like :meth:`transaction`.
        """
        with (
            self._outages_as_unavailable(),
            self.engine.connect().execution_options(**{READ_ONLY: True}) as conn,
            conn.begin(),
        ):
            yield UnitOfWork(conn)

    @contextmanager
    def _outages_as_unavailable(self) -> Iterator[None]:
        """Lost or refused connections inside the block become :class:`StoreUnavailable`; other errors pass."""
        try:
            yield
        except StoreUnavailable:
            raise
        except DBAPIError as exc:
            if exc.connection_invalidated or isinstance(exc, _OUTAGES):
                raise self._unavailable(exc) from exc
            raise
        except _OUTAGES as exc:
            raise self._unavailable(exc) from exc

    def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless the database answers ``SELECT 1`` (a health probe)."""
        with self.read() as uow:
            uow.connection.execute(text("SELECT 1"))

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        orig = getattr(exc, "orig", None) or exc
        reason = (str(orig).strip().splitlines() or [type(orig).__name__])[0][:200]
        return StoreUnavailable(
            f"the database {mask_url(self.engine.url)!r} is unavailable: {reason}",
            "check the server; nothing was committed and the request can be retried",
        )

    def get_session(self, session_id: str) -> SessionState | None:
        with self.read() as uow:
            return uow.get_sessions([session_id]).get(session_id)

    def load_prototypes(self, model_version: str) -> list[PrototypeRow]:
        with self.read() as uow:
            return uow.load_prototypes(model_version)

    def active_model(self) -> ModelVersionRow | None:
        with self.read() as uow:
            return uow.active_model()

    def list_models(self) -> list[ModelVersionRow]:
        with self.read() as uow:
            return uow.list_models()

    def count_events(self, session_id: str | None = None) -> int:
        with self.read() as uow:
            return uow.count_events(session_id)

    def online_counters(self) -> dict[tuple[str, str, int], float]:
        with self.read() as uow:
            return uow.online_counters()
