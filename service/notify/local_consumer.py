"""The consumer `make run` registers, so a newcomer sees a notification arrive: it checks each
notification's signature as a consumer should, and prints what it was told.

A real consumer would use a Standard Webhooks library (README, "Notifications"); this one
checks by hand, in the few lines the specification takes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping

from aiohttp import web

from service.domain.notifications import secret_key

# A notification older or newer than this is refused, as the specification's libraries do:
# a replayed capture is no good after it.
TOLERANCE_S = 300
SECRET = web.AppKey("secret", str)


def create_local_consumer(secret: str) -> web.Application:
    app = web.Application(client_max_size=1024**2)
    app[SECRET] = secret
    app.router.add_post("/notifications", receive)
    return app


async def receive(request: web.Request) -> web.Response:
    body = await request.read()
    if not verified(request.app[SECRET], request.headers, body, time.time()):
        print("local consumer: a notification with a bad signature, refused", flush=True)
        return web.Response(status=401)
    change = json.loads(body)
    data = change.get("data", {})
    print(
        f"local consumer: {change['type']} {data.get('tracking_number', '')} "
        f"{data.get('status_code') or data.get('state') or ''} ({change['id']})",
        flush=True,
    )
    return web.Response(status=204)


def verified(secret: str, headers: Mapping[str, str], body: bytes, now: float) -> bool:
    """Whether one of `webhook-signature`'s signatures is ours, for a recent timestamp."""
    message_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    signatures = headers.get("webhook-signature", "")
    if not (message_id and signatures and timestamp.isascii() and timestamp.isdigit()):
        return False
    if abs(now - int(timestamp)) > TOLERANCE_S:
        return False
    signed = f"{message_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(secret_key(secret), signed, hashlib.sha256).digest())
    return any(
        hmac.compare_digest(f"v1,{expected.decode()}", given) for given in signatures.split(" ")
    )
