"""subscriptions, deliveries and events

Revision ID: 0001
Revises:
Create Date: 2026-11-27 16:13:06.698831
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Dispatchers LISTEN on this channel so new work starts at once instead of at the next poll.
# An insert statement notifies once; an update notifies when work becomes due now and is not
# claimed (a cancel, a retry by hand), not on claims or on retries scheduled for later.
NOTIFY_DISPATCH_DUE = (
    """
    CREATE FUNCTION notify_dispatch_due() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('dispatch_due', '');
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER subscriptions_inserted_notify
        AFTER INSERT ON subscriptions
        FOR EACH STATEMENT EXECUTE FUNCTION notify_dispatch_due()
    """,
    """
    CREATE TRIGGER subscriptions_due_notify
        AFTER UPDATE ON subscriptions
        FOR EACH ROW
        WHEN (NEW.claim_token IS NULL AND NEW.next_attempt_at IS NOT NULL
              AND NEW.next_attempt_at IS DISTINCT FROM OLD.next_attempt_at
              AND NEW.next_attempt_at <= now())
        EXECUTE FUNCTION notify_dispatch_due()
    """,
)


def upgrade() -> None:
    op.create_table(
        "subscriptions",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("carrier_code", sa.Text(), nullable=False),
        sa.Column("tracking_number", sa.Text(), nullable=False),
        sa.Column("carrier_id", sa.Text(), nullable=True),
        sa.Column("reference", sa.Text(), nullable=True),
        sa.Column("metadata", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("status_code", sa.Text(), nullable=True),
        sa.Column("status_description", sa.Text(), nullable=True),
        sa.Column("estimated_delivery_date", sa.DateTime(timezone=True), nullable=True),
        sa.Column("actual_delivery_date", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_event_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claim_token", sa.UUID(), nullable=True),
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
            "(state IN ('pending', 'stopping')) = (next_attempt_at IS NOT NULL)",
            name=op.f("ck_subscriptions_due_work"),
        ),
        sa.CheckConstraint(
            "state IN ('pending', 'active', 'failed', 'stopping', 'stopped')",
            name=op.f("ck_subscriptions_state"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscriptions")),
    )
    op.create_index(
        "ix_subscriptions_due",
        "subscriptions",
        ["next_attempt_at"],
        unique=False,
        postgresql_where=sa.text("next_attempt_at IS NOT NULL"),
    )
    op.create_index(
        "ix_subscriptions_newest",
        "subscriptions",
        [sa.literal_column("created_at DESC"), sa.literal_column("id DESC")],
        unique=False,
    )
    op.create_index(
        "uq_subscriptions_live_package",
        "subscriptions",
        ["tracking_number", "carrier_code"],
        unique=True,
        postgresql_where=sa.text("state != 'stopped'"),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column(
            "received_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("headers", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("body_sha256", sa.LargeBinary(), nullable=False),
        sa.Column("resource_type", sa.Text(), nullable=True),
        sa.Column("carrier_code", sa.Text(), nullable=True),
        sa.Column("tracking_number", sa.Text(), nullable=True),
        sa.Column("subscription_id", sa.UUID(), nullable=True),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.CheckConstraint(
            "outcome IN ('filed', 'orphan')", name=op.f("ck_webhook_deliveries_outcome")
        ),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["subscriptions.id"],
            name=op.f("fk_webhook_deliveries_subscription_id_subscriptions"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
    )
    op.create_index(
        "ix_webhook_deliveries_subscription_id",
        "webhook_deliveries",
        ["subscription_id"],
        unique=False,
    )
    op.create_index(
        "ix_webhook_deliveries_tracking_number",
        "webhook_deliveries",
        ["tracking_number"],
        unique=False,
    )
    op.create_table(
        "tracking_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("subscription_id", sa.UUID(), nullable=False),
        sa.Column("event_key", sa.LargeBinary(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("carrier_occurred_at", sa.Text(), nullable=True),
        sa.Column("status_code", sa.Text(), nullable=True),
        sa.Column("event_code", sa.Text(), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("carrier_status_code", sa.Text(), nullable=True),
        sa.Column("carrier_detail_code", sa.Text(), nullable=True),
        sa.Column("status_detail_code", sa.Text(), nullable=True),
        sa.Column("city_locality", sa.Text(), nullable=True),
        sa.Column("state_province", sa.Text(), nullable=True),
        sa.Column("postal_code", sa.Text(), nullable=True),
        sa.Column("country_code", sa.Text(), nullable=True),
        sa.Column("company_name", sa.Text(), nullable=True),
        sa.Column("signer", sa.Text(), nullable=True),
        sa.Column("latitude", sa.Float(), nullable=True),
        sa.Column("longitude", sa.Float(), nullable=True),
        sa.Column("delivery_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "received_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["webhook_deliveries.id"],
            name=op.f("fk_tracking_events_delivery_id_webhook_deliveries"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["subscriptions.id"],
            name=op.f("fk_tracking_events_subscription_id_subscriptions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tracking_events")),
        sa.UniqueConstraint(
            "subscription_id",
            "event_key",
            name=op.f("uq_tracking_events_subscription_id_event_key"),
        ),
    )
    op.create_index(
        "ix_tracking_events_timeline",
        "tracking_events",
        [
            "subscription_id",
            sa.literal_column("occurred_at DESC NULLS LAST"),
            sa.literal_column("id DESC"),
        ],
        unique=False,
    )
    for statement in NOTIFY_DISPATCH_DUE:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TRIGGER subscriptions_due_notify ON subscriptions")
    op.execute("DROP TRIGGER subscriptions_inserted_notify ON subscriptions")
    op.execute("DROP FUNCTION notify_dispatch_due()")
    op.drop_index("ix_tracking_events_timeline", table_name="tracking_events")
    op.drop_table("tracking_events")
    op.drop_index("ix_webhook_deliveries_tracking_number", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_subscription_id", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_index(
        "uq_subscriptions_live_package",
        table_name="subscriptions",
        postgresql_where=sa.text("state != 'stopped'"),
    )
    op.drop_index("ix_subscriptions_newest", table_name="subscriptions")
    op.drop_index(
        "ix_subscriptions_due",
        table_name="subscriptions",
        postgresql_where=sa.text("next_attempt_at IS NOT NULL"),
    )
    op.drop_table("subscriptions")
