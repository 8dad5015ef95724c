"""dispatch attempts and shared control

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 16:27:28.921293
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dispatch_control",
        sa.Column("id", sa.SmallInteger(), server_default=sa.text("1"), nullable=False),
        sa.Column("tokens", sa.Float(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "refilled_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("paused_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pause_kind", sa.Text(), nullable=True),
        sa.Column(
            "pause_reason",
            postgresql.JSONB(none_as_null=True, astext_type=sa.Text()),
            nullable=True,
        ),
        sa.CheckConstraint(
            "pause_kind IN ('rate_limit', 'account')", name=op.f("ck_dispatch_control_pause_kind")
        ),
        sa.CheckConstraint("id = 1", name=op.f("ck_dispatch_control_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dispatch_control")),
    )
    op.create_table(
        "dispatch_attempts",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("subscription_id", sa.UUID(), nullable=False),
        sa.Column("operation", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("error_code", sa.Text(), nullable=True),
        sa.Column(
            "errors", postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), nullable=True
        ),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("claim_lost", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["subscriptions.id"],
            name=op.f("fk_dispatch_attempts_subscription_id_subscriptions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dispatch_attempts")),
    )
    op.create_index(
        "ix_dispatch_attempts_subscription",
        "dispatch_attempts",
        ["subscription_id", sa.literal_column("id DESC")],
        unique=False,
    )
    # The single row every dispatcher shares; it always exists, so claims never insert it.
    op.execute("INSERT INTO dispatch_control (id) VALUES (1)")


def downgrade() -> None:
    op.drop_index("ix_dispatch_attempts_subscription", table_name="dispatch_attempts")
    op.drop_table("dispatch_attempts")
    op.drop_table("dispatch_control")
