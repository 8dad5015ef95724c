"""ShipEngine's tracking endpoints over one pooled aiohttp session.

Every answer, including the ones ShipEngine never documents (a proxy's HTML page, a reset
connection, a timeout), becomes a `CallOutcome`; nothing here raises for an HTTP result.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any
from urllib.parse import urlencode

import aiohttp

from service.domain.subscriptions import CallOutcome, Operation, OutcomeKind
from service.shipengine.classification import classify_errors


class ShipEngineClient:
    def __init__(
        self, session: aiohttp.ClientSession, *, base_url: str, api_key: str, timeout_s: float
    ) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._headers = {"API-Key": api_key}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def get_tracking(self, carrier_code: str, tracking_number: str) -> PolledTracking:
        """GET /v1/tracking: what ShipEngine knows of the package now (the reconciler asks)."""
        url = f"{self._base_url}/v1/tracking"
        params = {"carrier_code": carrier_code, "tracking_number": tracking_number}
        resource_url = f"{url}?{urlencode(params)}"
        try:
            async with self._session.get(
                url, params=params, headers=self._headers, timeout=self._timeout
            ) as response:
                body = await response.read()
                outcome = classify(response.status, body, response.headers.get("Retry-After"))
        except TimeoutError:
            outcome = CallOutcome(OutcomeKind.TRANSIENT, message="timed out")
            body = b""
        except aiohttp.ClientError as error:
            outcome = CallOutcome(OutcomeKind.TRANSIENT, message=f"{type(error).__name__}: {error}")
            body = b""
        information = _as_information(body) if outcome.kind is OutcomeKind.ACCEPTED else None
        if outcome.kind is OutcomeKind.ACCEPTED and information is None:
            outcome = CallOutcome(OutcomeKind.TRANSIENT, outcome.http_status, message="not JSON")
        return PolledTracking(resource_url, information, outcome)

    async def register_track_webhook(
        self, url: str, headers: dict[str, str] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Create or update the account's one `track` webhook; returns ("created"|"updated", it).

        ShipEngine allows one URL per event, so an existing `track` webhook is pointed at `url`.
        Raises aiohttp.ClientResponseError when ShipEngine refuses.
        """
        base = f"{self._base_url}/v1/environment/webhooks"
        custom = [{"key": key, "value": value} for key, value in (headers or {}).items()]
        async with self._session.get(base, headers=self._headers, timeout=self._timeout) as found:
            found.raise_for_status()
            existing: list[dict[str, Any]] = await found.json()
        track = next((hook for hook in existing if hook.get("event") == "track"), None)
        wanted: dict[str, Any] = {"url": url, "headers": custom}
        if track is None:
            async with self._session.post(
                base,
                json={"event": "track", **wanted},
                headers=self._headers,
                timeout=self._timeout,
            ) as created:
                created.raise_for_status()
                return "created", await created.json()
        async with self._session.put(
            f"{base}/{track['webhook_id']}",
            json=wanted,
            headers=self._headers,
            timeout=self._timeout,
        ) as updated:
            updated.raise_for_status()
        return "updated", {**track, **wanted}

    async def call(
        self,
        operation: Operation,
        carrier_code: str,
        tracking_number: str,
        carrier_id: str | None,
    ) -> CallOutcome:
        """POST /v1/tracking/{start|stop}; the parameters go URL-encoded in the query."""
        params = {"carrier_code": carrier_code, "tracking_number": tracking_number}
        if carrier_id:
            params["carrier_id"] = carrier_id
        url = f"{self._base_url}/v1/tracking/{operation.value}"
        try:
            async with self._session.post(
                url, params=params, headers=self._headers, timeout=self._timeout
            ) as response:
                body = await response.read()
                return classify(response.status, body, response.headers.get("Retry-After"))
        except TimeoutError:
            return CallOutcome(OutcomeKind.TRANSIENT, message="timed out")
        except aiohttp.ClientError as error:
            return CallOutcome(OutcomeKind.TRANSIENT, message=f"{type(error).__name__}: {error}")


@dataclasses.dataclass(frozen=True)
class PolledTracking:
    """GET /v1/tracking's answer: the package's `tracking_information`, or why there is none."""

    url: str
    information: dict[str, Any] | None
    outcome: CallOutcome


def _as_information(body: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def classify(status: int, body: bytes, retry_after: str | None) -> CallOutcome:
    """What a ShipEngine answer means for the subscription."""
    if 200 <= status < 300:
        return CallOutcome(OutcomeKind.ACCEPTED, http_status=status)
    document = _error_document(body)
    retry_after_s = _retry_after_s(retry_after)
    if document is None:
        # No ShipEngine error body: a gateway or proxy answered, not ShipEngine. Only what the
        # status says for certain counts; anything else is tried again.
        kind = classify_errors(status, []) if status in (401, 403, 429) else OutcomeKind.TRANSIENT
        return CallOutcome(
            kind,
            http_status=status,
            retry_after_s=retry_after_s,
            message=f"HTTP {status} without ShipEngine's error body",
        )
    request_id, errors = document
    return CallOutcome(
        classify_errors(status, errors),
        http_status=status,
        request_id=request_id,
        errors=errors,
        retry_after_s=retry_after_s,
    )


def _error_document(body: bytes) -> tuple[str | None, list[dict[str, Any]]] | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if not isinstance(document, dict) or not isinstance(document.get("errors"), list):
        return None
    request_id = document.get("request_id")
    errors = [error for error in document["errors"] if isinstance(error, dict)]
    return (request_id if isinstance(request_id, str) else None), errors


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After in seconds; ShipEngine sends seconds, an HTTP date is not worth guessing."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
