"""Prometheus metrics: one registry per process, passed to what records into it.

Counters and histograms are per process (each API and dispatcher process serves its own);
the gauges of shared state (backlog, pause) are read from the database when scraped, so every
process reports the same truth.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlalchemy.ext.asyncio import AsyncConnection

from service.db.changes import held_back_s
from service.db.dispatch import backlog, current_pause
from service.db.notify import endpoint_counts
from service.domain.endpoints import EndpointState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.http_requests = Counter(
            "tracking_http_requests_total",
            "HTTP requests answered, by route and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.http_latency = Histogram(
            "tracking_http_request_seconds",
            "Time to answer an HTTP request, by route.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.dispatch_calls = Counter(
            "tracking_dispatch_calls_total",
            "ShipEngine calls made by dispatchers, by operation, outcome and error code.",
            ["operation", "outcome", "error_code"],
            registry=registry,
        )
        self.dispatch_latency = Histogram(
            "tracking_dispatch_call_seconds",
            "Latency of ShipEngine calls, by operation.",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.dispatch_pauses = Counter(
            "tracking_dispatch_pauses_total",
            "Calls whose answer paused all dispatching, by kind (rate_limit: a 429; account).",
            ["kind"],
            registry=registry,
        )
        self.dispatch_claims_lost = Counter(
            "tracking_dispatch_claims_lost_total",
            "Call outcomes not applied because the claim's lease had expired.",
            registry=registry,
        )
        self.webhook_deliveries = Counter(
            "tracking_webhook_deliveries_total",
            "track webhook deliveries, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.webhook_refusals = Counter(
            "tracking_webhook_refusals_total",
            "Webhook deliveries refused, by reason (signature failures among them).",
            ["reason"],
            registry=registry,
        )
        self.webhook_refusals_unstored = Counter(
            "tracking_webhook_refusals_unstored_total",
            "Of those, the ones not stored: no signature headers, or past "
            "WEBHOOK_REFUSAL_SAMPLE_PER_MINUTE; by reason.",
            ["reason"],
            registry=registry,
        )
        self.status_changes = Counter(
            "tracking_status_changes_total",
            "Changes of a subscription's status, by the new status code.",
            ["status_code"],
            registry=registry,
        )
        self.status_regressions = Counter(
            "tracking_status_regressions_refused_total",
            "Deliveries whose older state was not allowed to move a status back.",
            registry=registry,
        )
        self.group_commit_size = Histogram(
            "tracking_group_commit_size",
            "Requests committed together in one transaction, by path (webhook, subscribe).",
            ["path"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=registry,
        )
        self.rearms = Counter(
            "tracking_rearms_total",
            "Tracking restarts scheduled after an EX.",
            registry=registry,
        )
        self.polls = Counter(
            "tracking_reconcile_polls_total",
            "GET /v1/tracking calls of the reconciler, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.dispatch_backlog = Gauge(
            "tracking_dispatch_backlog",
            "Subscriptions whose ShipEngine call is due now.",
            registry=registry,
        )
        self.dispatch_oldest_due_seconds = Gauge(
            "tracking_dispatch_oldest_due_seconds",
            "How long the longest-waiting due call has been due.",
            registry=registry,
        )
        self.dispatch_paused = Gauge(
            "tracking_dispatch_paused",
            "1 while all dispatching is paused, by kind (rate_limit, account, manual).",
            ["kind"],
            registry=registry,
        )
        self.change_feed_held_back_seconds = Gauge(
            "tracking_change_feed_held_back_seconds",
            "How long the oldest writing transaction on the database server has run: the "
            "change feed shows no change committed after it began until it ends.",
            registry=registry,
        )
        self.notifications = Counter(
            "tracking_notifications_total",
            "Notification sends to consumers' endpoints, by outcome (delivered, failed, "
            "timeout, unreachable, refused, throttled, gone).",
            ["outcome"],
            registry=registry,
        )
        self.notification_latency = Histogram(
            "tracking_notification_seconds",
            "Time from sending a notification to the consumer's whole answer (or giving up).",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.notify_endpoints_disabled = Counter(
            "tracking_notify_endpoints_disabled_total",
            "Endpoints this process disabled: a 410, or a message's last retry failed.",
            registry=registry,
        )
        self.notify_endpoints = Gauge(
            "tracking_notify_endpoints",
            "Notification endpoints, by state (enabled, disabled).",
            ["state"],
            registry=registry,
        )
        self.notify_queued = Gauge(
            "tracking_notify_queued",
            "Notifications queued for endpoints and not yet delivered (of enabled and "
            "disabled endpoints alike).",
            registry=registry,
        )
        self.change_stream_readers = Gauge(
            "tracking_change_stream_readers",
            "Change streams (Server-Sent Events) this process serves now.",
            registry=registry,
        )
        # The series of each answer, looked up once: `labels()` cost 1.2-1.5 µs a call on
        # every request. As bounded as the series: methods, route patterns and statuses.
        self._http_series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def http_series(self, method: str, route: str, status: int) -> tuple[Counter, Histogram]:
        """The request counter and latency histogram of answers of `status` to `method` on
        `route` (a pattern, never a path)."""
        key = (method, route, status)
        series = self._http_series.get(key)
        if series is None:
            series = self._http_series[key] = (
                self.http_requests.labels(method, route, str(status)),
                self.http_latency.labels(method, route),
            )
        return series

    async def refresh_shared(self, conn: AsyncConnection) -> None:
        """Read the gauges of state every process shares from the database."""
        due, oldest = await backlog(conn)
        self.dispatch_backlog.set(due)
        self.dispatch_oldest_due_seconds.set(oldest)
        pause = await current_pause(conn)
        for kind in ("rate_limit", "account", "manual"):
            self.dispatch_paused.labels(kind).set(1 if pause and pause.kind == kind else 0)
        self.change_feed_held_back_seconds.set(await held_back_s(conn))
        counts = await endpoint_counts(conn)
        for state in EndpointState:
            self.notify_endpoints.labels(state.value).set(counts.by_state.get(state, 0))
        self.notify_queued.set(counts.queued)

    def render(self) -> bytes:
        return generate_latest(self.registry)
