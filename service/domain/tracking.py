"""ShipEngine's `track` payload, parsed tolerantly.

Real deliveries are looser than the spec: nulls where a string is promised, empty strings,
missing "required" fields, extra fields, numbers for strings. Parsing never refuses a delivery
for its shape; what cannot be read becomes None.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
import typing
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar
from urllib.parse import parse_qs

from service import json_exact

_T = TypeVar("_T")


class TrackEvent(NamedTuple):
    """A NamedTuple, not a frozen dataclass: as immutable, and built four times faster (a
    delivery carries the package's whole history, each event parsed on every delivery)."""

    occurred_at: datetime | None
    carrier_occurred_at: str | None
    status_code: str | None
    event_code: str | None
    description: str | None
    carrier_status_code: str | None
    carrier_detail_code: str | None
    status_detail_code: str | None
    city_locality: str | None
    state_province: str | None
    postal_code: str | None
    country_code: str | None
    company_name: str | None
    signer: str | None
    latitude: float | None
    longitude: float | None

    @property
    def key(self) -> bytes:
        """Identity of the event across deliveries, which each repeat the whole history."""
        parts = [
            self.occurred_at.isoformat() if self.occurred_at else "",
            self.carrier_occurred_at or "",
            self.status_code or "",
            self.event_code or "",
            self.description or "",
            self.city_locality or "",
            self.state_province or "",
            self.postal_code or "",
            self.country_code or "",
        ]
        return hashlib.sha256("\x1f".join(parts).encode()).digest()


# The one declaration of an event's fields is TrackEvent: the parser reads them, the table's
# columns are made from them (`db/tables.py`), and the answer model is held to them
# (`api/schemas.py`, tests/test_domain.py).
EVENT_FIELD_TYPES: dict[str, Any] = typing.get_type_hints(TrackEvent)


@dataclasses.dataclass(frozen=True)
class TrackingUpdate:
    """One `track` delivery: the package's current state and its whole history."""

    resource_type: str | None
    tracking_number: str | None
    carrier_code: str | None
    status_code: str | None
    status_description: str | None
    estimated_delivery_date: datetime | None
    actual_delivery_date: datetime | None
    events: tuple[TrackEvent, ...]

    @functools.cached_property
    def newest_event_at(self) -> datetime | None:
        times = [event.occurred_at for event in self.events if event.occurred_at]
        return max(times, default=None)


def parse_track_payload(payload: object) -> TrackingUpdate:
    body = payload if isinstance(payload, dict) else {}
    data = body.get("data")
    data = data if isinstance(data, dict) else {}
    tracking_number = text(data.get("tracking_number"))
    carrier_code = text(data.get("carrier_code"))
    if tracking_number is None or carrier_code is None:  # the URL is read only if need be
        query = _resource_query(body.get("resource_url"))
        tracking_number = tracking_number or query.get("tracking_number")
        carrier_code = carrier_code or query.get("carrier_code")
    raw_events = data.get("events")
    events = tuple(
        _parse_event(event)
        for event in (raw_events if isinstance(raw_events, list) else [])
        if isinstance(event, dict)
    )
    return TrackingUpdate(
        resource_type=text(body.get("resource_type")),
        tracking_number=tracking_number,
        carrier_code=carrier_code,
        status_code=text(data.get("status_code")),
        status_description=text(data.get("status_description")),
        estimated_delivery_date=timestamp(data.get("estimated_delivery_date")),
        actual_delivery_date=timestamp(data.get("actual_delivery_date")),
        events=events,
    )


def _parse_event(raw: dict[str, Any]) -> TrackEvent:
    get = raw.get
    # By position, in TrackEvent's order: a third faster than by keyword from a dict.
    return _make_event([read(get(name)) for name, read in _EVENT_READERS])


def _resource_query(resource_url: object) -> dict[str, str]:
    """The first value of each of the resource URL's query parameters. The query is cut out
    by hand, not by urlsplit, which raises on what it cannot read as a host ("http://[x"):
    a signed delivery is never refused for its shape."""
    url = text(resource_url)
    if url is None:
        return {}
    query = url.partition("#")[0].partition("?")[2]
    values = parse_qs(query)
    return {name: found[0].strip() for name, found in values.items() if found and found[0].strip()}


def text(value: object) -> str | None:
    """A non-empty string, or None; numbers become their text. NUL characters are dropped:
    PostgreSQL's text cannot hold them, and a delivery is never refused for its shape."""
    if isinstance(value, str):  # nearly always: first, as this runs for every field of every event
        return (value.replace("\x00", "") if "\x00" in value else value).strip() or None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return str(value)
    return None


def number(value: object) -> float | None:
    """A finite number, or None: "NaN" and "inf" read as floats, but say nothing of a place."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float | str):
        try:
            parsed = float(value)
        except (ValueError, OverflowError):  # an integer past float's range overflows
            return None
        return parsed if math.isfinite(parsed) else None
    return None


def timestamp(value: object) -> datetime | None:
    """An ISO 8601 time as an aware UTC datetime; ShipEngine's are UTC when they lack a zone."""
    raw = text(value)
    if raw is None:
        return None
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        # An offset that moves the time before the year 1 or past 9999 in UTC
        # ("0001-01-01T00:00:00+14:00"): no datetime holds it. It reads as absent, as any time
        # we cannot read, rather than refusing the delivery, which ShipEngine signed and would
        # retry forever.
        return None


# How each of an event's fields is read, by its type, in TrackEvent's order.
_READERS_BY_TYPE: dict[Any, Callable[[object], Any]] = {
    datetime | None: timestamp,
    float | None: number,
    str | None: text,
}
_EVENT_READERS = tuple((name, _READERS_BY_TYPE[hint]) for name, hint in EVENT_FIELD_TYPES.items())
_make_event = TrackEvent._make


# A JSON string, escapes and all; without its closing quote it runs to the end of the text.
# Each alternative consumes what the other cannot, so the match is linear in any input.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")
_OPENING = frozenset(b"[{")


def json_depth_exceeds(raw: bytes, limit: int) -> bool:
    """Whether JSON text nests arrays and objects more than `limit` deep (`{}` is 1 deep).

    Told from the text without parsing it: parsers, and whatever walks what they return (the
    hash of `content_digest`), recurse once per level, and a deep enough text exhausts the
    stack. Brackets inside strings are text. Text that is not JSON is measured by its
    brackets all the same; the parser refuses it afterwards.
    """
    if raw.count(b"{") + raw.count(b"[") <= limit:
        # No deeper than its opening brackets: a delivery of a few dozen events is told so in
        # about a microsecond, where the scan below costs four times the parse (measured).
        return False
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    depth = 0
    for bracket in brackets:
        if bracket in _OPENING:
            depth += 1
            if depth > limit:
                return True
        elif depth:
            depth -= 1
    return False


TERMINAL_STATUSES = frozenset({"DE", "SP"})
EXCEPTION_STATUS = "EX"


def content_digest(payload: object, update: TrackingUpdate) -> bytes:
    """What a delivery says, normalised: equal for a retry, a re-serialised copy, or a poll.

    The resource URL is left out (its host differs between a webhook and a poll); the package it
    names is kept through the update's carrier code and tracking number.
    """
    data = payload.get("data") if isinstance(payload, dict) else None
    content = {
        "carrier_code": update.carrier_code,
        "tracking_number": update.tracking_number,
        "data": data,
    }
    # The bytes the standard library wrote before, ten times faster, but for the rare float
    # orjson writes otherwise: such a copy of a delivery stored before is filed again,
    # harmlessly, not kept as a duplicate.
    return hashlib.sha256(json_exact.dumps(content, sort_keys=True)).digest()


@dataclasses.dataclass(frozen=True)
class StatusDecision:
    take: bool  # the delivery's status becomes the subscription's
    regression: bool  # it would have moved the status back in time, and was refused


def decide_status(
    current_status: str | None, last_event_at: datetime | None, update: TrackingUpdate
) -> StatusDecision:
    """Whether a delivery's status replaces the current one: never for an older state.

    Statuses are not assumed to move one way (EX can be followed by IT or DE): only time
    decides. A delivery whose newest event is older than what we show adds its events to the
    history but leaves the status; at the same instant a terminal status (DE, SP) stays.
    """
    if update.status_code is None:
        return StatusDecision(take=False, regression=False)
    newest = update.newest_event_at
    if last_event_at is None or current_status is None:
        return StatusDecision(take=True, regression=False)
    differs = update.status_code != current_status
    if newest is None or newest < last_event_at:
        return StatusDecision(take=False, regression=differs)
    if newest == last_event_at and current_status in TERMINAL_STATUSES:
        return StatusDecision(take=False, regression=differs)
    return StatusDecision(take=True, regression=False)


@dataclasses.dataclass(frozen=True)
class RearmPolicy:
    """ShipEngine stops tracking on EX; an EX that later resolves would go unseen. So tracking
    is started again after `delay_s`, at most `max_rearms` times per subscription."""

    max_rearms: int
    delay_s: float


@dataclasses.dataclass(frozen=True)
class PackageStatus:
    """What a subscription shows of its package: all that filing a delivery may change."""

    status_code: str | None
    status_description: str | None
    estimated_delivery_date: datetime | None
    actual_delivery_date: datetime | None
    last_event_at: datetime | None
    rearms: int
    rearm_due: bool  # a restart of tracking is already due (or another call is)
    rearmable: bool  # active and not done: an EX may restart tracking


@dataclasses.dataclass(frozen=True)
class Filing:
    """What one delivery did to a package's status."""

    status: PackageStatus
    changed: bool
    regression: bool
    rearmed: bool


def file_update(current: PackageStatus, update: TrackingUpdate, rearm: RearmPolicy) -> Filing:
    """The status after `update`: taken unless older than what is shown (`decide_status`).

    A field the delivery leaves out keeps what we know: it is no news. An EX that changes the
    status restarts tracking, within `rearm.max_rearms`.
    """
    decision = decide_status(current.status_code, current.last_event_at, update)
    changed = decision.take and update.status_code != current.status_code
    rearmed = (
        changed
        and update.status_code == EXCEPTION_STATUS
        and current.rearmable
        and not current.rearm_due
        and current.rearms < rearm.max_rearms
    )
    known = [t for t in (current.last_event_at, update.newest_event_at) if t is not None]
    take = decision.take
    status = PackageStatus(
        status_code=update.status_code if take else current.status_code,
        status_description=_news(
            update.status_description if take else None, current.status_description
        ),
        estimated_delivery_date=_news(
            update.estimated_delivery_date if take else None, current.estimated_delivery_date
        ),
        actual_delivery_date=_news(
            update.actual_delivery_date if take else None, current.actual_delivery_date
        ),
        last_event_at=max(known, default=None),
        rearms=current.rearms + rearmed,
        rearm_due=current.rearm_due or rearmed,
        rearmable=current.rearmable,
    )
    return Filing(status, changed=changed, regression=decision.regression, rearmed=rearmed)


def _news(value: _T | None, known: _T | None) -> _T | None:
    return known if value is None else value


# How long a package may stay silent before we ask ShipEngine (GET /v1/tracking) whether a
# webhook went missing: the closer to delivery, the sooner. Delivered ones are not asked.
SILENCE_BEFORE_POLL_S: dict[str | None, float] = {
    None: 24 * 3600.0,  # nothing heard yet
    "UN": 24 * 3600.0,
    "NY": 24 * 3600.0,
    "AC": 24 * 3600.0,
    "IT": 12 * 3600.0,
    "EX": 6 * 3600.0,
    "AT": 4 * 3600.0,
}
