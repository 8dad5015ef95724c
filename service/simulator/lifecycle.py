"""A package's life as ShipEngine reports it: accepted, in transit, out for delivery, delivered.

Pure data, no I/O: `plan_life` gives the `tracking_information` after each step, the whole
history newest first. The payloads are deliberately as loose as real ones (an event with an
empty `status_code`, empty postal codes, missing coordinates, null detail codes), and the
carrier code appears nowhere in them: ShipEngine puts it only in the webhook's `resource_url`.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

JsonDict = dict[str, Any]

# The last event of a life happened this long before the life was planned; every event is
# therefore in the past, which receivers may check.
_LAST_EVENT_AGE = timedelta(minutes=7)


@dataclasses.dataclass(frozen=True)
class Place:
    city: str
    state: str
    postal_code: str
    latitude: float | None
    longitude: float | None
    utc_offset_h: int
    """Fixed offset of the local time; daylight saving is irrelevant to a simulator."""
    country_code: str = "US"


@dataclasses.dataclass(frozen=True)
class _Event:
    hours: float
    """Hours after the label was created; strictly increasing along the life."""
    place: Place
    description: str
    event_code: str
    status_code: str
    status_description: str | None
    status_detail_code: str | None
    status_detail_description: str | None
    carrier_status_code: str
    carrier_detail_code: str | None
    signer: str = ""
    company_name: str = ""


@dataclasses.dataclass(frozen=True)
class _Step:
    status_code: str
    status_description: str
    status_detail_code: str
    status_detail_description: str
    carrier_status_code: str
    carrier_detail_code: str | None
    events: tuple[_Event, ...]
    """The events this step adds to the history, oldest first."""


_AUSTIN = Place("AUSTIN", "TX", "78756", 30.3266, -97.7398, -6)
_DALLAS = Place("COPPELL", "TX", "75099", 32.9546, -97.0150, -6)
# A hub scan with no postal code and no coordinates, as carriers often send.
_MEMPHIS = Place("MEMPHIS", "TN", "", None, None, -6)
_ATLANTA = Place("ATLANTA", "GA", "30304", 33.7490, -84.3880, -5)
_DECATUR = Place("DECATUR", "GA", "30030", 33.7748, -84.2963, -5)

_DELIVERED = "Your parcel has been successfully delivered."

_LIFE: tuple[_Step, ...] = (
    _Step(
        "AC",
        "Accepted",
        "RECEIVED_BY_CARRIER",
        "Your parcel has been received by the carrier and is beginning its journey.",
        "OA",
        "OA",
        (
            # The label event: real ones come with an empty status code.
            _Event(
                0.0,
                Place("AUSTIN", "TX", "", None, None, -6),
                "Shipping Label Created, USPS Awaiting Item",
                "GX",
                "",
                None,
                None,
                None,
                "GX",
                None,
            ),
            _Event(
                5.25,
                _AUSTIN,
                "USPS picked up item",
                "OA",
                "AC",
                "Accepted",
                "RECEIVED_BY_CARRIER",
                "Your parcel has been received by the carrier and is beginning its journey.",
                "OA",
                "OA",
            ),
        ),
    ),
    _Step(
        "IT",
        "In Transit",
        "HUB_SCAN_IN",
        "Your parcel has arrived at the carrier's hub for processing.",
        "10",
        "10",
        (
            _Event(
                11.5,
                _DALLAS,
                "Arrived at USPS Regional Origin Facility",
                "10",
                "IT",
                "In Transit",
                "HUB_SCAN_IN",
                "Your parcel has arrived at the carrier's hub for processing.",
                "10",
                "10",
            ),
        ),
    ),
    _Step(
        "IT",
        "In Transit",
        "IN_TRANSIT",
        "Your shipment is on its way between the carrier hubs.",
        "NT",
        None,
        (
            _Event(
                27.75,
                _MEMPHIS,
                "In Transit to Next Facility",
                "NT",
                "IT",
                "In Transit",
                "IN_TRANSIT",
                "Your shipment is on its way between the carrier hubs.",
                "NT",
                None,
            ),
        ),
    ),
    _Step(
        "IT",
        "In Transit",
        "OUT_FOR_DELIVERY",
        "Your parcel is on its way and will be delivered today.",
        "OF",
        "OF",
        (
            _Event(
                44.0,
                _ATLANTA,
                "Arrived at Post Office",
                "07",
                "IT",
                "In Transit",
                "RECEIVED_LOCAL_DELIVERY_DEPOT",
                "Your parcel has arrived at the local delivery depot.",
                "07",
                "07",
            ),
            _Event(
                46.5,
                _ATLANTA,
                "Out for Delivery",
                "OF",
                "IT",
                "In Transit",
                "OUT_FOR_DELIVERY",
                "Your parcel is on its way and will be delivered today.",
                "OF",
                "OF",
            ),
        ),
    ),
    _Step(
        "DE",
        "Delivered",
        "DELIVERED",
        _DELIVERED,
        "01",
        "01",
        (
            _Event(
                51.25,
                _DECATUR,
                "Delivered, In/At Mailbox",
                "01",
                "DE",
                "Delivered",
                "DELIVERED",
                _DELIVERED,
                "01",
                "01",
                signer="M JOHNSON",
            ),
        ),
    ),
)

LIFE_STATUS_CODES: tuple[str, ...] = tuple(step.status_code for step in _LIFE)
"""The `status_code` of each step, in order: AC, IT, IT, IT (out for delivery), DE."""

# Carrier websites; the URL names the carrier's site, never ShipEngine's carrier code.
_TRACKING_URLS = {
    "stamps_com": "https://tools.usps.com/go/TrackConfirmAction.action?tLabels={tn}",
    "usps": "https://tools.usps.com/go/TrackConfirmAction.action?tLabels={tn}",
    "ups": "https://www.ups.com/track?tracknum={tn}",
    "fedex": "https://www.fedex.com/fedextrack/?trknbr={tn}",
}


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _local(moment: datetime, place: Place) -> str:
    local = moment.astimezone(UTC) + timedelta(hours=place.utc_offset_h)
    return local.strftime("%Y-%m-%dT%H:%M:%S")


def _midnight(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT00:00:00Z")


def _event_json(event: _Event, created_at: datetime) -> JsonDict:
    occurred = created_at + timedelta(hours=event.hours)
    place = event.place
    return {
        "occurred_at": _utc(occurred),
        "carrier_occurred_at": _local(occurred, place),
        "description": event.description,
        "city_locality": place.city,
        "state_province": place.state,
        "postal_code": place.postal_code,
        "country_code": place.country_code,
        "company_name": event.company_name,
        "signer": event.signer,
        "event_code": event.event_code,
        "carrier_detail_code": event.carrier_detail_code,
        "status_code": event.status_code,
        "status_description": event.status_description,
        "status_detail_code": event.status_detail_code,
        "status_detail_description": event.status_detail_description,
        "carrier_status_code": event.carrier_status_code,
        "carrier_status_description": event.description,
        "latitude": place.latitude,
        "longitude": place.longitude,
    }


def _snapshot(
    index: int, tracking_number: str, carrier_code: str, created_at: datetime
) -> JsonDict:
    step = _LIFE[index]
    history = [event for done in _LIFE[: index + 1] for event in done.events]
    newest = history[-1]
    delivered_at = created_at + timedelta(hours=_LIFE[-1].events[-1].hours)
    accepted_at = created_at + timedelta(hours=_LIFE[0].events[-1].hours)
    url = _TRACKING_URLS.get(carrier_code)
    return {
        "tracking_number": tracking_number,
        "tracking_url": url.format(tn=tracking_number) if url else None,
        "status_code": step.status_code,
        "status_description": step.status_description,
        "status_detail_code": step.status_detail_code,
        "status_detail_description": step.status_detail_description,
        "carrier_status_code": step.carrier_status_code,
        "carrier_status_description": newest.description,
        "carrier_detail_code": step.carrier_detail_code,
        "ship_date": _midnight(accepted_at),
        # Carriers give no estimate until the parcel has been scanned in their network.
        "estimated_delivery_date": None if index == 0 else _midnight(delivered_at),
        "actual_delivery_date": _utc(delivered_at) if step.status_code == "DE" else None,
        "exception_description": None,
        "label_url": None,
        "events": [_event_json(event, created_at) for event in reversed(history)],
    }


def plan_life(tracking_number: str, carrier_code: str, now: datetime) -> list[JsonDict]:
    """The `tracking_information` after each step of a life that ends a little before `now`."""
    last_hours = _LIFE[-1].events[-1].hours
    created_at = now - _LAST_EVENT_AGE - timedelta(hours=last_hours)
    return [
        _snapshot(index, tracking_number, carrier_code, created_at) for index in range(len(_LIFE))
    ]


def unknown_tracking_information(tracking_number: str) -> JsonDict:
    """What ShipEngine answers for a package it knows nothing of yet."""
    return {
        "tracking_number": tracking_number,
        "tracking_url": None,
        "status_code": "UN",
        "status_description": "Unknown",
        "status_detail_code": None,
        "status_detail_description": None,
        "carrier_status_code": None,
        "carrier_status_description": None,
        "carrier_detail_code": None,
        "ship_date": None,
        "estimated_delivery_date": None,
        "actual_delivery_date": None,
        "exception_description": None,
        "label_url": None,
        "events": [],
    }


def resource_url(public_url: str, carrier_code: str, tracking_number: str) -> str:
    query = urlencode({"carrier_code": carrier_code, "tracking_number": tracking_number})
    return f"{public_url.rstrip('/')}/v1/tracking?{query}"


def webhook_body(public_url: str, carrier_code: str, information: JsonDict) -> JsonDict:
    """The `track` webhook payload; the carrier code travels only in `resource_url`."""
    tracking_number = str(information["tracking_number"])
    return {
        "resource_url": resource_url(public_url, carrier_code, tracking_number),
        "resource_type": "API_TRACK",
        "data": information,
    }
