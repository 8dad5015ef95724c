"""Sending `track` webhooks to the API as ShipEngine does: signed with the simulator's keys."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from service.simulator import SigningKeys

WEBHOOK = "/v1/webhooks/shipengine"


class WebhookSender:
    def __init__(self, api: TestClient[web.Request, web.Application], keys: SigningKeys) -> None:
        self.api = api
        self.keys = keys

    async def deliver(
        self,
        body: dict[str, Any] | bytes,
        status: int = 200,
        *,
        headers: dict[str, str] | None = None,
        sign: bool = True,
        content_type: str = "application/json",
    ) -> Any:
        """POST the body signed like ShipEngine; assert the status; return the JSON answer."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        sent = {"Content-Type": content_type, "X-Custom": "kept"}
        if sign:
            sent |= self.keys.headers(data)
        sent |= headers or {}
        response = await self.api.post(WEBHOOK, data=data, headers=sent)
        assert response.status == status, await response.text()
        return await response.json()
