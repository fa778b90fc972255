"""Prototypes keep their online switches for the adapter's edit and the group terms (recsys.switch).

``switches`` holds a prototype's decayed sums of the edit's and the group terms' gains on its members' events and
their decayed count, float64 [3] (24 bytes). The consumer updates it with each scored event, in the same transaction
as the centre's refinement and the group counts, so every API replica serves with the same switches. NULL (rows
written before this revision) means "start from the bundle's switches", so the upgrade needs no backfill.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("prototypes") as batch:
        batch.add_column(sa.Column("switches", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("prototypes") as batch:
        batch.drop_column("switches")
