"""notification delivery: each endpoint's place in the feed, its queue, and every attempt

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-08 09:00:00

The sender (`service/notify/`) copies the changes an endpoint wants from the change feed into
its queue, `notify_messages`, as it follows the feed from `notify_cursors`. A queue holds a
lane per subscription (`notify_lanes`): only a lane's oldest message is sent, so one package's
changes arrive in order while the others' go on; the lane carries the retry state and the
lease of whoever is sending it. Every attempt is kept in `notify_attempts`.

On endpoints: `paused_until` (a 429 or 503 with Retry-After), `next_send_at` (the spacing of
`rate_limit_per_s`, shared by every worker). Endpoints that exist already start at the feed's
current edge. Dropped on downgrade, queues and attempts with them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_EDGE = (
    "CAST(CAST(pg_snapshot_xmin(pg_current_snapshot()) AS text) AS bigint) - 1, 9223372036854775807"
)


def _endpoint_id() -> sa.Column[object]:
    return sa.Column(
        "endpoint_id",
        sa.UUID(),
        sa.ForeignKey("notify_endpoints.id", ondelete="CASCADE"),
        nullable=False,
    )


def _now(name: str) -> sa.Column[object]:
    return sa.Column(
        name, sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
    )


def upgrade() -> None:
    op.add_column("notify_endpoints", sa.Column("paused_until", sa.DateTime(timezone=True)))
    op.add_column("notify_endpoints", sa.Column("next_send_at", sa.DateTime(timezone=True)))
    op.create_table(
        "notify_cursors",
        _endpoint_id(),
        sa.Column("txid", sa.BigInteger(), nullable=False),
        sa.Column("change_id", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("endpoint_id", name=op.f("pk_notify_cursors")),
    )
    op.execute(
        f"INSERT INTO notify_cursors (endpoint_id, txid, change_id) "
        f"SELECT id, {_EDGE} FROM notify_endpoints"
    )
    op.create_table(
        "notify_messages",
        _endpoint_id(),
        sa.Column("change_id", sa.BigInteger(), nullable=False),
        sa.Column("subscription_id", sa.UUID(), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        _now("queued_at"),
        sa.PrimaryKeyConstraint("endpoint_id", "change_id", name=op.f("pk_notify_messages")),
    )
    op.create_index(
        "ix_notify_messages_lane",
        "notify_messages",
        ["endpoint_id", "subscription_id", "sequence"],
    )
    op.create_table(
        "notify_lanes",
        _endpoint_id(),
        sa.Column("subscription_id", sa.UUID(), nullable=False),
        sa.Column("pending", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claim_token", sa.UUID()),
        sa.CheckConstraint("pending >= 0", name=op.f("ck_notify_lanes_pending")),
        sa.PrimaryKeyConstraint("endpoint_id", "subscription_id", name=op.f("pk_notify_lanes")),
    )
    op.create_index("ix_notify_lanes_due", "notify_lanes", ["endpoint_id", "next_attempt_at"])
    op.create_table(
        "notify_attempts",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        _endpoint_id(),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("subscription_id", sa.UUID()),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("status_code", sa.Integer()),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("response", sa.Text()),
        _now("attempted_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notify_attempts")),
    )
    op.create_index("ix_notify_attempts_endpoint", "notify_attempts", ["endpoint_id", "id"])
    op.create_index(
        "ix_notify_attempts_attempted_at",
        "notify_attempts",
        ["attempted_at"],
        postgresql_using="brin",
    )


def downgrade() -> None:
    op.drop_table("notify_attempts")
    op.drop_table("notify_lanes")
    op.drop_table("notify_messages")
    op.drop_table("notify_cursors")
    op.drop_column("notify_endpoints", "next_send_at")
    op.drop_column("notify_endpoints", "paused_until")
