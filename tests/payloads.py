"""Real-shaped ShipEngine `track` bodies, loose the way real ones are."""

from __future__ import annotations

import copy
from typing import Any


def event(
    occurred_at: str | None,
    status_code: str | None,
    description: str,
    city: str | None = "MEMPHIS",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "occurred_at": occurred_at,
        "carrier_occurred_at": occurred_at.rstrip("Z") if occurred_at else None,
        "description": description,
        "city_locality": city,
        "state_province": "TN",
        "postal_code": "",
        "country_code": "US",
        "company_name": "",
        "signer": "",
        "event_code": "OD" if status_code == "IT" else status_code,
        "carrier_detail_code": None,
        "status_code": status_code,
        "status_detail_code": None,
        "status_detail_description": None,
        "carrier_status_code": "1",
        "carrier_status_description": description,
        "latitude": 35.1495,
        "longitude": -90.049,
        **extra,
    }


HISTORY = [
    event("2026-11-20T09:00:00Z", "AC", "Shipment accepted"),
    event("2026-11-21T03:10:00Z", "IT", "Departed facility", city="DALLAS"),
    event("2026-11-22T07:45:00Z", "", "Arrived at unit", city=None),
    event("2026-11-22T15:30:00Z", "DE", "Delivered, front door", signer="J SMITH"),
]


def track_body(
    tracking_number: str,
    carrier_code: str | None,
    steps: int,
    *,
    status_code: str | None = None,
    **data_extra: Any,
) -> dict[str, Any]:
    """A delivery after `steps` events: the history so far, newest first (a fresh copy)."""
    history = copy.deepcopy(HISTORY[:steps])
    newest = history[-1] if history else None
    query = f"tracking_number={tracking_number}"
    if carrier_code is not None:
        query = f"carrier_code={carrier_code}&{query}"
    return {
        "resource_url": f"https://api.shipengine.com/v1/tracking?{query}",
        "resource_type": "API_TRACK",
        "data": {
            "label_url": None,
            "tracking_number": tracking_number,
            "status_code": status_code or (newest["status_code"] if newest else "UN") or "IT",
            "status_description": newest["description"] if newest else "Unknown",
            "carrier_status_code": "1",
            "carrier_status_description": None,
            "ship_date": "2026-11-20T00:00:00Z",
            "estimated_delivery_date": "2026-11-23T00:00:00Z",
            "actual_delivery_date": "2026-11-22T15:30:00Z" if steps >= 4 else None,
            "exception_description": None,
            "events": list(reversed(history)),
            "unexpected_field": {"nested": True},
            **data_extra,
        },
    }
