"""What the callers are told: the changes of their subscriptions, one per filing that changed
what they can see (`service/db/changes.py` keeps them, in commit order).

A change is made in the same transaction as the state it reports (an outbox): never a change
without its state, never a state without its change.
"""

from __future__ import annotations

import enum

from service.domain.subscriptions import SubscriptionState
from service.domain.tracking import Filing, PackageStatus


class ChangeType(enum.StrEnum):
    ACTIVE = "subscription.active"  # ShipEngine accepted the start
    FAILED = "subscription.failed"  # ShipEngine refused it for good; `last_error` says why
    STOPPED = "subscription.stopped"
    STATUS_CHANGED = "tracking.status_changed"  # the status code changed
    ETA_CHANGED = "tracking.eta_changed"  # same status, a new estimated delivery date
    EVENTS_ADDED = "tracking.events_added"  # new carrier events, nothing else
    STALE = "tracking.stale"  # no carrier news for STALE_AFTER_HOURS, once per silence


# What a subscription's state becomes that callers are told of, and as what.
_LIFECYCLE = {
    SubscriptionState.ACTIVE: ChangeType.ACTIVE,
    SubscriptionState.FAILED: ChangeType.FAILED,
    SubscriptionState.STOPPED: ChangeType.STOPPED,
}


def lifecycle_change(before: SubscriptionState, after: SubscriptionState) -> ChangeType | None:
    """The change a dispatcher's outcome makes: a state entered, not one kept (a restart of
    tracking after an EX leaves the subscription active, and tells nobody anything)."""
    return _LIFECYCLE.get(after) if after is not before else None


def filing_change(before: PackageStatus, filing: Filing) -> ChangeType | None:
    """The most significant change a delivery makes, of status > eta; None when it made neither:
    then it is `EVENTS_ADDED` if it stored carrier events the subscription lacked, which only
    the database knows as it stores them. A refused regression makes none (`may_change`)."""
    if filing.changed:
        return ChangeType.STATUS_CHANGED
    if filing.status.estimated_delivery_date != before.estimated_delivery_date:
        return ChangeType.ETA_CHANGED
    return None


def may_change(filing: Filing) -> bool:
    """A delivery older than what is shown is refused as news: it makes no change at all."""
    return not filing.regression
