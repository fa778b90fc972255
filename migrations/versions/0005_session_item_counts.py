"""Sessions keep their whole history as bounded item counts (the device model's repeat part, recsys.repeats).

``item_counts`` holds ``{"n": events, "items": [[item_id, count, last, decayed_short, decayed_long], ...]}``: at most
the model's ``repeat_size`` (64 by default) entries, ``last`` = the index of the item's latest event in the session,
the decayed counts as of that event (recsys.repeats.RepeatCounts). The consumer updates it with every applied event, in the same transaction as the rest of the session
row; the prequential check and the API's rankings read it. NULL (rows written before this revision) means "no counts
yet": such a session starts from its stored recent items, so the upgrade needs no backfill.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    json_type = sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("item_counts", json_type, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("item_counts")
