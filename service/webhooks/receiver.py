"""POST /v1/webhooks/shipengine: ShipEngine's `track` deliveries.

A delivery is answered 2xx only after its raw bytes, headers and verification are committed
together with what it filed (deliveries that arrive together share a commit:
`db/group_commit.py`); if anything fails first, ShipEngine gets an error and delivers it again.
Refusals are answered at once and counted; a few are kept as a small sample so ops can see them
(`webhooks/refusals.py`):

| what | answer |
|---|---|
| no signature headers | 404 (ShipEngine's guide: the endpoint need not reveal itself), unread |
| timestamp more than WEBHOOK_TIMESTAMP_TOLERANCE_S from now | 400 (a replay, or a clock to fix) |
| bad signature, unknown key, unreadable signature headers, wrong shared secret | 401 |
| ShipEngine's keys cannot be fetched | 503: our problem, ShipEngine retries later |
| body over WEBHOOK_MAX_BYTES | 413, before the body is read |
| not application/json | 415 |
| not a JSON object, or nested deeper than MAX_JSON_DEPTH | 400 |
| the database is down | 503 (nothing was stored, so nothing may be acknowledged) |
"""

from __future__ import annotations

import orjson
import structlog
from aiohttp import web

from service import json_exact
from service.api.errors import ApiError, ErrorDetail
from service.api.keys import DELIVERY_COMMITS, ENGINE, METRICS, SETTINGS, VERIFIER
from service.api.operations import Answer, Param, operation
from service.api.schemas import TrackWebhook, WebhookReceipt
from service.db.deliveries import FiledDelivery, Incoming, record_refusal
from service.domain.deliveries import DeliveryOutcome
from service.domain.tracking import json_depth_exceeds
from service.webhooks.refusals import REFUSALS, sample, stored_headers
from service.webhooks.signatures import (
    KEY_ID_HEADER,
    SIGNATURE_HEADER,
    SIGNATURE_HEADERS,
    TIMESTAMP_HEADER,
    Refusal,
    secret_matches,
)

log = structlog.get_logger(__name__)

routes = web.RouteTableDef()

# A track delivery nests five levels or so; JSON deeper than this is refused before anything
# that recurses per level (the parser, the content hash) sees it.
MAX_JSON_DEPTH = 64

_REFUSAL_STATUS = {
    Refusal.MISSING_HEADERS: 404,
    Refusal.STALE_TIMESTAMP: 400,
    Refusal.MALFORMED_HEADERS: 401,
    Refusal.UNKNOWN_KEY: 401,
    Refusal.BAD_SIGNATURE: 401,
    Refusal.KEYS_UNAVAILABLE: 503,
}


class Refused(ApiError):
    """A delivery we will not acknowledge; `reason` is what is recorded and counted."""

    def __init__(self, status: int, reason: str, message: str, error_type: str) -> None:
        code = "request_too_large" if status == 413 else reason
        super().__init__(ErrorDetail(error_type, code, message))
        self.status = status
        self.reason = reason


@routes.post("/v1/webhooks/shipengine")
@operation(
    "ShipEngine's `track` webhook",
    tag="webhooks",
    description=(
        "Authenticated by ShipEngine's RSA-SHA256 signature over `timestamp.body`, not by a "
        "token: no signature headers is 404, a stale timestamp 400, a bad signature or "
        "unknown key 401, unfetchable keys 503. A custom header registered with the webhook "
        "(`WEBHOOK_SECRET_HEADER`) may also be required."
    ),
    body=TrackWebhook,
    headers={
        KEY_ID_HEADER: Param({"type": "string"}, "the JWKS key that signed it"),
        SIGNATURE_HEADER: Param({"type": "string"}, "base64 RSA-SHA256 signature"),
        TIMESTAMP_HEADER: Param({"type": "string"}, "when it was signed"),
    },
    # Written by orjson from a dict, not from the model: the hot path stays as fast.
    answers={200: Answer(WebhookReceipt, "Stored and filed (or an orphan, or a duplicate)")},
    errors=(400, 401, 404, 413, 415, 503),
)
async def receive_track(request: web.Request) -> web.Response:
    body = b""
    verification = "skipped"
    try:
        _check_headers(request)
        body = await _read_body(request)
        verification = await _verify(request, body)
        payload = _payload(request, body)
    except Refused as refused:
        await _record_refusal(request, body, refused, verification)
        raise
    incoming = Incoming.read(
        payload,
        body,
        headers=stored_headers(
            request.headers.items(), request.app[SETTINGS].webhook_secret_header
        ),
        verification=verification,
    )
    update = incoming.update
    filed = await request.app[DELIVERY_COMMITS].submit(incoming)
    _observe(request, filed, update.status_code)
    # Routine filings are counted, not logged (at INFO a line each was a tenth of the
    # receiver's CPU); a package we do not know and a refused regression are worth a line.
    notable = filed.outcome == DeliveryOutcome.ORPHAN or filed.regression
    (log.info if notable else log.debug)(
        "webhook.delivery",
        delivery_id=filed.delivery_id,
        outcome=filed.outcome,
        subscription_id=str(filed.subscription_id) if filed.subscription_id else None,
        tracking_number=update.tracking_number,
        status_code=update.status_code,
        new_events=filed.new_events,
        status_changed=filed.status_changed,
        regression=filed.regression,
    )
    answer = {
        "delivery_id": filed.delivery_id,
        "outcome": filed.outcome,
        "subscription_id": str(filed.subscription_id) if filed.subscription_id else None,
    }
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


