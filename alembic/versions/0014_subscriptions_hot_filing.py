"""filing's update of a subscription can stay on its page (a HOT update)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-10 09:00:00

Every filing sets `last_heard_at`, and the reconciler's index of watched subscriptions was
keyed on it: no filing update could be HOT, so each wrote an entry into every index a live
subscription is in (five) and left as many dead ones for vacuum (0 HOT updates of 11,994 in a
benchmark's database). What the index's readers use is the watched set, its predicate: their
conditions on a package's silence are expressions of `last_heard_at`, `last_polled_at` and
`created_at` that no index on one column serves. Keyed on `created_at`, which never changes,
it holds the same set. A fillfactor of 80 leaves room on each page for the new versions
(pages written from now on; a table rewritten by VACUUM FULL or pg_repack gets it whole).

The index is built in place, locking out writes for the build: on a large table, build the
new one CONCURRENTLY under another name before this runs, drop the old, and rename.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_WATCHED = sa.text("state = 'active' AND done_at IS NULL")


def upgrade() -> None:
    op.drop_index("ix_subscriptions_watched", table_name="subscriptions")
    op.create_index(
        "ix_subscriptions_watched", "subscriptions", ["created_at"], postgresql_where=_WATCHED
    )
    op.execute("ALTER TABLE subscriptions SET (fillfactor = 80)")


def downgrade() -> None:
    op.execute("ALTER TABLE subscriptions RESET (fillfactor)")
    op.drop_index("ix_subscriptions_watched", table_name="subscriptions")
    op.create_index(
        "ix_subscriptions_watched", "subscriptions", ["last_heard_at"], postgresql_where=_WATCHED
    )
