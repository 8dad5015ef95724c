"""The schema, as SQLAlchemy Core tables. Alembic's migrations must agree (`alembic check`)."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from service.domain.changes import ChangeType
from service.domain.deliveries import ORIGINAL_OUTCOMES, DeliveryOutcome
from service.domain.endpoints import EndpointState
from service.domain.subscriptions import SubscriptionState
from service.domain.tracking import EVENT_FIELD_TYPES

# A PostgreSQL bigint's largest value: a larger id names no row (and no query takes it).
BIGINT_MAX = 2**63 - 1

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def _quoted(values: Iterable[enum.StrEnum]) -> str:
    """Values as a list of SQL literals, for an IN (...) of a constraint or a predicate."""
    return ", ".join(f"'{value.value}'" for value in values)


_STATES = _quoted(SubscriptionState)


def _event_columns() -> list[sa.Column[object]]:
    """A column for each field of TrackEvent, the one declaration of an event, in its order."""
    return [_event_column(name, hint) for name, hint in EVENT_FIELD_TYPES.items()]


def _event_column(name: str, hint: object) -> sa.Column[object]:
    if hint == (datetime | None):
        return _timestamp(name)
    if hint == (float | None):
        return sa.Column(name, sa.Float)
    if hint == (str | None):
        return sa.Column(name, sa.Text)
    raise TypeError(f"TrackEvent.{name}: no column type for {hint}")


def _timestamp(name: str, *, nullable: bool = True) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _created_at() -> sa.Column[object]:
    return sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    )


def _shown() -> list[sa.Column[object]]:
    """What a subscription shows that changes: kept by it, and by each change as of then."""
    return [
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("status_code", sa.Text),
        sa.Column("status_description", sa.Text),
        _timestamp("estimated_delivery_date"),
        _timestamp("actual_delivery_date"),
        _timestamp("last_event_at"),
        sa.Column("last_error", pg.JSONB(none_as_null=True)),
    ]


# A call is always due in pending and stopping, never in failed and stopped; in active only to
# restart tracking after an EX.
DUE_WORK = (
    "(state NOT IN ('pending', 'stopping') OR next_attempt_at IS NOT NULL) "
    "AND (state NOT IN ('failed', 'stopped') OR next_attempt_at IS NULL)"
)

subscriptions = sa.Table(
    "subscriptions",
    metadata,
    sa.Column(
        "id", pg.UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")
    ),
    sa.Column("carrier_code", sa.Text, nullable=False),
    sa.Column("tracking_number", sa.Text, nullable=False),
    sa.Column("carrier_id", sa.Text),
    sa.Column("reference", sa.Text),
    sa.Column("metadata", pg.JSONB(none_as_null=True)),
    *_shown(),
    # The API client whose token created it.
    sa.Column("created_by", sa.Text),
    # Dispatch bookkeeping. `next_attempt_at` is when the row's pending ShipEngine call is due
    # (NULL: nothing to send). A claim pushes it forward by the lease and stamps `claim_token`;
    # only the holder of the token may record the outcome.
    sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
    # Tracking restarted after an EX (ShipEngine stops on EX by itself), so far.
    sa.Column("rearms", sa.Integer, nullable=False, server_default=sa.text("0")),
    # When a webhook or a poll last told us anything about the package.
    _timestamp("last_heard_at"),
    # Delivered (DE/SP) long enough ago: no polls, no re-arms, nothing more to spend.
    _timestamp("done_at"),
    # When the reconciler last asked ShipEngine about it (GET /v1/tracking).
    _timestamp("last_polled_at"),
    _timestamp("next_attempt_at"),
    sa.Column("claim_token", pg.UUID(as_uuid=True)),
    # The change feed: the sequence of the subscription's latest change (its first is 1), and
    # when its silence was last reported (`tracking.stale`, once per silence).
    sa.Column("change_sequence", sa.Integer, nullable=False, server_default=sa.text("0")),
    _timestamp("stale_noted_at"),
    _created_at(),
    sa.Column(
        "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.CheckConstraint(f"state IN ({_STATES})", name="state"),
    sa.CheckConstraint(DUE_WORK, name="due_work"),
    # Room on each page for a filing's new version of a row, so that it stays there (HOT) and
    # writes no index entry: filing changes no indexed column (migration 0014).
    postgresql_with={"fillfactor": 80},
)

# The predicates that queries share with the partial indexes below, each as a Core expression
# and as SQL text: ON CONFLICT names a partial index by its predicate, with literals (PostgreSQL
# cannot match a bound parameter once the plan is generic), and the fixed statements of
# `sql/*.sql` spell them out (`tests/test_named_sql.py` holds them to these).
# A live subscription: any but a stopped one.
LIVE = subscriptions.c.state != SubscriptionState.STOPPED.value
LIVE_SQL = f"state <> '{SubscriptionState.STOPPED.value}'"
# An active subscription not yet done: its package may still change. The reconciler watches
# it; filing may restart its tracking after an EX.
WATCHED = sa.and_(
    subscriptions.c.state == SubscriptionState.ACTIVE.value, subscriptions.c.done_at.is_(None)
)
WATCHED_SQL = f"state = '{SubscriptionState.ACTIVE.value}' AND done_at IS NULL"

# One live subscription per package; stopped ones may repeat. Leading with the tracking
# number also serves webhook matching, where the carrier code can be missing.
sa.Index(
    "uq_subscriptions_live_package",
    subscriptions.c.tracking_number,
    subscriptions.c.carrier_code,
    unique=True,
    postgresql_where=LIVE,
)
sa.Index("ix_subscriptions_newest", subscriptions.c.created_at.desc(), subscriptions.c.id.desc())
# The dispatch queue: only rows with work are in it, so claims stay fast at any table size.
sa.Index(
    "ix_subscriptions_due",
    subscriptions.c.next_attempt_at,
    postgresql_where=subscriptions.c.next_attempt_at.is_not(None),
)

# Ops views by state: stuck pending ones, failed ones.
sa.Index("ix_subscriptions_state_created", subscriptions.c.state, subscriptions.c.created_at)
# What the reconciler watches: active subscriptions that may still change. Its readers use the
# set; keyed on `last_heard_at`, which every filing sets, it made every filing's update write an
# entry into each of the table's indexes (migration 0014).
sa.Index("ix_subscriptions_watched", subscriptions.c.created_at, postgresql_where=WATCHED)

# Partitioned by week received (`service/db/partitions.py` creates them ahead and drops them
# past DELIVERY_RETENTION_DAYS). The week is a column of its own because a unique index of a
# partitioned table must hold the partition key: content dedup works within a week, and a
# copy that comes a week later is filed again, which filing's idempotence makes harmless.
RECEIVED_WEEK = "(date_trunc('week', now() AT TIME ZONE 'UTC'))::date"

webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
    sa.Column(
        "received_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column("received_week", sa.Date, nullable=False, server_default=sa.text(RECEIVED_WEEK)),
    sa.Column("headers", pg.JSONB, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("body_sha256", sa.LargeBinary, nullable=False),
    sa.Column("resource_type", sa.Text),
    sa.Column("carrier_code", sa.Text),
    sa.Column("tracking_number", sa.Text),
    sa.Column(
        "subscription_id",
        pg.UUID(as_uuid=True),
        sa.ForeignKey("subscriptions.id", ondelete="SET NULL"),
    ),
    sa.Column("outcome", sa.Text, nullable=False),
    # What we learned, normalised: the same state sent again (a retry, a re-serialised copy,
    # a poll that found nothing new) hashes the same and is kept as a duplicate.
    sa.Column("content_sha256", sa.LargeBinary),
    # webhook: ShipEngine pushed it; poll: the reconciler fetched it with GET /v1/tracking.
    sa.Column("source", sa.Text, nullable=False, server_default="webhook"),
    # verified, skipped (WEBHOOK_VERIFY=false), not_applicable (polls), or why it was refused.
    sa.Column("verification", sa.Text, nullable=False, server_default="skipped"),
    sa.Column("refusal", sa.Text),
    sa.PrimaryKeyConstraint("id", "received_week"),
    sa.CheckConstraint(f"outcome IN ({_quoted(DeliveryOutcome)})", name="outcome"),
    sa.CheckConstraint("source IN ('webhook', 'poll')", name="source"),
    postgresql_partition_by="RANGE (received_week)",
)
sa.Index("ix_webhook_deliveries_tracking_number", webhook_deliveries.c.tracking_number)
sa.Index("ix_webhook_deliveries_subscription_id", webhook_deliveries.c.subscription_id)
sa.Index("ix_webhook_deliveries_received_at", webhook_deliveries.c.received_at)
# An original delivery, the first of its content in its week (`ORIGINAL_OUTCOMES`); as SQL
# text, as `LIVE_SQL` is.
ORIGINAL = webhook_deliveries.c.outcome.in_([outcome.value for outcome in ORIGINAL_OUTCOMES])
ORIGINAL_SQL = f"outcome IN ({_quoted(ORIGINAL_OUTCOMES)})"

# One original per content (and week); later copies are inserted as duplicates, recognised by
# this index before any subscription row is locked.
sa.Index(
    "uq_webhook_deliveries_content",
    webhook_deliveries.c.content_sha256,
    webhook_deliveries.c.received_week,
    unique=True,
    postgresql_where=ORIGINAL,
)

# Refused requests counted but not stored (no signature headers, or past the sample of
# WEBHOOK_REFUSAL_SAMPLE_PER_MINUTE): each API process adds its counts every few seconds.
webhook_refusal_counts = sa.Table(
    "webhook_refusal_counts",
    metadata,
    sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("unstored", sa.BigInteger, nullable=False),
    sa.PrimaryKeyConstraint("minute", "reason"),
)

# Partitioned by when their subscription was created: a subscription's events share one
# partition, so its dedup key stays in one index and its history is dropped whole, after
# EVENT_RETENTION_DAYS. (By `occurred_at` the key could be NULL or far in the past.)
tracking_events = sa.Table(
    "tracking_events",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
    sa.Column(
        "subscription_id",
        pg.UUID(as_uuid=True),
        sa.ForeignKey("subscriptions.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("subscription_created_at", sa.DateTime(timezone=True), nullable=False),
    # A digest of the event's identifying fields: the same event in a later delivery (every
    # delivery repeats the whole history) collides here and is stored once.
    sa.Column("event_key", sa.LargeBinary, nullable=False),
    *_event_columns(),
    # The delivery that first told us; no foreign key, as deliveries are kept shorter.
    sa.Column("delivery_id", sa.BigInteger),
    sa.Column(
        "received_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.PrimaryKeyConstraint("id", "subscription_created_at"),
    sa.UniqueConstraint(
        "subscription_id", "event_key", "subscription_created_at", name="uq_tracking_events_event"
    ),
    postgresql_partition_by="RANGE (subscription_created_at)",
)
sa.Index(
    "ix_tracking_events_timeline",
    tracking_events.c.subscription_id,
    tracking_events.c.occurred_at.desc().nulls_last(),
    tracking_events.c.id.desc(),
)

# Every ShipEngine call a dispatcher made, with what came of it: the answer to "what happened
# when we tried?" (GET /v1/subscriptions/{id}/attempts).
dispatch_attempts = sa.Table(
    "dispatch_attempts",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column(
        "subscription_id",
        pg.UUID(as_uuid=True),
        sa.ForeignKey("subscriptions.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("operation", sa.Text, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    _timestamp("started_at", nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("http_status", sa.Integer),
    sa.Column("request_id", sa.Text),
    sa.Column("error_code", sa.Text),
    sa.Column("errors", pg.JSONB(none_as_null=True)),
    sa.Column("message", sa.Text),
    # The claim had expired when the outcome came back: another dispatcher owns the row now,
    # so this outcome was kept here but not applied.
    sa.Column("claim_lost", sa.Boolean, nullable=False, server_default=sa.false()),
)
sa.Index(
    "ix_dispatch_attempts_subscription",
    dispatch_attempts.c.subscription_id,
    dispatch_attempts.c.id.desc(),
)

# One row: what every dispatcher of every instance shares. The rate budget is a token bucket
# (tokens refill at the account's rate); a pause stops all claiming until `paused_until`.
dispatch_control = sa.Table(
    "dispatch_control",
    metadata,
    sa.Column("id", sa.SmallInteger, primary_key=True, server_default=sa.text("1")),
    sa.Column("tokens", sa.Float, nullable=False, server_default=sa.text("0")),
    sa.Column(
        "refilled_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    _timestamp("paused_until"),
    sa.Column("pause_kind", sa.Text),
    sa.Column("pause_reason", pg.JSONB(none_as_null=True)),
    sa.CheckConstraint("id = 1", name="single_row"),
    sa.CheckConstraint("pause_kind IN ('rate_limit', 'account', 'manual')", name="pause_kind"),
)

# Every change of a subscription's status: when it happened at the carrier, when we learned it.
status_changes = sa.Table(
    "status_changes",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column(
        "subscription_id",
        pg.UUID(as_uuid=True),
        sa.ForeignKey("subscriptions.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("previous_status_code", sa.Text),
    sa.Column("status_code", sa.Text),
    _timestamp("occurred_at"),
    sa.Column(
        "learned_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    # No foreign key: deliveries are kept shorter than the history they made.
    sa.Column("delivery_id", sa.BigInteger),
)
sa.Index("ix_status_changes_subscription", status_changes.c.subscription_id, status_changes.c.id)

# API tokens of named clients; the secret is kept only as its SHA-256.
api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("token_id", sa.Text, primary_key=True),
    sa.Column("client", sa.Text, nullable=False),
    sa.Column("scopes", pg.ARRAY(sa.Text), nullable=False),
    sa.Column("secret_sha256", sa.LargeBinary, nullable=False),
    _created_at(),
    _timestamp("revoked_at"),
)

# Dashboard sessions, named by a random id that only the browser's cookie holds: the row keeps
# its SHA-256. The CSRF token is kept as is, since every page renders it into its forms; it
# opens nothing without the session cookie. `flash` is a message for the next page shown.
dashboard_sessions = sa.Table(
    "dashboard_sessions",
    metadata,
    sa.Column("id_sha256", sa.LargeBinary, primary_key=True),
    sa.Column(
        "token_id",
        sa.Text,
        sa.ForeignKey("api_tokens.token_id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("csrf_token", sa.Text, nullable=False),
    sa.Column("flash", sa.Text),
    _timestamp("expires_at", nullable=False),
    _created_at(),
)
sa.Index("ix_dashboard_sessions_token_id", dashboard_sessions.c.token_id)
sa.Index("ix_dashboard_sessions_expires_at", dashboard_sessions.c.expires_at)

# The change feed (`service/db/changes.py`): what each change left its subscription showing
# (the rest of a subscription never changes), in the order the changes committed. No foreign
# key: subscriptions are never deleted, and its check would cost filing a lookup per change.
changes = sa.Table(
    "changes",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    # The writing transaction's id: the feed's order (`changes.py` says why).
    sa.Column(
        "txid",
        sa.BigInteger,
        nullable=False,
        server_default=sa.text("CAST(CAST(pg_current_xact_id() AS text) AS bigint)"),
    ),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("subscription_id", pg.UUID(as_uuid=True), nullable=False),
    sa.Column("sequence", sa.Integer, nullable=False),
    sa.Column(
        "occurred_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    *_shown(),
    sa.Column("previous_status_code", sa.Text),
    sa.Column("newest_event", pg.JSONB(none_as_null=True)),
    sa.CheckConstraint(f"type IN ({_quoted(ChangeType)})", name="type"),
)
sa.Index("ix_changes_position", changes.c.txid, changes.c.id, unique=True)
sa.Index(
    "uq_changes_subscription_sequence", changes.c.subscription_id, changes.c.sequence, unique=True
)
# Retention deletes by age: a BRIN index is tiny, and rows arrive in about that order.
sa.Index("ix_changes_occurred_at", changes.c.occurred_at, postgresql_using="brin")

# One row: the position of the newest change retention deleted (0, 0: none yet).
changes_pruned = sa.Table(
    "changes_pruned",
    metadata,
    sa.Column("id", sa.SmallInteger, primary_key=True, server_default=sa.text("1")),
    sa.Column("txid", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("change_id", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    sa.CheckConstraint("id = 1", name="single_row"),
)

# Where consumers want their changes pushed (`service/domain/endpoints.py`). An endpoint gets
# the changes of the subscriptions its client created (`created_by`, the token's client), or of
# every client's when an `ops` token made it with `all_clients`.
notify_endpoints = sa.Table(
    "notify_endpoints",
    metadata,
    sa.Column(
        "id", pg.UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")
    ),
    sa.Column("url", sa.Text, nullable=False),
    # The change types it wants; NULL: every type, those added later too.
    sa.Column("types", pg.ARRAY(sa.Text)),
    sa.Column("description", sa.Text),
    sa.Column("state", sa.Text, nullable=False, server_default=EndpointState.ENABLED.value),
    sa.Column("created_by", sa.Text, nullable=False),
    sa.Column("all_clients", sa.Boolean, nullable=False, server_default=sa.false()),
    # Kept as is, unlike a token's: signing needs the secret itself (HMAC), not a hash of it.
    # Shown to the caller once, when it is made.
    sa.Column("secret", sa.Text, nullable=False),
    # After a rotation, the secret it replaced, in force (signing too) until it expires.
    sa.Column("previous_secret", sa.Text),
    _timestamp("previous_secret_expires_at"),
    # The consumer's own pace; NULL: no limit.
    sa.Column("rate_limit_per_s", sa.Float),
    # Why the sender disabled it; cleared by `enable`.
    sa.Column("disabled_reason", sa.Text),
    # Until when a consumer's 429 or 503 with Retry-After holds its sends back.
    _timestamp("paused_until"),
    # With `rate_limit_per_s`: when the next send may go, whichever worker sends it.
    _timestamp("next_send_at"),
    _created_at(),
    sa.Column(
        "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.CheckConstraint(f"state IN ({_quoted(EndpointState)})", name="state"),
)
sa.Index("ix_notify_endpoints_created_by", notify_endpoints.c.created_by)


def _endpoint_id() -> sa.Column[object]:
    return sa.Column(
        "endpoint_id",
        pg.UUID(as_uuid=True),
        sa.ForeignKey("notify_endpoints.id", ondelete="CASCADE"),
        nullable=False,
    )


# How far each endpoint has taken changes from the feed into its queue (`changes.Position`).
notify_cursors = sa.Table(
    "notify_cursors",
    metadata,
    sa.Column(
        "endpoint_id",
        pg.UUID(as_uuid=True),
        sa.ForeignKey("notify_endpoints.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("txid", sa.BigInteger, nullable=False),
    sa.Column("change_id", sa.BigInteger, nullable=False),
)

# Changes waiting to be sent to an endpoint, the body as the feed shows it; deleted once sent.
notify_messages = sa.Table(
    "notify_messages",
    metadata,
    _endpoint_id(),
    sa.Column("change_id", sa.BigInteger, nullable=False),
    sa.Column("subscription_id", pg.UUID(as_uuid=True), nullable=False),
    sa.Column("sequence", sa.Integer, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column(
        "queued_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.PrimaryKeyConstraint("endpoint_id", "change_id"),
)
sa.Index(
    "ix_notify_messages_lane",
    notify_messages.c.endpoint_id,
    notify_messages.c.subscription_id,
    notify_messages.c.sequence,
)

# A subscription's queue at an endpoint: its oldest message is the only one sent, so the
# subscription's changes arrive in order. `pending` counts its messages (a lane goes when it
# reaches 0); `failures` those of the message being sent; `claim_token` is set while a worker
# sends, and `next_attempt_at` is then the end of its lease.
notify_lanes = sa.Table(
    "notify_lanes",
    metadata,
    _endpoint_id(),
    sa.Column("subscription_id", pg.UUID(as_uuid=True), nullable=False),
    sa.Column("pending", sa.Integer, nullable=False),
    sa.Column("failures", sa.Integer, nullable=False, server_default=sa.text("0")),
    _timestamp("next_attempt_at", nullable=False),
    sa.Column("claim_token", pg.UUID(as_uuid=True)),
    sa.PrimaryKeyConstraint("endpoint_id", "subscription_id"),
    sa.CheckConstraint("pending >= 0", name="pending"),
)
sa.Index("ix_notify_lanes_due", notify_lanes.c.endpoint_id, notify_lanes.c.next_attempt_at)
# The lanes being sent, counted against each endpoint's room by every claim: without it the
# count reads every lane whose retry is ahead (all of a dead consumer's queue).
sa.Index(
    "ix_notify_lanes_claimed",
    notify_lanes.c.endpoint_id,
    notify_lanes.c.next_attempt_at,
    postgresql_where=notify_lanes.c.claim_token.is_not(None),
)

# Every send to an endpoint and how it went (`NotifyOutcome`), kept as long as the feed.
notify_attempts = sa.Table(
    "notify_attempts",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    _endpoint_id(),
    sa.Column("message_id", sa.Text, nullable=False),  # `webhook-id`
    sa.Column("subscription_id", pg.UUID(as_uuid=True)),  # NULL: a ping
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("status_code", sa.Integer),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("response", sa.Text),  # the answer's first 4 KiB
    sa.Column(
        "attempted_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)
sa.Index("ix_notify_attempts_endpoint", notify_attempts.c.endpoint_id, notify_attempts.c.id)
sa.Index("ix_notify_attempts_attempted_at", notify_attempts.c.attempted_at, postgresql_using="brin")
