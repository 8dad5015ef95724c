"""Replaying stored deliveries: filing them again is harmless, so it is the repair for anything.

POST /v1/webhooks/deliveries/{id}/replay re-files one delivery; POST
/v1/webhooks/deliveries/replay re-files every original received in a time range, or with
`"dry_run": true` only says how many it would.
"""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from service.api.body import read_json
from service.api.errors import NotFound
from service.api.keys import ENGINE, SETTINGS
from service.api.operations import JSON_BODY_ERRORS, Answer, operation
from service.api.schemas import DELIVERY_ID, ReplayRangeResult, ReplayResult, parse_body
from service.db import deliveries
from service.db.tables import BIGINT_MAX
from service.domain.access import Scope

routes = web.RouteTableDef()

REPLAY_CHUNK = 100


class ReplayRange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    received_from: datetime
    received_to: datetime
    dry_run: bool = False

    @field_validator("received_from", "received_to")
    @classmethod
    def _storable(cls, value: datetime) -> datetime:
        # PostgreSQL's timestamps run from 4713 BC to 294276 AD, Python's from year 1 to 9999:
        # what converts to UTC within Python's range also fits PostgreSQL's.
        try:
            return value.astimezone(UTC)
        except (OverflowError, ValueError):
            raise ValueError("must be a time between years 1 and 9999 in UTC") from None

    @model_validator(mode="after")
    def _ordered(self) -> ReplayRange:
        if self.received_to <= self.received_from:
            raise ValueError("received_to must be after received_from")
        return self


@routes.post("/v1/webhooks/deliveries/{id}/replay")
@operation(
    "File a stored delivery again",
    tag="webhooks",
    scopes=(Scope.OPS,),
    path_params=DELIVERY_ID,
    answers={200: Answer(ReplayResult, "What filing it again changed")},
    errors=(404,),
)
async def replay_one(request: web.Request) -> web.Response:
    delivery_id = _delivery_id(request)
    async with request.app[ENGINE].begin() as conn:
        filed = await deliveries.replay_one(conn, delivery_id, request.app[SETTINGS].rearm_policy)
    if filed is None:
        raise NotFound.resource("replayable delivery")
    return web.json_response(
        {
            "delivery_id": delivery_id,
            "outcome": filed.outcome,
            "subscription_id": str(filed.subscription_id) if filed.subscription_id else None,
            "new_events": filed.new_events,
            "status_changed": filed.status_changed,
        }
    )


@routes.post("/v1/webhooks/deliveries/replay")
@operation(
    "File again every original delivery received in a time range",
    tag="webhooks",
    scopes=(Scope.OPS,),
    body=ReplayRange,
    answers={200: Answer(ReplayRangeResult, "How many matched, and their outcomes")},
    errors=JSON_BODY_ERRORS,
)
async def replay_range(request: web.Request) -> web.Response:
    """Re-filed a chunk per transaction, so a long replay holds no long locks."""
    wanted: ReplayRange = parse_body(ReplayRange, await read_json(request))
    engine, rearm = request.app[ENGINE], request.app[SETTINGS].rearm_policy
    async with engine.connect() as conn:
        ids = await deliveries.deliveries_to_replay(conn, wanted.received_from, wanted.received_to)
    outcomes: dict[str, int] = {}
    if not wanted.dry_run:
        for start in range(0, len(ids), REPLAY_CHUNK):
            chunk = ids[start : start + REPLAY_CHUNK]
            async with engine.begin() as conn:
                for filed in await deliveries.replay(conn, chunk, rearm):
                    outcomes[filed.outcome] = outcomes.get(filed.outcome, 0) + 1
    return web.json_response({"dry_run": wanted.dry_run, "matched": len(ids), "outcomes": outcomes})


def _delivery_id(request: web.Request) -> int:
    """An id this service could have issued (a positive bigint), or there is no such delivery."""
    try:
        delivery_id = int(request.match_info["id"])
    except ValueError:
        delivery_id = 0
    if not 0 < delivery_id <= BIGINT_MAX:
        raise NotFound.resource("replayable delivery")
    return delivery_id
