"""Sending notifications: Standard Webhooks' signature, Svix's retry schedule, and what each
answer of a consumer means for the message and its endpoint. No I/O here.
"""

from __future__ import annotations

import base64
import dataclasses
import email.utils
import enum
import hashlib
import hmac
import json
import random
import uuid
from collections.abc import Sequence
from datetime import datetime

from service.domain.endpoints import SECRET_PREFIX

# Svix's schedule: after the first attempt fails, retries this long after each failure. After
# the last one fails, the endpoint is disabled (`enable` resumes it where it stopped).
RETRY_SCHEDULE_S: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
ATTEMPTS = 1 + len(RETRY_SCHEDULE_S)
# Each retry comes up to this fraction earlier or later, so that the messages of a consumer
# that was down do not all come back at the same second.
JITTER = 0.2
# A consumer's Retry-After is obeyed up to the schedule's longest wait, and never shorter than
# its first: a 0 or a date in the past would have the endpoint hammered without end.
MAX_PAUSE_S = max(RETRY_SCHEDULE_S)
MIN_PAUSE_S = RETRY_SCHEDULE_S[0]
# What is kept of an answer's body, for ops to read in the attempts.
RESPONSE_KEPT_BYTES = 4096
PING_TYPE = "ping"
# How far ahead a rate-limited endpoint's sends are claimed, to be spaced out within it: a
# claim's lease must outlive this wait and the send after it.
SEND_AHEAD_S = 1.0


class NotifyOutcome(enum.StrEnum):
    DELIVERED = "delivered"  # a 2xx: done
    FAILED = "failed"  # another status: retried on the schedule
    TIMEOUT = "timeout"  # no whole answer within NOTIFY_TIMEOUT_S: retried
    UNREACHABLE = "unreachable"  # no connection, or it broke: retried
    REFUSED = "refused"  # the URL or its host's address is not allowed now: retried
    THROTTLED = "throttled"  # a 429 or 503 with Retry-After: the endpoint pauses till then
    GONE = "gone"  # a 410: the endpoint is disabled at once


@dataclasses.dataclass(frozen=True)
class Answer:
    """What came of one send."""

    outcome: NotifyOutcome
    status_code: int | None
    latency_ms: float
    response: str | None  # `kept_response` of the body
    retry_after_s: float | None = None


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What an attempt's outcome does to its message and its endpoint."""

    delivered: bool = False
    disable: str | None = None  # why the endpoint is disabled now
    # How long the endpoint pauses; a pause is no failure (it counts not towards disabling).
    pause_s: float | None = None


def verdict(
    outcome: NotifyOutcome, failures_before: int, retry_after_s: float | None = None
) -> Verdict:
    """What follows an attempt of a message that had failed `failures_before` times."""
    if outcome is NotifyOutcome.DELIVERED:
        return Verdict(delivered=True)
    if outcome is NotifyOutcome.GONE:
        return Verdict(disable="the endpoint answered 410 Gone")
    if outcome is NotifyOutcome.THROTTLED and retry_after_s is not None:
        return Verdict(pause_s=retry_after_s)
    if failures_before + 1 >= ATTEMPTS:
        return Verdict(disable=f"{ATTEMPTS} attempts of one message failed, the last {outcome}")
    return Verdict()


def retry_delay_s(failures: int, rng: random.Random) -> float:
    """How long after its `failures`-th failure (1-based) a message is sent again."""
    base = RETRY_SCHEDULE_S[min(failures, len(RETRY_SCHEDULE_S)) - 1]
    return base * rng.uniform(1 - JITTER, 1 + JITTER)


def outcome_of_status(status: int, retry_after_s: float | None) -> NotifyOutcome:
    if 200 <= status < 300:
        return NotifyOutcome.DELIVERED
    if status == 410:
        return NotifyOutcome.GONE
    if status in (429, 503) and retry_after_s is not None:
        return NotifyOutcome.THROTTLED
    return NotifyOutcome.FAILED


def retry_after_s(value: str | None, now: datetime) -> float | None:
    """A Retry-After header's wait in seconds (delay-seconds or an HTTP date), within
    MIN_PAUSE_S..MAX_PAUSE_S; None when absent or not either form."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return _bounded_pause(float(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        return None
    return _bounded_pause((when - now).total_seconds())


def _bounded_pause(seconds: float) -> float:
    return min(max(seconds, MIN_PAUSE_S), MAX_PAUSE_S)


def secret_key(secret: str) -> bytes:
    """The bytes a `whsec_` secret stands for: what the HMAC is keyed with."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks' `v1,` signature of one message under one key."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(keys: Sequence[bytes], message_id: str, timestamp: int, body: bytes) -> str:
    """`webhook-signature`: a signature under each key in force, space-separated."""
    return " ".join(sign(key, message_id, timestamp, body) for key in keys)


def secrets_in_force(
    secret: str, previous: str | None, previous_expires_at: datetime | None, now: datetime
) -> list[str]:
    """The current secret, and the previous one while a rotation keeps it in force."""
    if previous is not None and previous_expires_at is not None and previous_expires_at > now:
        return [secret, previous]
    return [secret]


def kept_response(body: bytes) -> str:
    """What is stored of an answer's body: its first bytes as text, without NULs (which a
    PostgreSQL text cannot hold)."""
    return body[:RESPONSE_KEPT_BYTES].decode("utf-8", "replace").replace("\x00", "\ufffd")


def ping(endpoint_id: uuid.UUID, now: datetime) -> tuple[str, bytes]:
    """A ping's message id and body: what `test` sends, shaped as a change is (`id`, `type`,
    `occurred_at`, `data`), so a consumer's verification and parsing are tested too."""
    message_id = f"ping_{uuid.uuid4().hex}"
    body = {
        "id": message_id,
        "type": PING_TYPE,
        "occurred_at": now.isoformat().replace("+00:00", "Z"),
        "data": {"endpoint_id": str(endpoint_id)},
    }
    return message_id, json.dumps(body, separators=(",", ":")).encode()
