"""the change feed: an outbox of changes, in commit order

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 06:30:00

Each filing that changes what a caller sees writes a row of `changes` in its own transaction.
`txid` is the writing transaction's id: the feed is read in (txid, id) order, only below the
oldest transaction still running (`service/db/changes.py` says why that is gap-free). A
statement that inserts changes notifies `changes` with its transaction's id, so stream readers
wake at its commit. `changes_pruned` remembers how far retention deleted, so a cursor from
before that is told so instead of silently skipping what was pruned.

On subscriptions: `change_sequence`, the sequence of its latest change; `stale_noted_at`, when
its silence was last reported (once per silence). Dropped on downgrade, changes and all.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHANGE_TYPES = (
    "'subscription.active', 'subscription.failed', 'subscription.stopped', "
    "'tracking.status_changed', 'tracking.eta_changed', 'tracking.events_added', "
    "'tracking.stale'"
)

NOTIFY_CHANGES = (
    """
    CREATE FUNCTION notify_changes() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF EXISTS (SELECT FROM made) THEN
            PERFORM pg_notify('changes', CAST(pg_current_xact_id() AS text));
        END IF;
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER changes_inserted_notify
        AFTER INSERT ON changes
        REFERENCING NEW TABLE AS made
        FOR EACH STATEMENT EXECUTE FUNCTION notify_changes()
    """,
)


def upgrade() -> None:
    op.add_column(
        "subscriptions",
        sa.Column("change_sequence", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column(
        "subscriptions", sa.Column("stale_noted_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_table(
        "changes",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column(
            "txid",
            sa.BigInteger(),
            server_default=sa.text("CAST(CAST(pg_current_xact_id() AS text) AS bigint)"),
            nullable=False,
        ),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("subscription_id", sa.UUID(), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column(
            "occurred_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("status_code", sa.Text(), nullable=True),
        sa.Column("status_description", sa.Text(), nullable=True),
        sa.Column("estimated_delivery_date", sa.DateTime(timezone=True), nullable=True),
        sa.Column("actual_delivery_date", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_event_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("previous_status_code", sa.Text(), nullable=True),
        sa.Column("newest_event", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.CheckConstraint(f"type IN ({CHANGE_TYPES})", name=op.f("ck_changes_type")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_changes")),
    )
    op.create_index("ix_changes_position", "changes", ["txid", "id"], unique=True)
    op.create_index(
        "uq_changes_subscription_sequence", "changes", ["subscription_id", "sequence"], unique=True
    )
    op.create_index("ix_changes_occurred_at", "changes", ["occurred_at"], postgresql_using="brin")
    op.create_table(
        "changes_pruned",
        sa.Column("id", sa.SmallInteger(), server_default=sa.text("1"), nullable=False),
        sa.Column("txid", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("change_id", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_changes_pruned_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_changes_pruned")),
    )
    op.execute("INSERT INTO changes_pruned DEFAULT VALUES")
    for statement in NOTIFY_CHANGES:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TRIGGER changes_inserted_notify ON changes")
    op.execute("DROP FUNCTION notify_changes()")
    op.drop_table("changes_pruned")
    op.drop_index("ix_changes_occurred_at", table_name="changes", postgresql_using="brin")
    op.drop_index("uq_changes_subscription_sequence", table_name="changes")
    op.drop_index("ix_changes_position", table_name="changes")
    op.drop_table("changes")
    op.drop_column("subscriptions", "stale_noted_at")
    op.drop_column("subscriptions", "change_sequence")
