"""ops views and manual pauses

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 17:02:48.721258
"""

from collections.abc import Sequence

from alembic import op

OLD_KINDS = "pause_kind IN ('rate_limit', 'account')"
NEW_KINDS = "pause_kind IN ('rate_limit', 'account', 'manual')"

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    _replace_kinds(NEW_KINDS)
    op.create_index(
        "ix_subscriptions_state_created", "subscriptions", ["state", "created_at"], unique=False
    )


def downgrade() -> None:
    op.execute(
        "UPDATE dispatch_control SET pause_kind = NULL, paused_until = NULL, pause_reason = NULL "
        "WHERE pause_kind = 'manual'"
    )
    _replace_kinds(OLD_KINDS)
    op.drop_index("ix_subscriptions_state_created", table_name="subscriptions")


def _replace_kinds(condition: str) -> None:
    name = op.f("ck_dispatch_control_pause_kind")
    op.drop_constraint(name, "dispatch_control", type_="check")
    op.create_check_constraint(name, "dispatch_control", condition)
