"""The subscribe loads of the wrk suite: `POST /v1/subscriptions` (and `/batch`) bodies, each
package new, built before anything is measured (`bench/wrkload.py` writes them for wrk with
the caller's token).
"""

from __future__ import annotations

import json
from typing import Any

from bench.sending import Request

SINGLE_PATH = "/v1/subscriptions"
BATCH_PATH = "/v1/subscriptions/batch"
# Where packages come from, roughly as a shop's carriers share them.
JSON = {"Content-Type": "application/json"}
CARRIERS = ("ups", "ups", "ups", "fedex", "fedex", "usps", "usps", "dhl_express")


def subscription(prefix: str, index: int) -> dict[str, Any]:
    """The i-th package of a load, as a shop's checkout would subscribe it."""
    return {
        "carrier_code": CARRIERS[index % len(CARRIERS)],
        "tracking_number": tracking_number(prefix, index),
        "reference": f"order-{index}",
        "metadata": {"shop": "bench", "order_id": index},
    }


def tracking_number(prefix: str, index: int) -> str:
    """The harness counts the rows of a load by this prefix."""
    return f"{prefix}{index:09d}"


def _json(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def prepare(spec: dict[str, Any]) -> list[Request]:
    """`count` single subscriptions, or `count` batches of `size`, each package new."""
    prefix, count = str(spec["prefix"]), int(spec["count"])
    if spec["kind"] == "single":
        return [Request(SINGLE_PATH, _json(subscription(prefix, i)), JSON) for i in range(count)]
    size = int(spec["size"])
    return [
        Request(
            BATCH_PATH,
            _json({"subscriptions": [subscription(prefix, b * size + i) for i in range(size)]}),
            JSON,
            size,
        )
        for b in range(count)
    ]