def _check_headers(request: web.Request) -> None:
    """What the headers alone decide, before a byte of the body is read. A request without
    ShipEngine's signature headers is most of what a flood of junk looks like: it costs a
    lookup of three headers, no JSON, no key fetch, no row."""
    settings = request.app[SETTINGS]
    if settings.webhook_verify:
        missing = [name for name in SIGNATURE_HEADERS if not request.headers.get(name, "").strip()]
        if missing:
            detail = f"missing {', '.join(missing)}"
            raise Refused(404, Refusal.MISSING_HEADERS.value, detail, "security")
    if settings.webhook_secret_header and settings.webhook_secret:
        # Sent twice, it is not the one header we registered.
        presented = request.headers.getall(settings.webhook_secret_header, [])
        if len(presented) != 1 or not secret_matches(
            presented[0], settings.webhook_secret.get_secret_value()
        ):
            raise Refused(401, "bad_secret", "the shared secret header is wrong", "security")


async def _read_body(request: web.Request) -> bytes:
    limit = request.app[SETTINGS].webhook_max_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)  # refused on the header alone, before a byte of the body is read
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None


def _too_large(limit: int) -> Refused:
    return Refused(413, "too_large", f"the body exceeds {limit} bytes", "validation")


async def _verify(request: web.Request, body: bytes) -> str:
    if not request.app[SETTINGS].webhook_verify:
        return "skipped"
    verification = await request.app[VERIFIER].verify(request.headers, body)
    if verification.refusal is not None:
        reason = verification.refusal.value
        status = _REFUSAL_STATUS[verification.refusal]
        error_type = "system" if status == 503 else "security"
        raise Refused(status, reason, verification.detail, error_type)
    return "verified"


def _payload(request: web.Request, body: bytes) -> dict[str, object]:
    if request.content_type != "application/json":
        raise Refused(
            415,
            "unsupported_media_type",
            f"expected application/json, got {request.content_type}",
            "validation",
        )
    if json_depth_exceeds(body, MAX_JSON_DEPTH):
        raise Refused(
            400, "too_deep", f"the body nests deeper than {MAX_JSON_DEPTH} levels", "validation"
        )
    payload = _parse(body)
    if not isinstance(payload, dict):
        raise Refused(400, "not_an_object", "a track webhook body is a JSON object", "validation")
    return payload


def _parse(body: bytes) -> object:
    """Any JSON (a delivery is never refused for its shape), its text Unicode."""
    try:
        return json_exact.loads(body)
    except (ValueError, RecursionError):  # RecursionError: kept, should the depth limit grow
        raise Refused(400, "invalid_json", "the body is not valid JSON", "validation") from None


async def _record_refusal(
    request: web.Request, body: bytes, refused: Refused, verification: str
) -> None:
    """Counted always; stored as a sample when the ledger allows, else counted as unstored."""
    metrics = request.app[METRICS]
    metrics.webhook_refusals.labels(refused.reason).inc()
    if not request.app[REFUSALS].store(refused.reason):
        metrics.webhook_refusals_unstored.labels(refused.reason).inc()
        # A line each would cost what storing it was spared: a flood is seen in the counts.
        log.debug("webhook.refused", reason=refused.reason, status=refused.status, stored=False)
        return
    log.warning("webhook.refused", reason=refused.reason, status=refused.status, bytes=len(body))
    headers, kept = sample(request.headers, body, request.app[SETTINGS].webhook_secret_header)
    try:
        async with request.app[ENGINE].begin() as conn:
            await record_refusal(
                conn, headers=headers, body=kept, refusal=refused.reason, verification=verification
            )
    except Exception:
        # The refusal is answered all the same; only its record is lost, and the log has it.
        log.exception("webhook.refusal_not_recorded", reason=refused.reason)


def _observe(request: web.Request, filed: FiledDelivery, status_code: str | None) -> None:
    metrics = request.app[METRICS]
    metrics.webhook_deliveries.labels(filed.outcome).inc()
    if filed.status_changed:
        metrics.status_changes.labels(status_code or "").inc()
    if filed.regression:
        metrics.status_regressions.inc()
    if filed.rearmed:
        metrics.rearms.inc()
