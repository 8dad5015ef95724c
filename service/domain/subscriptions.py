"""A subscription's life, and the rule that moves it after each ShipEngine call."""

from __future__ import annotations

import dataclasses
import enum
import random
from typing import Any


class SubscriptionState(enum.StrEnum):
    PENDING = "pending"  # start tracking is due
    ACTIVE = "active"  # ShipEngine tracks it; webhooks flow
    FAILED = "failed"  # ShipEngine refused to track it; `last_error` says why
    STOPPING = "stopping"  # the caller cancelled; stop tracking is due
    STOPPED = "stopped"  # final


class Operation(enum.StrEnum):
    START = "start"
    STOP = "stop"

    @classmethod
    def for_state(cls, state: SubscriptionState) -> Operation:
        """The ShipEngine call that a row with due work in this state needs."""
        if state is SubscriptionState.STOPPING:
            return cls.STOP
        if state is SubscriptionState.PENDING:
            return cls.START
        raise ValueError(f"no call is due in state {state}")


class OutcomeKind(enum.StrEnum):
    ACCEPTED = "accepted"  # 204: ShipEngine did it
    REJECTED = "rejected"  # ShipEngine refused this package for good
    TRANSIENT = "transient"  # try again later: our key, rate limit, 5xx, network


@dataclasses.dataclass(frozen=True)
class CallOutcome:
    """What one ShipEngine call came to, as the dispatcher records it."""

    kind: OutcomeKind
    http_status: int | None = None
    request_id: str | None = None
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    retry_after_s: float | None = None
    message: str | None = None  # for failures with no ShipEngine body (timeouts, resets)

    def as_error(self, operation: Operation) -> dict[str, Any]:
        """The `last_error` document: ShipEngine's own words, as it sent them."""
        error: dict[str, Any] = {
            "operation": operation.value,
            "http_status": self.http_status,
            "request_id": self.request_id,
            "errors": self.errors,
        }
        if self.message:
            error["message"] = self.message
        return error


@dataclasses.dataclass(frozen=True)
class Transition:
    """Where a subscription goes after a call: its state, and when to call again."""

    state: SubscriptionState
    retry_in_s: float | None  # None: no call is due; 0: due at once
    last_error: dict[str, Any] | None


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    base_s: float
    cap_s: float

    def delay_s(self, attempt: int, outcome: CallOutcome, rng: random.Random) -> float:
        """Exponential backoff with full jitter; ShipEngine's Retry-After wins when longer."""
        ceiling = min(self.cap_s, self.base_s * 2 ** max(attempt - 1, 0))
        jittered = rng.uniform(0, ceiling)
        if outcome.retry_after_s is not None:
            return max(outcome.retry_after_s, jittered)
        return jittered


def transition(
    state_now: SubscriptionState,
    operation: Operation,
    outcome: CallOutcome,
    retry_in_s: float,
) -> Transition:
    """The new state of a subscription whose `operation` call ended in `outcome`.

    `state_now` is read under the row lock when the outcome is recorded, so a cancel that
    arrived while a start was in flight is seen here and wins: the stop is due at once.
    """
    error = None if outcome.kind is OutcomeKind.ACCEPTED else outcome.as_error(operation)
    if operation is Operation.START and state_now is SubscriptionState.STOPPING:
        return Transition(SubscriptionState.STOPPING, 0.0, error)
    if operation is Operation.START:
        if outcome.kind is OutcomeKind.ACCEPTED:
            return Transition(SubscriptionState.ACTIVE, None, None)
        if outcome.kind is OutcomeKind.REJECTED:
            return Transition(SubscriptionState.FAILED, None, error)
        return Transition(SubscriptionState.PENDING, retry_in_s, error)
    # A stop that ShipEngine refuses for good leaves nothing tracked: the caller's wish holds.
    if outcome.kind is OutcomeKind.TRANSIENT:
        return Transition(SubscriptionState.STOPPING, retry_in_s, error)
    return Transition(SubscriptionState.STOPPED, None, error)
