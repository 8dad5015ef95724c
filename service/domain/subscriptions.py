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
        """The ShipEngine call that a row with due work in this state needs.

        An active row has a call due only to restart tracking, which ShipEngine ends by itself
        on an exception (EX) that may yet resolve.
        """
        if state is SubscriptionState.STOPPING:
            return cls.STOP
        if state in (SubscriptionState.PENDING, SubscriptionState.ACTIVE):
            return cls.START
        raise ValueError(f"no call is due in state {state}")


class OutcomeKind(enum.StrEnum):
    """What a ShipEngine answer means, which decides what happens next."""

    ACCEPTED = "accepted"  # 2xx: ShipEngine did it
    REJECTED = "rejected"  # the package's fault: ShipEngine refuses it for good
    ACCOUNT = "account"  # our account's fault: no package fails, all dispatching pauses
    RATE_LIMITED = "rate_limited"  # 429: all dispatching pauses for Retry-After
    TRANSIENT = "transient"  # 5xx, timeouts, resets, garbage: retry this one later

    @property
    def pauses_dispatch(self) -> bool:
        return self in (OutcomeKind.ACCOUNT, OutcomeKind.RATE_LIMITED)


@dataclasses.dataclass(frozen=True)
class CallOutcome:
    """What one ShipEngine call came to, as the dispatcher records it."""

    kind: OutcomeKind
    http_status: int | None = None
    request_id: str | None = None
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    retry_after_s: float | None = None
    message: str | None = None  # for failures with no ShipEngine body (timeouts, resets)

    @property
    def error_code(self) -> str | None:
        """The first error's code, for counting and grouping."""
        code = self.errors[0].get("error_code") if self.errors else None
        return code if isinstance(code, str) else None

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
    attempt_spent: bool = True  # False: the call says nothing of the package (pauses)


@dataclasses.dataclass(frozen=True)
class Budget:
    """What the account allows: calls a minute (0: unlimited), and how to probe when refused."""

    rate_per_minute: int
    account_probe_s: float


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    base_s: float
    cap_s: float
    max_attempts: int

    def delay_s(self, attempt: int, rng: random.Random) -> float:
        """Exponential backoff with full jitter, so retries of many rows spread out."""
        ceiling = min(self.cap_s, self.base_s * 2 ** max(attempt - 1, 0))
        return rng.uniform(0, ceiling)

    def gives_up(self, attempt: int) -> bool:
        return attempt >= self.max_attempts


def transition(
    state_now: SubscriptionState,
    operation: Operation,
    outcome: CallOutcome,
    *,
    attempt: int,
    retry_in_s: float,
    paused_for_s: float,
    policy: RetryPolicy,
) -> Transition:
    """The new state of a subscription whose `operation` call ended in `outcome`.

    `state_now` is read under the row lock when the outcome is recorded, so a cancel that
    arrived while a start was in flight is seen here and wins: the stop is due at once.
    `retry_in_s` is the backoff drawn for this attempt; `paused_for_s` how long dispatching as
    a whole is paused (a 429's Retry-After, an account problem's probe interval).
    """
    error = None if outcome.kind is OutcomeKind.ACCEPTED else outcome.as_error(operation)
    if operation is Operation.START and state_now is SubscriptionState.STOPPING:
        return Transition(SubscriptionState.STOPPING, 0.0, error, attempt_spent=False)
    rearming = operation is Operation.START and state_now is SubscriptionState.ACTIVE
    waiting = state_now if rearming or operation is Operation.STOP else SubscriptionState.PENDING
    if outcome.kind.pauses_dispatch:
        # The package is not at fault: it waits for the pause without spending an attempt.
        return Transition(waiting, paused_for_s, error, attempt_spent=False)
    if outcome.kind is OutcomeKind.TRANSIENT and not policy.gives_up(attempt):
        return Transition(waiting, retry_in_s, error)
    if operation is Operation.STOP:
        # Stopped or refused for good, or given up: nothing more we can do; the wish holds.
        return Transition(SubscriptionState.STOPPED, None, error)
    if rearming or outcome.kind is OutcomeKind.ACCEPTED:
        # A restart that did not take leaves tracking as it was: active, the error visible.
        return Transition(SubscriptionState.ACTIVE, None, error)
    return Transition(SubscriptionState.FAILED, None, error)
