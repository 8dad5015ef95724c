"""What the simulator remembers: calls, deliveries, webhook registrations, scripts."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from service.simulator import errors
from service.simulator.errors import ApiError

Operation = Literal["start", "stop", "get"]
"""The scriptable calls: POST /v1/tracking/start, POST /v1/tracking/stop, GET /v1/tracking."""
OPERATIONS: tuple[Operation, ...] = ("start", "stop", "get")


CANCELLED_STATUS = 499
"""`http_status` of a call whose handler was cancelled before answering (nginx's "client closed
request"): its client went away while the server cancels handlers on disconnect (aiohttp's
`handler_cancellation`, which `TestServer` always turns on), or the simulator shut down."""


@dataclasses.dataclass(frozen=True)
class CallRecord:
    """One /v1 call, as answered (after latency, rate limit, scripts and authentication)."""

    at: float
    """`time.time()` when the call arrived."""
    method: str
    path: str
    query: dict[str, str]
    http_status: int
    """The status answered, or CANCELLED_STATUS (499) if the call was never answered."""
    ended_at: float
    """`time.time()` when the call was answered (or cancelled)."""
    rate_limited: bool = False
    """True only for a 429 of the enforced rate limit, not for a scripted 429."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DeliveryRecord:
    """One attempt to deliver a `track` webhook, or the note that there was nowhere to send it."""

    at: float
    """`time.time()` when the attempt began."""
    url: str | None
    """None: no `track` webhook was registered, so nothing was sent."""
    tracking_number: str
    status_code: str
    """The `status_code` of the step delivered."""
    attempt: int
    http_status: int | None
    error: str | None
    """Why the attempt failed without an HTTP answer (connection refused, timeout...)."""
    body: bytes
    headers: dict[str, str]

    @property
    def delivered(self) -> bool:
        return self.http_status is not None and 200 <= self.http_status < 300

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "url": self.url,
            "tracking_number": self.tracking_number,
            "status_code": self.status_code,
            "attempt": self.attempt,
            "http_status": self.http_status,
            "error": self.error,
            "delivered": self.delivered,
            "headers": self.headers,
            "body": self.body.decode("utf-8"),
        }


@dataclasses.dataclass(frozen=True)
class Webhook:
    webhook_id: str
    event: str
    url: str
    headers: tuple[tuple[str, str], ...] = ()
    name: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "webhook_id": self.webhook_id,
            "url": self.url,
            "event": self.event,
            "headers": [{"key": key, "value": value} for key, value in self.headers],
        }
        if self.name is not None:
            body["name"] = self.name
        return body


@dataclasses.dataclass(frozen=True)
class LifecycleOptions:
    duplicate_each: bool = False
    """Send every step's delivery twice: there is no delivery id to tell them apart."""
    replay_older: bool = False
    """After each step's delivery, send the previous step's again: an older state arrives last."""


@dataclasses.dataclass
class Script:
    """The answer the next `remaining` matching calls get (None: every one)."""

    tracking_number: str
    operation: Operation
    status: int
    error_source: str
    error_type: str
    error_code: str
    message: str
    retry_after_s: int
    delay_s: float
    remaining: int | None

    @property
    def succeeds(self) -> bool:
        return 200 <= self.status < 300

    def error(self, carrier_code: str, carrier_id: str | None) -> ApiError:
        extra: dict[str, str] = {}
        # ShipEngine names the carrier in errors that come from the carrier.
        if self.error_source == "carrier":
            extra["carrier_code"] = carrier_code
            if carrier_id:
                extra["carrier_id"] = carrier_id
        headers = {"Retry-After": str(self.retry_after_s)} if self.status == 429 else None
        return ApiError(
            self.status,
            error_source=self.error_source,
            error_type=self.error_type,
            error_code=self.error_code,
            message=self.message,
            headers=headers,
            **extra,
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def script_defaults(status: int, tracking_number: str) -> tuple[str, str, str, str]:
    """(error_source, error_type, error_code, message) ShipEngine gives with `status`."""
    if status == 429:
        return ("shipengine", "system", "rate_limit_exceeded", errors.RATE_LIMIT_MESSAGE)
    if status >= 500:
        failure = errors.unspecified(status).error
        return ("shipengine", "system", "unspecified", str(failure["message"]))
    if status == 401:
        denial = errors.unauthorized().error
        return ("shipengine", "security", "unauthorized", str(denial["message"]))
    message = f"The tracking number '{tracking_number}' is not valid for this carrier."
    return ("carrier", "validation", "invalid_identifier", message)
