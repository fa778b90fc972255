"""Initial schema: sessions, events, prototypes, model_versions.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Plain types only: a migration must not change when application code does.
TS = sa.DateTime(timezone=True)
JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("session_id", sa.String(128), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=True),
        sa.Column("user_id", sa.String(128), nullable=True),
        sa.Column("recent_items", JSON, nullable=False),
        sa.Column("event_count", sa.Integer(), nullable=False),
        sa.Column("unknown_item_count", sa.Integer(), nullable=False),
        sa.Column("prototype_id", sa.Integer(), nullable=True),
        sa.Column("code", sa.LargeBinary(), nullable=True),
        sa.Column("edit_version", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("model_version", sa.String(64), nullable=True),
        sa.Column("last_event_at", TS, nullable=True),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("session_id", name="pk_sessions"),
    )
    op.create_table(
        "events",
        sa.Column("id", BIGINT_PK, autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(128), nullable=False),
        sa.Column("session_id", sa.String(128), nullable=False),
        sa.Column("item_id", sa.String(128), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("ts", TS, nullable=False),
        sa.Column("ingested_at", TS, nullable=False),
        sa.Column("known_item", sa.Boolean(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("attributes", JSON, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
        sa.UniqueConstraint("event_id", name="uq_events_event_id"),
    )
    op.create_index("ix_events_session_id", "events", ["session_id"])
    op.create_table(
        "prototypes",
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("prototype_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("centre", sa.LargeBinary(), nullable=False),
        sa.Column("count", sa.Float(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("last_assigned_at", TS, nullable=True),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("model_version", "prototype_id", name="pk_prototypes"),
    )
    op.create_table(
        "model_versions",
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("version", name="pk_model_versions"),
    )
    # At most one active model: a unique index over the rows WHERE active (both dialects support it).
    op.create_index(
        "uq_model_versions_single_active",
        "model_versions",
        ["active"],
        unique=True,
        sqlite_where=sa.text("active"),
        postgresql_where=sa.text("active"),
    )


def downgrade() -> None:
    op.drop_index("uq_model_versions_single_active", table_name="model_versions")
    op.drop_table("model_versions")
    op.drop_table("prototypes")
    op.drop_index("ix_events_session_id", table_name="events")
    op.drop_table("events")
    op.drop_table("sessions")
