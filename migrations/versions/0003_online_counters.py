"""The online (prequential) evaluation counters move into the store, next to the events they count.

One row per counter: ``name`` (predictions, hits, ndcg_gain, reciprocal_rank), ``variant`` (persona, base) and
``k`` (the cut-off; 0 for counters without one), with its running ``value``. The ingesting transaction adds a
batch's counts to them, so they are exactly-once like the events: a crash before the commit counts nothing, a
redelivered event is a duplicate and counts nothing again. Starts empty (counts begin at the upgrade).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "online_counters",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("variant", sa.String(16), nullable=False),
        sa.Column("k", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", "variant", "k"),
    )


def downgrade() -> None:
    op.drop_table("online_counters")
