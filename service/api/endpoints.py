"""/v1/endpoints: the registry of consumers' notification endpoints, what was sent to each,
and asking for sends (a replay, a ping).

An endpoint belongs to the client whose token made it: a client sees and changes its own only
(another's is a 404, as if it were not there); an `ops` token sees and changes every one. The
signing secret is answered twice only: when the endpoint is made, and when it is rotated.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Self

import sqlalchemy as sa
from aiohttp import web
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from service.api.auth import CLIENT, Forbidden, has_scope
from service.api.body import read_json
from service.api.changes import cursor_errors, decode_cursor, encode_cursor
from service.api.errors import ErrorDetail, NotFound, TooManyRequests, ValidationFailed
from service.api.keys import ENGINE, NOTIFY_HTTP, PINGS_IN_FLIGHT, SETTINGS
from service.api.operations import JSON_BODY_ERRORS, Answer, Param, json_answer, operation
from service.api.schemas import QueryInt, parse_body, parse_query, path_id
from service.api.subscriptions import READERS
from service.db import changes as feed
from service.db import endpoints as queries
from service.db import notify
from service.db.endpoints import NewEndpoint
from service.db.notify import Attempt
from service.db.tables import BIGINT_MAX
from service.domain.access import Scope
from service.domain.changes import ChangeType
from service.domain.endpoints import (
    DESCRIPTION_MAX_CHARS,
    PREVIOUS_SECRET_LIFETIME,
    RATE_LIMIT_MAX_PER_S,
    RATE_LIMIT_MIN_PER_S,
    URL_MAX_CHARS,
    EndpointState,
    UrlRefused,
    ip_literal,
    new_secret,
    parse_url,
    refused_address,
)
from service.domain.notifications import PING_TYPE, NotifyOutcome, ping
from service.notify import sending

routes = web.RouteTableDef()

TAG = "endpoints"
WRITERS = (Scope.WRITE, Scope.OPS)
ENDPOINT_ID = {"id": Param({"type": "string", "format": "uuid"}, "the endpoint's id")}
# How long a URL's host may take to resolve before it is taken without that check: the sender
# checks every address again at send time, so a name that does not resolve yet (a consumer not
# deployed yet) may still be registered.
RESOLVE_TIMEOUT_S = 2.0
# Pings of one client in flight at once, in one API process.
PINGS_PER_CLIENT = 2

Url = Annotated[str, StringConstraints(min_length=1, max_length=URL_MAX_CHARS)]
Description = Annotated[str, StringConstraints(max_length=DESCRIPTION_MAX_CHARS)]
Types = Annotated[list[ChangeType], Field(min_length=1, max_length=64)]
RatePerSecond = Annotated[float, Field(ge=RATE_LIMIT_MIN_PER_S, le=RATE_LIMIT_MAX_PER_S)]

TYPES_MEANING = "the change types it receives; absent or null: every type, those added later too"
RATE_MEANING = "sends to it at most this many per second; null: no limit"


class EndpointIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Url = Field(
        description="http(s); not a link-local or metadata address; one of "
        "NOTIFY_ALLOWED_HOSTS when that is set"
    )
    types: Types | None = Field(default=None, description=TYPES_MEANING)
    description: Description | None = None
    rate_limit_per_s: RatePerSecond | None = Field(default=None, description=RATE_MEANING)
    all_clients: bool = Field(
        default=False,
        strict=True,
        description="receive every client's changes, not only its own client's: `ops` only",
    )


class EndpointPatch(BaseModel):
    """The fields given are changed; those absent are kept."""

    model_config = ConfigDict(extra="forbid")

    url: Url | None = Field(default=None, description="absent: unchanged; never null")
    types: Types | None = Field(default=None, description=TYPES_MEANING)
    description: Description | None = None
    rate_limit_per_s: RatePerSecond | None = Field(default=None, description=RATE_MEANING)

    @field_validator("url")
    @classmethod
    def _url_not_null(cls, value: str | None) -> str:
        if value is None:  # only when given: a default is not validated
            raise ValueError("an endpoint always has a URL")
        return value


class EndpointOut(BaseModel):
    id: uuid.UUID
    url: str
    types: list[ChangeType] | None = Field(description="null: every type")
    description: str | None
    state: EndpointState
    disabled_reason: str | None = Field(description="why the sender disabled it")
    created_by: str = Field(description="the client whose token made it")
    all_clients: bool
    rate_limit_per_s: float | None
    previous_secret_expires_at: datetime | None = Field(
        description="after a rotation, until when the previous secret is in force too"
    )
    created_at: datetime
    updated_at: datetime


class EndpointWithSecret(EndpointOut):
    secret: str = Field(
        description="`whsec_` + base64 of random bytes: shown in this answer only, keep it"
    )


class EndpointList(BaseModel):
    items: list[EndpointOut] = Field(description="newest first")


@routes.post("/v1/endpoints")
@operation(
    "Register an endpoint for notifications",
    tag=TAG,
    scopes=WRITERS,
    body=EndpointIn,
    description=(
        "The answer holds the endpoint's signing secret, which is never shown again (rotate "
        "it to get a new one). It receives what commits from now on."
    ),
    answers={201: Answer(EndpointWithSecret, "The endpoint, `enabled`, with its secret")},
    errors=JSON_BODY_ERRORS,
)
async def create_endpoint(request: web.Request) -> web.Response:
    body: EndpointIn = parse_body(EndpointIn, await read_json(request))
    if body.all_clients and not has_scope(request, Scope.OPS):
        raise Forbidden(
            ErrorDetail(
                "security",
                "forbidden",
                "all_clients: needs a token with the scope ops",
                "all_clients",
            )
        )
    new = NewEndpoint(
        url=await checked_url(request, body.url),
        types=_types(body.types),
        description=body.description,
        rate_limit_per_s=body.rate_limit_per_s,
        all_clients=body.all_clients,
        created_by=request[CLIENT],
        secret=new_secret(),
    )
    async with request.app[ENGINE].begin() as conn:
        row = await queries.create_endpoint(conn, new)
    return json_answer(EndpointWithSecret.model_validate(dict(row)), status=201)


@routes.get("/v1/endpoints")
@operation(
    "List endpoints, newest first",
    tag=TAG,
    scopes=READERS,
    description="The caller's client's endpoints; every client's to an `ops` token.",
    answers={200: Answer(EndpointList, "The endpoints, without their secrets")},
)
async def list_endpoints(request: web.Request) -> web.Response:
    async with request.app[ENGINE].connect() as conn:
        rows = await queries.list_endpoints(conn, _owner(request))
    return json_answer(EndpointList.model_validate({"items": [dict(row) for row in rows]}))


@routes.get("/v1/endpoints/{id}")
@operation(
    "One endpoint",
    tag=TAG,
    scopes=READERS,
    path_params=ENDPOINT_ID,
    answers={200: Answer(EndpointOut, "The endpoint, without its secret")},
    errors=(404,),
)
async def get_endpoint(request: web.Request) -> web.Response:
    async with request.app[ENGINE].connect() as conn:
        row = await queries.get_endpoint(conn, endpoint_id_of(request), _owner(request))
    return _endpoint_answer(row)


@routes.patch("/v1/endpoints/{id}")
@operation(
    "Change an endpoint",
    tag=TAG,
    scopes=WRITERS,
    path_params=ENDPOINT_ID,
    body=EndpointPatch,
    description="`url`, `types`, `description`, `rate_limit_per_s`: those given are changed.",
    answers={200: Answer(EndpointOut, "The endpoint as changed, without its secret")},
    errors=(404, *JSON_BODY_ERRORS),
)
async def change_endpoint(request: web.Request) -> web.Response:
    endpoint_id, owner = endpoint_id_of(request), _owner(request)
    body: EndpointPatch = parse_body(EndpointPatch, await read_json(request))
    changes: dict[str, Any] = {name: getattr(body, name) for name in body.model_fields_set}
    if "url" in changes:
        changes["url"] = await checked_url(request, changes["url"])
    if "types" in changes:
        changes["types"] = _types(body.types)
    async with request.app[ENGINE].begin() as conn:
        if changes:
            row = await queries.update_endpoint(conn, endpoint_id, owner, changes)
        else:
            row = await queries.get_endpoint(conn, endpoint_id, owner)
    return _endpoint_answer(row)


@routes.delete("/v1/endpoints/{id}")
@operation(
    "Delete an endpoint",
    tag=TAG,
    scopes=WRITERS,
    path_params=ENDPOINT_ID,
    answers={204: Answer(None, "Deleted")},
    errors=(404,),
)
async def delete_endpoint(request: web.Request) -> web.Response:
    async with request.app[ENGINE].begin() as conn:
        deleted = await queries.delete_endpoint(conn, endpoint_id_of(request), _owner(request))
    if not deleted:
        raise NotFound.resource("endpoint")
    return web.Response(status=204)


@routes.post("/v1/endpoints/{id}/rotate-secret")
@operation(
    "Give an endpoint a new signing secret",
    tag=TAG,
    scopes=WRITERS,
    path_params=ENDPOINT_ID,
    description=(
        "The new secret is shown in this answer only. The one it replaces stays in force for "
        "24 hours (`previous_secret_expires_at`), notifications signed under both, so the "
        "consumer can switch without losing any; a secret still in force from an earlier "
        "rotation is dropped."
    ),
    answers={201: Answer(EndpointWithSecret, "The endpoint with its new secret")},
    errors=(404,),
)
async def rotate_secret(request: web.Request) -> web.Response:
    async with request.app[ENGINE].begin() as conn:
        row = await queries.rotate_secret(
            conn,
            endpoint_id_of(request),
            _owner(request),
            new_secret(),
            PREVIOUS_SECRET_LIFETIME,
        )
    if row is None:
        raise NotFound.resource("endpoint")
    return json_answer(EndpointWithSecret.model_validate(dict(row)), status=201)


@routes.post("/v1/endpoints/{id}/enable")
@operation(
    "Enable an endpoint again",
    tag=TAG,
    scopes=WRITERS,
    path_params=ENDPOINT_ID,
    description="`enabled`, its `disabled_reason` cleared; an enabled one stays as it is.",
    answers={200: Answer(EndpointOut, "The endpoint, enabled")},
    errors=(404,),
)
async def enable_endpoint(request: web.Request) -> web.Response:
    async with request.app[ENGINE].begin() as conn:
        row = await queries.enable_endpoint(
            conn, endpoint_id_of(request), _owner(request), datetime.now(UTC)
        )
    return _endpoint_answer(row)


class ReplayIn(BaseModel):
    """Exactly one of the two."""

    model_config = ConfigDict(extra="forbid")

    after: str | None = Field(default=None, description="a change feed cursor: after it")
    since: AwareDatetime | None = Field(
        default=None, description="the changes made since then (RFC 3339, with its offset)"
    )

    @model_validator(mode="after")
    def _one_of_them(self) -> Self:
        if (self.after is None) == (self.since is None):
            raise ValueError("give `after` or `since`, one of them")
        return self

    @field_validator("since")
    @classmethod
    def _in_utc(cls, value: datetime | None) -> datetime | None:
        try:
            return None if value is None else value.astimezone(UTC)
        except OverflowError:  # year 1 with an offset east of UTC
            raise ValueError("is out of range") from None


class ReplayOut(BaseModel):
    endpoint_id: uuid.UUID
    replaying_after: str | None = Field(
        description="the cursor after which its changes are sent again; null: none is that "
        "recent, nothing to send"
    )


class NotifyAttemptOut(BaseModel):
    id: int
    message_id: str = Field(description="`webhook-id`: `chg_...` for a change, `ping_...`")
    subscription_id: uuid.UUID | None
    type: str
    attempt: int = Field(description="1 for the first send of the message, then each retry")
    outcome: NotifyOutcome
    status_code: int | None
    latency_ms: float
    response: str | None = Field(description="the first 4 KiB of the answer's body")
    attempted_at: datetime


class NotifyAttemptList(BaseModel):
    items: list[NotifyAttemptOut] = Field(description="newest first")
    next_before: int | None = Field(
        description="pass it as `before` for the next page; null: no more"
    )


class AttemptsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    before: QueryInt | None = Field(
        default=None, ge=1, le=BIGINT_MAX, description="older than this attempt"
    )
    limit: QueryInt = Field(default=50, ge=1, le=500)


@routes.post("/v1/endpoints/{id}/replay")
@operation(
    "Send an endpoint's changes again",
    tag=TAG,
    scopes=WRITERS,
    path_params=ENDPOINT_ID,
    body=ReplayIn,
    description=(
        "Every change the endpoint wants after the cursor `after`, or made since `since`, is "
        "sent again, in order per subscription and with its own `webhook-id` (so a consumer "
        "that already has one can tell). A change still waiting to be sent is sent once."
    ),
    answers={202: Answer(ReplayOut, "Queued for sending")},
    errors=(404, 410, *JSON_BODY_ERRORS),
)
async def replay_endpoint(request: web.Request) -> web.Response:
    endpoint_id, owner = endpoint_id_of(request), _owner(request)
    body: ReplayIn = parse_body(ReplayIn, await read_json(request))
    asked = decode_cursor(body.after) if body.after is not None else None
    async with request.app[ENGINE].begin() as conn:
        if await queries.get_endpoint(conn, endpoint_id, owner) is None:
            raise NotFound.resource("endpoint")
        if body.since is not None:
            asked = await feed.position_before(conn, body.since)
        if asked is not None:
            with cursor_errors():
                await feed.check(conn, asked)
            await queries.rewind(conn, endpoint_id, asked)
    after = encode_cursor(asked) if asked is not None else None
    return json_answer(ReplayOut(endpoint_id=endpoint_id, replaying_after=after), status=202)


@routes.post("/v1/endpoints/{id}/test")
@operation(
    "Send a ping to an endpoint now",
    tag=TAG,
    scopes=WRITERS,
    path_params=ENDPOINT_ID,
    description=(
        'A `ping` (`{"type": "ping", ...}`), signed as every notification is, sent '
        "now, disabled endpoints too; the answer is the attempt. It changes nothing of the "
        "endpoint, whatever the consumer answers."
    ),
    answers={200: Answer(NotifyAttemptOut, "The attempt, as `attempts` will show it")},
    errors=(404, 429),
)
async def ping_endpoint(request: web.Request) -> web.Response:
    endpoint_id = endpoint_id_of(request)
    async with request.app[ENGINE].connect() as conn:
        target = await queries.target_of(conn, endpoint_id, _owner(request))
    if target is None:
        raise NotFound.resource("endpoint")
    # A client's pings to a consumer that never answers hold the process's ping connections
    # for NOTIFY_TIMEOUT_S each: a few per client, so one client cannot take them all.
    in_flight, client = request.app[PINGS_IN_FLIGHT], request[CLIENT]
    if in_flight[client] >= PINGS_PER_CLIENT:
        raise TooManyRequests(
            ErrorDetail(
                "business_rules",
                "too_many_pings",
                f"at most {PINGS_PER_CLIENT} pings of one client in flight; retry when one ends",
            )
        )
    in_flight[client] += 1
    try:
        row = await _ping(request, target)
    finally:
        in_flight[client] -= 1
        if not in_flight[client]:
            del in_flight[client]
    return json_answer(NotifyAttemptOut.model_validate(dict(row)))


async def _ping(request: web.Request, target: notify.Target) -> Any:
    """Send the ping and keep its attempt."""
    settings = request.app[SETTINGS]
    now = datetime.now(UTC)
    message_id, body = ping(target.endpoint_id, now)
    answer = await sending.post(
        request.app[NOTIFY_HTTP],
        target.url,
        message_id=message_id,
        body=body,
        secrets=target.secrets,
        timeout_s=settings.notify_timeout_s,
        allowed_hosts=settings.notify_allowed_hosts,
    )
    attempt = Attempt.of(target.endpoint_id, message_id, None, PING_TYPE, 1, answer, now)
    try:
        async with request.app[ENGINE].begin() as conn:
            (row,) = await notify.record_attempts(conn, [attempt])
    except sa.exc.IntegrityError:  # deleted while the ping was on its way
        raise NotFound.resource("endpoint") from None
    return row


@routes.get("/v1/endpoints/{id}/attempts")
@operation(
    "An endpoint's send attempts, newest first",
    tag=TAG,
    scopes=READERS,
    path_params=ENDPOINT_ID,
    query=AttemptsQuery,
    description="Every send, retries and pings too, kept as long as the change feed.",
    answers={200: Answer(NotifyAttemptList, "A page of attempts")},
    errors=(400, 404),
)
async def list_endpoint_attempts(request: web.Request) -> web.Response:
    endpoint_id = endpoint_id_of(request)
    query: AttemptsQuery = parse_query(AttemptsQuery, request.query)
    async with request.app[ENGINE].connect() as conn:
        if await queries.get_endpoint(conn, endpoint_id, _owner(request)) is None:
            raise NotFound.resource("endpoint")
        rows = await queries.list_attempts(
            conn, endpoint_id, before=query.before, limit=query.limit
        )
    items = [NotifyAttemptOut.model_validate(dict(row)) for row in rows]
    more = items[-1].id if len(items) == query.limit else None
    return json_answer(NotifyAttemptList(items=items, next_before=more))


async def checked_url(request: web.Request, raw: str) -> str:
    """`raw`, if an endpoint may have it (`parse_url`, and no address its host resolves to is
    refused); else a 422 saying why."""
    try:
        url = parse_url(raw, request.app[SETTINGS].notify_allowed_hosts)
        for address in await resolve(url.host, url.port):
            if reason := refused_address(address):
                raise UrlRefused(f"must not point at {reason}: {url.host} resolves to it")
    except UrlRefused as refused:
        raise ValidationFailed(
            ErrorDetail("validation", "invalid_field_value", f"url: {refused}", "url")
        ) from None
    return url.url


async def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to now; none when it does not, or not within
    RESOLVE_TIMEOUT_S (then the check at send time is the one that counts)."""
    if ip_literal(host) is not None:
        return [host]  # `parse_url` checked it already
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            found = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
    except (OSError, TimeoutError, UnicodeError, ValueError):
        return []
    return [str(info[4][0]) for info in found]


def endpoint_id_of(request: web.Request) -> uuid.UUID:
    return path_id(request, "endpoint")


def _owner(request: web.Request) -> str | None:
    """Whose endpoints the caller may see and change: its client's, or (ops) anyone's."""
    return None if has_scope(request, Scope.OPS) else request[CLIENT]


def _types(types: list[ChangeType] | None) -> list[str] | None:
    return sorted({change_type.value for change_type in types}) if types is not None else None


def _endpoint_answer(row: Any) -> web.Response:
    if row is None:
        raise NotFound.resource("endpoint")
    return json_answer(EndpointOut.model_validate(dict(row)))
