"""webhook refusals counted, not stored

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 05:00:00

Every refused webhook was a row of its own, headers whole: anyone could fill the disk. Now
requests without signature headers, and refusals past the per-minute sample, are only counted:
a row per minute and reason, which every API process adds its counts to. Dropped on downgrade,
counts and all (the refusals they counted were never stored anyway).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "webhook_refusal_counts",
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("unstored", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("minute", "reason", name=op.f("pk_webhook_refusal_counts")),
    )


def downgrade() -> None:
    op.drop_table("webhook_refusal_counts")
