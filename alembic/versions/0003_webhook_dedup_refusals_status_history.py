"""webhook dedup, refusals, status history, re-arms

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 16:41:42.596794
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

OLD_DUE_WORK = "(state IN ('pending', 'stopping')) = (next_attempt_at IS NOT NULL)"
# An active subscription may now have a call due: the restart of tracking after an EX.
NEW_DUE_WORK = (
    "(state NOT IN ('pending', 'stopping') OR next_attempt_at IS NOT NULL) "
    "AND (state NOT IN ('failed', 'stopped') OR next_attempt_at IS NULL)"
)
OLD_OUTCOMES = "outcome IN ('filed', 'orphan')"
NEW_OUTCOMES = "outcome IN ('filed', 'orphan', 'duplicate', 'refused')"

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "status_changes",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("subscription_id", sa.UUID(), nullable=False),
        sa.Column("previous_status_code", sa.Text(), nullable=True),
        sa.Column("status_code", sa.Text(), nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "learned_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("delivery_id", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["webhook_deliveries.id"],
            name=op.f("fk_status_changes_delivery_id_webhook_deliveries"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["subscriptions.id"],
            name=op.f("fk_status_changes_subscription_id_subscriptions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_status_changes")),
    )
    op.create_index(
        "ix_status_changes_subscription", "status_changes", ["subscription_id", "id"], unique=False
    )
    op.add_column(
        "subscriptions",
        sa.Column("rearms", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column(
        "subscriptions", sa.Column("last_heard_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("subscriptions", sa.Column("done_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "webhook_deliveries", sa.Column("content_sha256", sa.LargeBinary(), nullable=True)
    )
    op.add_column(
        "webhook_deliveries",
        sa.Column("source", sa.Text(), server_default="webhook", nullable=False),
    )
    op.add_column(
        "webhook_deliveries",
        sa.Column("verification", sa.Text(), server_default="skipped", nullable=False),
    )
    op.add_column("webhook_deliveries", sa.Column("refusal", sa.Text(), nullable=True))
    op.create_index(
        "ix_webhook_deliveries_received_at", "webhook_deliveries", ["received_at"], unique=False
    )
    op.create_index(
        "uq_webhook_deliveries_content",
        "webhook_deliveries",
        ["content_sha256"],
        unique=True,
        postgresql_where=sa.text("outcome IN ('filed', 'orphan')"),
    )
    op.create_check_constraint(
        op.f("ck_webhook_deliveries_source"), "webhook_deliveries", "source IN ('webhook', 'poll')"
    )
    _replace_check("webhook_deliveries", "outcome", NEW_OUTCOMES)
    _replace_check("subscriptions", "due_work", NEW_DUE_WORK)


def downgrade() -> None:
    # Rows the new rules allow and the old ones do not are brought back within the old rules.
    op.execute("DELETE FROM webhook_deliveries WHERE outcome IN ('duplicate', 'refused')")
    op.execute("UPDATE subscriptions SET next_attempt_at = NULL WHERE state = 'active'")
    _replace_check("subscriptions", "due_work", OLD_DUE_WORK)
    _replace_check("webhook_deliveries", "outcome", OLD_OUTCOMES)
    op.drop_constraint(op.f("ck_webhook_deliveries_source"), "webhook_deliveries", type_="check")
    op.drop_index(
        "uq_webhook_deliveries_content",
        table_name="webhook_deliveries",
        postgresql_where=sa.text("outcome IN ('filed', 'orphan')"),
    )
    op.drop_index("ix_webhook_deliveries_received_at", table_name="webhook_deliveries")
    op.drop_column("webhook_deliveries", "refusal")
    op.drop_column("webhook_deliveries", "verification")
    op.drop_column("webhook_deliveries", "source")
    op.drop_column("webhook_deliveries", "content_sha256")
    op.drop_column("subscriptions", "done_at")
    op.drop_column("subscriptions", "last_heard_at")
    op.drop_column("subscriptions", "rearms")
    op.drop_index("ix_status_changes_subscription", table_name="status_changes")
    op.drop_table("status_changes")


def _replace_check(table: str, name: str, condition: str) -> None:
    constraint = op.f(f"ck_{table}_{name}")
    op.drop_constraint(constraint, table, type_="check")
    op.create_check_constraint(constraint, table, condition)
