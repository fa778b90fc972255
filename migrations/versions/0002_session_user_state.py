"""Sessions keep the device model's user state, so rankings and predictions skip the sequence encoder.

``user_state`` holds the encoder's output h [D] for ``recent_items`` under ``model_version``: the edit version
it was computed for (int64) then h as float32 (8 + D·4 bytes: 264 for D = 64; see persona/user_state.py). The consumer writes it in the same transaction as the history;
the API reuses it instead of re-encoding the history on every ranking. NULL (rows written before this
revision, or by another model version) means "recompute from recent_items", so the upgrade needs no backfill.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("user_state", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("user_state")
