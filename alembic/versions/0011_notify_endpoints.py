"""notification endpoints: where consumers want their changes pushed

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 09:00:00

The registry of push endpoints, the first part of push notifications (nothing is sent yet).
Each endpoint belongs to the API client whose token made it (`created_by`); `all_clients`,
which only an `ops` token may set, makes it receive every client's changes. `secret` is kept
as is, since signing needs it; after a rotation `previous_secret` stays in force until
`previous_secret_expires_at`. Dropped on downgrade, endpoints and secrets with it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "notify_endpoints",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("types", postgresql.ARRAY(sa.Text()), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("state", sa.Text(), server_default="enabled", nullable=False),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("all_clients", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("secret", sa.Text(), nullable=False),
        sa.Column("previous_secret", sa.Text(), nullable=True),
        sa.Column("previous_secret_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rate_limit_per_s", sa.Float(), nullable=True),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "state IN ('enabled', 'disabled')", name=op.f("ck_notify_endpoints_state")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notify_endpoints")),
    )
    op.create_index(
        "ix_notify_endpoints_created_by", "notify_endpoints", ["created_by"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_notify_endpoints_created_by", table_name="notify_endpoints")
    op.drop_table("notify_endpoints")
