"""Prototypes keep their group's next-item counts (the group bias, METHOD.md §3b).

``next_items`` holds a prototype's decayed counts of what its members chose next, float32 [N] (N = the model's
catalogue size, 4·N bytes). The consumer counts each event after scoring it, in the same transaction as the
centre's refinement, so every API replica ranks with the same counts. NULL (rows written before this revision)
means "start from the bundle's counts", so the upgrade needs no backfill.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("prototypes") as batch:
        batch.add_column(sa.Column("next_items", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("prototypes") as batch:
        batch.drop_column("next_items")
