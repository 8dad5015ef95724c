"""notification lanes being sent, indexed by endpoint

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-09 09:00:00

Every claim counts each endpoint's lanes in flight (`service/db/notify.py`). Through the due
index that count read every lane whose next attempt is ahead, so a consumer that is down, its
whole queue waiting for retries, made every claim slower; and lanes updated at each claim and
each send left that range full of dead entries. A partial index holds only the claimed lanes.
The table is small (a lane per subscription with messages waiting), so it is built in place.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_notify_lanes_claimed",
        "notify_lanes",
        ["endpoint_id", "next_attempt_at"],
        postgresql_where=sa.text("claim_token IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_notify_lanes_claimed", table_name="notify_lanes")
