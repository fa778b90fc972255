"""The store's tables as SQLAlchemy 2 declarative models.

These models describe the schema for code and for ``alembic revision --autogenerate``; the schema itself is
created only by the migrations in ``migrations/versions`` (``tests/test_store.py`` checks that both agree).
Rows stay small: a session keeps its recent item ids and a compact float32 edit code, never weight copies.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Stable constraint names, so migrations can refer to them on every dialect.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def to_utc(value: datetime) -> datetime:
    """The same instant in UTC; a naive datetime is refused (it is ambiguous and would silently shift)."""
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: the store only accepts timezone-aware datetimes")
    return value.astimezone(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp that always comes back as UTC, also on SQLite (which stores no zone).

    Naive datetimes are refused: an event time without a zone is ambiguous and would silently shift.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else to_utc(value)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


#: JSON everywhere; JSONB on PostgreSQL (smaller, indexable). SQL NULL for ``None``.
JSONType = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
#: SQLite only auto-increments an ``INTEGER PRIMARY KEY``.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class SessionRow(Base):
    """One live session: what the consumer needs to apply the next event and the API to rank."""

    __tablename__ = "sessions"

    session_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    device_id: Mapped[str | None] = mapped_column(String(128))
    user_id: Mapped[str | None] = mapped_column(String(128))
    recent_items: Mapped[list[str]] = mapped_column(JSONType, nullable=False)
    event_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    unknown_item_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    prototype_id: Mapped[int | None] = mapped_column(Integer)
    code: Mapped[bytes | None] = mapped_column(LargeBinary)
    user_state: Mapped[bytes | None] = mapped_column(LargeBinary)  # tagged encoder output h [D] (0002)
    edit_version: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    model_version: Mapped[str | None] = mapped_column(String(64))
    last_event_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    item_counts: Mapped[dict[str, Any] | None] = mapped_column(JSONType)  # whole-history item counts (0005)


class EventRow(Base):
    """The append-only event log (dedup key ``event_id``), used for retraining and audits."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(128), nullable=False, unique=True)
    session_id: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    item_id: Mapped[str] = mapped_column(String(128), nullable=False)
    type: Mapped[str] = mapped_column(String(32), nullable=False)
    ts: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    ingested_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    known_item: Mapped[bool] = mapped_column(Boolean, nullable=False)
    source: Mapped[str] = mapped_column(String(16), nullable=False)
    attributes: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class PrototypeDBRow(Base):
    """One prototype of a model version's bank; ``version`` is bumped on every change."""

    __tablename__ = "prototypes"

    model_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    prototype_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    centre: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    count: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    next_items: Mapped[bytes | None] = mapped_column(LargeBinary)  # float32 [N] group next-item counts (0004)
    switches: Mapped[bytes | None] = mapped_column(LargeBinary)  # float64 [3] edit/group-term switch state (0006)
    last_assigned_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class ModelVersionDBRow(Base):
    """The model registry; at most one row is ``active`` (partial unique index)."""

    __tablename__ = "model_versions"
    __table_args__ = (
        Index(
            "uq_model_versions_single_active",
            "active",
            unique=True,
            sqlite_where=text("active"),
            postgresql_where=text("active"),
        ),
    )

    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)


class OnlineCounterRow(Base):
    """One running counter of the online (prequential) evaluation (0003), e.g. ``hits`` of ``persona`` at ``k`` 10
    (``k`` 0 for counters without a cut-off). Added to in the transaction of the events it counts: exactly-once."""

    __tablename__ = "online_counters"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    variant: Mapped[str] = mapped_column(String(16), primary_key=True)
    k: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    value: Mapped[float] = mapped_column(Float, nullable=False)


sessions = cast(Table, SessionRow.__table__)
events = cast(Table, EventRow.__table__)
prototypes = cast(Table, PrototypeDBRow.__table__)
model_versions = cast(Table, ModelVersionDBRow.__table__)
online_counters = cast(Table, OnlineCounterRow.__table__)
