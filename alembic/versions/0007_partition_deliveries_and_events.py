"""partition deliveries by week and events by their subscription's month

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 19:20:00

Both tables are rebuilt as partitioned tables with their rows and ids: the old one is set
aside (renamed, its schema-wide names freed), the new one created with a DEFAULT partition and
one partition per period from the oldest row to two periods ahead, the rows copied, the
identity continued past the highest id, and the old table dropped. Deliveries are no longer
the target of foreign keys: they are kept for less time than the events and status changes
that name them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DELIVERY_COLUMNS = (
    "id, received_at, headers, body, body_sha256, resource_type, carrier_code, tracking_number, "
    "subscription_id, outcome, content_sha256, source, verification, refusal"
)
EVENT_COLUMNS = (
    "id, subscription_id, event_key, occurred_at, carrier_occurred_at, status_code, event_code, "
    "description, carrier_status_code, carrier_detail_code, status_detail_code, city_locality, "
    "state_province, postal_code, country_code, company_name, signer, latitude, longitude, "
    "delivery_id, received_at"
)
RECEIVED_WEEK = "(date_trunc('week', now() AT TIME ZONE 'UTC'))::date"
DELIVERY_INDEXES = (
    "ix_webhook_deliveries_tracking_number",
    "ix_webhook_deliveries_subscription_id",
    "ix_webhook_deliveries_received_at",
    "uq_webhook_deliveries_content",
)


def upgrade() -> None:
    op.drop_constraint(
        "fk_status_changes_delivery_id_webhook_deliveries", "status_changes", type_="foreignkey"
    )
    _set_aside(
        "tracking_events",
        "uq_tracking_events_subscription_id_event_key",
        ["ix_tracking_events_timeline"],
    )
    _set_aside("webhook_deliveries", None, DELIVERY_INDEXES)
    _create_deliveries(partitioned=True)
    _create_events(partitioned=True)
    _create_partitions()
    op.execute(
        f"INSERT INTO webhook_deliveries ({DELIVERY_COLUMNS}, received_week) "
        f"SELECT {DELIVERY_COLUMNS}, (date_trunc('week', received_at AT TIME ZONE 'UTC'))::date "
        "FROM webhook_deliveries_before"
    )
    prefixed = ", ".join(f"e.{column.strip()}" for column in EVENT_COLUMNS.split(","))
    op.execute(
        f"INSERT INTO tracking_events ({EVENT_COLUMNS}, subscription_created_at) "
        f"SELECT {prefixed}, s.created_at FROM tracking_events_before AS e "
        "JOIN subscriptions AS s ON s.id = e.subscription_id"
    )
    _finish("webhook_deliveries")
    _finish("tracking_events")


def downgrade() -> None:
    _set_aside("tracking_events", "uq_tracking_events_event", ["ix_tracking_events_timeline"])
    _set_aside("webhook_deliveries", None, DELIVERY_INDEXES)
    _create_deliveries(partitioned=False)
    _create_events(partitioned=False)
    # Dedup was per week: a content stored as an original in two weeks is one original again.
    op.execute(
        f"""
        INSERT INTO webhook_deliveries ({DELIVERY_COLUMNS})
        SELECT {
            DELIVERY_COLUMNS.replace(
                "outcome", "CASE WHEN first_of_content THEN outcome ELSE 'duplicate' END"
            )
        }
        FROM (SELECT *, outcome NOT IN ('filed', 'orphan') OR row_number() OVER (
                  PARTITION BY content_sha256, outcome IN ('filed', 'orphan') ORDER BY id
              ) = 1 AS first_of_content
              FROM webhook_deliveries_before) AS d
        """
    )
    op.execute(
        f"INSERT INTO tracking_events ({EVENT_COLUMNS}) "
        f"SELECT {EVENT_COLUMNS} FROM tracking_events_before AS e "
        "WHERE e.delivery_id IS NULL OR EXISTS "
        "(SELECT 1 FROM webhook_deliveries AS d WHERE d.id = e.delivery_id)"
    )
    op.execute(
        "UPDATE status_changes AS c SET delivery_id = NULL WHERE c.delivery_id IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM webhook_deliveries AS d WHERE d.id = c.delivery_id)"
    )
    _finish("webhook_deliveries")
    _finish("tracking_events")
    op.create_foreign_key(
        "fk_status_changes_delivery_id_webhook_deliveries",
        "status_changes",
        "webhook_deliveries",
        ["delivery_id"],
        ["id"],
        ondelete="SET NULL",
    )


def _set_aside(table: str, unique: str | None, indexes: Sequence[str]) -> None:
    """Rename the table to `<table>_before` and free the names a new one needs."""
    op.rename_table(table, f"{table}_before")
    before = f"{table}_before"
    op.execute(f"ALTER TABLE {before} DROP CONSTRAINT pk_{table} CASCADE")
    if unique is not None:
        op.execute(f"ALTER TABLE {before} DROP CONSTRAINT {unique}")
    for index in indexes:
        op.execute(f"DROP INDEX {index}")
    op.execute(f"ALTER TABLE {before} ALTER COLUMN id DROP IDENTITY")


def _finish(table: str) -> None:
    """Continue the identity past the rows copied, and drop the old table."""
    op.execute(
        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
        f"(SELECT max(id) FROM {table}_before)) WHERE EXISTS (SELECT 1 FROM {table}_before)"
    )
    op.drop_table(f"{table}_before")


def _create_deliveries(*, partitioned: bool) -> None:
    week = (
        [
            sa.Column(
                "received_week", sa.Date(), server_default=sa.text(RECEIVED_WEEK), nullable=False
            )
        ]
        if partitioned
        else []
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
        *week,
        sa.Column("headers", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("body_sha256", sa.LargeBinary(), nullable=False),
        sa.Column("resource_type", sa.Text(), nullable=True),
        sa.Column("carrier_code", sa.Text(), nullable=True),
        sa.Column("tracking_number", sa.Text(), nullable=True),
        sa.Column("subscription_id", sa.UUID(), nullable=True),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("content_sha256", sa.LargeBinary(), nullable=True),
        sa.Column("source", sa.Text(), server_default="webhook", nullable=False),
        sa.Column("verification", sa.Text(), server_default="skipped", nullable=False),
        sa.Column("refusal", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "outcome IN ('filed', 'orphan', 'duplicate', 'refused')",
            name=op.f("ck_webhook_deliveries_outcome"),
        ),
        sa.CheckConstraint(
            "source IN ('webhook', 'poll')", name=op.f("ck_webhook_deliveries_source")
        ),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["subscriptions.id"],
            name=op.f("fk_webhook_deliveries_subscription_id_subscriptions"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint(
            "id", *(["received_week"] if partitioned else []), name=op.f("pk_webhook_deliveries")
        ),
        **({"postgresql_partition_by": "RANGE (received_week)"} if partitioned else {}),
    )
    for column in ("tracking_number", "subscription_id", "received_at"):
        op.create_index(f"ix_webhook_deliveries_{column}", "webhook_deliveries", [column])
    op.create_index(
        "uq_webhook_deliveries_content",
        "webhook_deliveries",
        ["content_sha256", *(["received_week"] if partitioned else [])],
        unique=True,
        postgresql_where=sa.text("outcome IN ('filed', 'orphan')"),
    )


def _create_events(*, partitioned: bool) -> None:
    created = (
        [sa.Column("subscription_created_at", sa.DateTime(timezone=True), nullable=False)]
        if partitioned
        else []
    )
    delivery_fk = (
        []
        if partitioned
        else [
            sa.ForeignKeyConstraint(
                ["delivery_id"],
                ["webhook_deliveries.id"],
                name=op.f("fk_tracking_events_delivery_id_webhook_deliveries"),
                ondelete="SET NULL",
            )
        ]
    )
    key = ["subscription_created_at"] if partitioned else []
    op.create_table(
        "tracking_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("subscription_id", sa.UUID(), nullable=False),
        *created,
        sa.Column("event_key", sa.LargeBinary(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=True),
        *(
            sa.Column(name, sa.Text(), nullable=True)
            for name in (
                "carrier_occurred_at",
                "status_code",
                "event_code",
                "description",
                "carrier_status_code",
                "carrier_detail_code",
                "status_detail_code",
                "city_locality",
                "state_province",
                "postal_code",
                "country_code",
                "company_name",
                "signer",
            )
        ),
        sa.Column("latitude", sa.Float(), nullable=True),
        sa.Column("longitude", sa.Float(), nullable=True),
        sa.Column("delivery_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "received_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        *delivery_fk,
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["subscriptions.id"],
            name=op.f("fk_tracking_events_subscription_id_subscriptions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", *key, name=op.f("pk_tracking_events")),
        sa.UniqueConstraint(
            "subscription_id",
            "event_key",
            *key,
            name="uq_tracking_events_event"
            if partitioned
            else op.f("uq_tracking_events_subscription_id_event_key"),
        ),
        **({"postgresql_partition_by": "RANGE (subscription_created_at)"} if partitioned else {}),
    )
    op.create_index(
        "ix_tracking_events_timeline",
        "tracking_events",
        [
            "subscription_id",
            sa.literal_column("occurred_at DESC NULLS LAST"),
            sa.literal_column("id DESC"),
        ],
    )


def _create_partitions() -> None:
    """A DEFAULT partition each, and one per period from the oldest row to two periods ahead
    (the service keeps creating them ahead: service/db/partitions.py)."""
    op.execute(
        """
        DO $$
        DECLARE
            start date;
        BEGIN
            CREATE TABLE webhook_deliveries_default PARTITION OF webhook_deliveries DEFAULT;
            CREATE TABLE tracking_events_default PARTITION OF tracking_events DEFAULT;
            FOR start IN
                SELECT generate_series(
                    date_trunc('week', least(
                        (SELECT min(received_at) FROM webhook_deliveries_before), now()
                    ) AT TIME ZONE 'UTC'),
                    date_trunc('week', now() AT TIME ZONE 'UTC') + interval '2 weeks',
                    interval '1 week')::date
            LOOP
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF webhook_deliveries FOR VALUES FROM (%L) TO (%L)',
                    'webhook_deliveries_' || to_char(start, 'YYYYMMDD'), start, start + 7);
            END LOOP;
            FOR start IN
                SELECT generate_series(
                    date_trunc('month', least(
                        (SELECT min(s.created_at) FROM tracking_events_before AS e
                         JOIN subscriptions AS s ON s.id = e.subscription_id), now()
                    ) AT TIME ZONE 'UTC'),
                    date_trunc('month', now() AT TIME ZONE 'UTC') + interval '2 months',
                    interval '1 month')::date
            LOOP
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF tracking_events FOR VALUES FROM (%L) TO (%L)',
                    'tracking_events_' || to_char(start, 'YYYYMMDD'),
                    start::text || ' 00:00:00+00',
                    (start + interval '1 month')::date::text || ' 00:00:00+00');
            END LOOP;
        END
        $$
        """
    )
