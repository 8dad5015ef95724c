"""reconciler polls

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 16:47:42.182738
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "subscriptions", sa.Column("last_polled_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_index(
        "ix_subscriptions_watched",
        "subscriptions",
        ["last_heard_at"],
        unique=False,
        postgresql_where=sa.text("state = 'active' AND done_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_subscriptions_watched",
        table_name="subscriptions",
        postgresql_where=sa.text("state = 'active' AND done_at IS NULL"),
    )
    op.drop_column("subscriptions", "last_polled_at")
