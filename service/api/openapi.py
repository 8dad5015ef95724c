"""GET /v1/openapi.json: the whole API as an OpenAPI 3.1 document, built from the code itself.

`OPERATIONS` is the single registry of what the app serves: each entry names its handler (whose
`__scopes__`, set by `@requires`, become its security requirements), its query, body and
response models, and the error statuses it can answer. The JSON Schemas come from the pydantic
models that validate requests and shape answers, so the document cannot drift from them;
`tests/test_openapi.py` checks that the registry covers exactly the app's routes and fuzzes the
running API against the document.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from service.api import health, ops, subscriptions
from service.api.auth import PUBLIC_PATHS, requires
from service.api.middleware import REQUEST_ID_HEADER
from service.api.ops import BulkRetry, FailuresQuery, PauseRequest, StuckQuery
from service.api.schemas import (
    AttemptList,
    BatchIn,
    EventList,
    ListQuery,
    StatusChangeList,
    SubscriptionIn,
    SubscriptionOut,
    SubscriptionPage,
)
from service.domain.access import Scope
from service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from service.webhooks import receiver, replay
from service.webhooks.replay import ReplayRange
from service.webhooks.signatures import KEY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER

OPENAPI_VERSION = "3.1.0"
SECURITY_SCHEME = "bearerAuth"
SCHEMA_REF = "#/components/schemas/{model}"
# `x-scopes` on an operation: the scopes of which a token needs any one.
SCOPES_EXTENSION = "x-scopes"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

routes = web.RouteTableDef()


# --- The API's error shape, and the answers that are plain dicts in their handlers -------------


class ErrorItem(BaseModel):
    error_source: str = Field(description="`tracking_service` for this service's own errors")
    error_type: str = Field(description="`validation`, `security`, `business_rules`, `system`")
    error_code: str = Field(description="e.g. `invalid_field_value`, `not_found`, `forbidden`")
    message: str
    field_name: str | None = Field(default=None, description="the field at fault, if one is")


class ErrorBody(BaseModel):
    """Every error, whatever its cause, in ShipEngine's error shape."""

    request_id: str
    errors: list[ErrorItem] = Field(min_length=1)


class BatchItemResult(BaseModel):
    index: int
    status: Literal[200, 202, 422] = Field(description="as the single subscribe answers it")
    subscription: SubscriptionOut | None = Field(default=None, description="when 200 or 202")
    errors: list[ErrorItem] | None = Field(default=None, description="when 422")


class BatchResult(BaseModel):
    results: list[BatchItemResult] = Field(description="one per item, in order")


class Health(BaseModel):
    status: Literal["ok"]


class DispatchState(BaseModel):
    paused: bool
    kind: str | None = Field(default=None, description="`account`, `rate_limit` or `manual`")
    until: datetime | None = None
    reason: dict[str, Any] | None = None


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str]
    dispatch: DispatchState | None = Field(default=None, description="only when ready")


class DispatchSummary(BaseModel):
    backlog: int
    oldest_due_s: float
    paused: bool
    pause_kind: str | None
    pause_reason: dict[str, Any] | None


class OpsSummary(BaseModel):
    by_state: dict[str, int]
    by_status_code: dict[str, int]
    by_carrier: dict[str, int]
    dispatch: DispatchSummary
    failures_by_error_code: dict[str, int]
    deliveries_last_hour: dict[str, int] = Field(
        description="by outcome; refusals as `refused:<reason>`"
    )
    as_of: datetime


class TimelineEntry(BaseModel):
    at: datetime
    kind: Literal["created", "start_attempt", "stop_attempt", "webhook", "poll", "status_change"]
    detail: dict[str, Any]


class Timeline(BaseModel):
    items: list[TimelineEntry]


class Stuck(BaseModel):
    pending: list[SubscriptionOut]
    silent: list[SubscriptionOut]


class FailureGroup(BaseModel):
    count: int
    examples: list[SubscriptionOut]


class Failures(BaseModel):
    by_error_code: dict[str, FailureGroup]


class BulkRetryResult(BaseModel):
    dry_run: bool
    matched: int


class PauseReason(BaseModel):
    message: str
    by: str = Field(description="the client whose token paused it")


class Paused(BaseModel):
    paused: Literal[True]
    kind: Literal["manual"]
    reason: PauseReason


class Resumed(BaseModel):
    paused: Literal[False]


class TrackWebhook(BaseModel):
    """ShipEngine's `track` webhook, read tolerantly: any JSON object is taken and kept."""

    model_config = ConfigDict(extra="allow")

    resource_url: str | None = None
    resource_type: str | None = None
    data: dict[str, Any] | None = None


Outcome = Literal["filed", "orphan", "duplicate"]


class WebhookReceipt(BaseModel):
    delivery_id: int
    outcome: Outcome
    subscription_id: str | None


class ReplayResult(BaseModel):
    delivery_id: int
    outcome: Outcome
    subscription_id: str | None
    new_events: int
    status_changed: bool


class ReplayRangeResult(BaseModel):
    dry_run: bool
    matched: int
    outcomes: dict[str, int]


class OpenApiDocument(BaseModel):
    """This document."""

    model_config = ConfigDict(extra="allow")

    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]


# --- The registry --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Param:
    schema: Mapping[str, Any]
    description: str = ""


@dataclasses.dataclass(frozen=True)
class Answer:
    """A successful answer: `model` in JSON, or text (`model` None) of `media_type`."""

    status: int
    model: type[BaseModel] | None
    description: str
    media_type: str = "application/json"


@dataclasses.dataclass(frozen=True)
class Operation:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    answers: tuple[Answer, ...]
    errors: tuple[int, ...] = ()
    description: str = ""
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    path_params: Mapping[str, Param] = dataclasses.field(default_factory=dict)
    headers: Mapping[str, Param] = dataclasses.field(default_factory=dict)

    @property
    def scopes(self) -> frozenset[Scope]:
        """What `@requires` put on the handler: a token needs any one of these."""
        scopes: frozenset[Scope] = getattr(self.handler, "__scopes__", frozenset())
        return scopes

    @property
    def needs_token(self) -> bool:
        """As the `authenticate` middleware decides it, or the handler itself (/metrics)."""
        v1 = self.path.startswith("/v1/") and self.path not in PUBLIC_PATHS
        return v1 or bool(self.scopes)


SUBSCRIPTION_ID = {
    "id": Param({"type": "string", "format": "uuid"}, "the subscription's id"),
}
DELIVERY_ID = {
    "id": Param(
        {"type": "integer", "format": "int64", "minimum": 1, "maximum": 2**63 - 1},
        "the stored delivery's id",
    ),
}

# Every /v1 operation with a token: it may be missing or unknown (401), lack the scope (403),
# and the token is looked up in the database (503 while that is unreachable).
AUTHED = (401, 403, 503)
JSON_BODY = (400, 413, 415, 422)

ERROR_DESCRIPTIONS = {
    400: "Unreadable: the body is not JSON, or a query parameter is invalid",
    401: "No token, or an unknown or revoked one",
    403: "The token lacks the scope",
    404: "No such resource",
    409: "Not allowed in the resource's current state",
    413: "The body is too large",
    415: "The body is not `application/json`",
    422: "A field is invalid: one error per field",
    503: "The database is unreachable; retry",
}


@routes.get("/v1/openapi.json")
@requires(Scope.READ, Scope.WRITE, Scope.OPS)
async def openapi(_: web.Request) -> web.Response:
    """This API as an OpenAPI 3.1 document."""
    return web.json_response(document())


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "POST",
        "/v1/subscriptions",
        subscriptions.subscribe,
        "Subscribe to a package's tracking",
        "subscriptions",
        (
            Answer(202, SubscriptionOut, "The new subscription, `pending` its start"),
            Answer(200, SubscriptionOut, "The live subscription of the same package"),
        ),
        AUTHED + JSON_BODY,
        body=SubscriptionIn,
    ),
    Operation(
        "POST",
        "/v1/subscriptions/batch",
        subscriptions.subscribe_many,
        "Subscribe to many packages at once",
        "subscriptions",
        (Answer(200, BatchResult, "Each item answered on its own, as the single form"),),
        AUTHED + JSON_BODY,
        description="Items are validated one by one: an invalid one is a 422 in `results`.",
        body=BatchIn,
    ),
    Operation(
        "GET",
        "/v1/subscriptions",
        subscriptions.list_subscriptions,
        "List subscriptions, newest first",
        "subscriptions",
        (Answer(200, SubscriptionPage, "A page; pass `next_cursor` back as `cursor`"),),
        (*AUTHED, 400),
        query=ListQuery,
    ),
    Operation(
        "GET",
        "/v1/subscriptions/{id}",
        subscriptions.get_subscription,
        "One subscription",
        "subscriptions",
        (Answer(200, SubscriptionOut, "The subscription"),),
        (*AUTHED, 404),
        path_params=SUBSCRIPTION_ID,
    ),
    Operation(
        "DELETE",
        "/v1/subscriptions/{id}",
        subscriptions.cancel_subscription,
        "Cancel a subscription",
        "subscriptions",
        (Answer(202, SubscriptionOut, "Cancelled: `stopping` until ShipEngine is told"),),
        (*AUTHED, 404),
        path_params=SUBSCRIPTION_ID,
    ),
    Operation(
        "GET",
        "/v1/subscriptions/{id}/events",
        subscriptions.list_events,
        "Its tracking events, newest first",
        "subscriptions",
        (Answer(200, EventList, "The events"),),
        (*AUTHED, 404),
        path_params=SUBSCRIPTION_ID,
    ),
    Operation(
        "GET",
        "/v1/subscriptions/{id}/statuses",
        subscriptions.list_statuses,
        "Every change of its status, newest first",
        "subscriptions",
        (Answer(200, StatusChangeList, "The status changes"),),
        (*AUTHED, 404),
        path_params=SUBSCRIPTION_ID,
    ),
    Operation(
        "GET",
        "/v1/subscriptions/{id}/attempts",
        subscriptions.list_attempts,
        "Every ShipEngine call made for it, newest first",
        "subscriptions",
        (Answer(200, AttemptList, "The calls"),),
        (*AUTHED, 404),
        path_params=SUBSCRIPTION_ID,
    ),
    Operation(
        "POST",
        "/v1/subscriptions/{id}/retry",
        subscriptions.retry_subscription,
        "Retry a failed subscription",
        "subscriptions",
        (Answer(202, SubscriptionOut, "`pending` again, its start due at once"),),
        (*AUTHED, 404, 409),
        path_params=SUBSCRIPTION_ID,
    ),
    Operation(
        "GET",
        "/v1/subscriptions/{id}/timeline",
        ops.timeline,
        "Everything that happened to it, in order",
        "ops",
        (Answer(200, Timeline, "The timeline"),),
        (*AUTHED, 404),
        path_params=SUBSCRIPTION_ID,
    ),
    Operation(
        "GET",
        "/v1/ops/summary",
        ops.summary,
        "Counts by state, status and carrier; the dispatch backlog and pause",
        "ops",
        (Answer(200, OpsSummary, "The summary, computed at most every 5 s (`as_of`)"),),
        AUTHED,
    ),
    Operation(
        "GET",
        "/v1/ops/stuck",
        ops.stuck,
        "Subscriptions pending too long, and active ones silent too long",
        "ops",
        (Answer(200, Stuck, "The stuck subscriptions"),),
        (*AUTHED, 400),
        query=StuckQuery,
    ),
    Operation(
        "GET",
        "/v1/ops/failures",
        ops.failures,
        "Failed subscriptions grouped by error code, with examples",
        "ops",
        (Answer(200, Failures, "The groups"),),
        (*AUTHED, 400),
        query=FailuresQuery,
    ),
    Operation(
        "POST",
        "/v1/ops/retry",
        ops.retry_many,
        "Retry every failed subscription matching a filter",
        "ops",
        (Answer(200, BulkRetryResult, "How many matched (and were retried unless `dry_run`)"),),
        AUTHED + JSON_BODY,
        body=BulkRetry,
    ),
    Operation(
        "POST",
        "/v1/ops/dispatch/pause",
        ops.pause,
        "Pause all dispatching, every instance",
        "ops",
        (Answer(200, Paused, "Paused by hand"),),
        AUTHED + JSON_BODY,
        body=PauseRequest,
    ),
    Operation(
        "POST",
        "/v1/ops/dispatch/resume",
        ops.resume,
        "Resume dispatching",
        "ops",
        (Answer(200, Resumed, "Resumed"),),
        AUTHED,
    ),
    Operation(
        "POST",
        "/v1/webhooks/shipengine",
        receiver.receive_track,
        "ShipEngine's `track` webhook",
        "webhooks",
        (Answer(200, WebhookReceipt, "Stored and filed (or an orphan, or a duplicate)"),),
        (400, 401, 404, 413, 415, 503),
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
    ),
    Operation(
        "POST",
        "/v1/webhooks/deliveries/{id}/replay",
        replay.replay_one,
        "File a stored delivery again",
        "webhooks",
        (Answer(200, ReplayResult, "What filing it again changed"),),
        (*AUTHED, 404),
        path_params=DELIVERY_ID,
    ),
    Operation(
        "POST",
        "/v1/webhooks/deliveries/replay",
        replay.replay_range,
        "File again every original delivery received in a time range",
        "webhooks",
        (Answer(200, ReplayRangeResult, "How many matched, and their outcomes"),),
        AUTHED + JSON_BODY,
        body=ReplayRange,
    ),
    Operation(
        "GET",
        "/v1/openapi.json",
        openapi,
        "This document",
        "meta",
        (Answer(200, OpenApiDocument, "The OpenAPI 3.1 document of this API"),),
        AUTHED,
    ),
    Operation(
        "GET",
        "/healthz",
        health.healthz,
        "Liveness: the process serves",
        "health",
        (Answer(200, Health, "Serving"),),
    ),
    Operation(
        "GET",
        "/readyz",
        health.readyz,
        "Readiness: PostgreSQL answers; shows a dispatch pause",
        "health",
        (
            Answer(200, Readiness, "Ready"),
            Answer(503, Readiness, "The database is unreachable"),
        ),
    ),
    Operation(
        "GET",
        "/metrics",
        health.metrics,
        "Prometheus metrics",
        "health",
        (Answer(200, None, "Prometheus' text format", METRICS_CONTENT_TYPE.split(";")[0]),),
        AUTHED,
    ),
)


# --- The document --------------------------------------------------------------------------------

DESCRIPTION = """\
Subscriptions to ShipEngine package tracking, their events and status history, ops views and
levers, and ShipEngine's `track` webhook.

Every `/v1` operation but the webhook needs `Authorization: Bearer <token>`; a token carries
scopes (`subscriptions:write`, `subscriptions:read`, `ops`) and each operation needs any one of
those listed as its security requirements (also in `x-scopes`). No token, or an unknown or
revoked one: 401; a token without the scope: 403. `/metrics` needs the `metrics` scope.

Every error has ShipEngine's error shape (`ErrorBody`); every answer carries `X-Request-ID`.
"""


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI document of `OPERATIONS`; built once."""
    return build_document(OPERATIONS)


def build_document(operations: Iterable[Operation]) -> dict[str, Any]:
    operations = tuple(operations)
    refs, schemas = _schemas(operations)
    paths: dict[str, dict[str, Any]] = {}
    for operation in operations:
        item = paths.setdefault(operation.path, {})
        item[operation.method.lower()] = _operation(operation, refs, schemas)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Shipment tracking service",
            "version": _version(),
            "description": DESCRIPTION,
        },
        "tags": [{"name": name} for name in dict.fromkeys(op.tag for op in operations)],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {
                _error_name(status): {
                    "description": description,
                    "headers": {REQUEST_ID_HEADER: {"$ref": "#/components/headers/RequestId"}},
                    "content": {"application/json": {"schema": refs[(ErrorBody, "serialization")]}},
                }
                for status, description in ERROR_DESCRIPTIONS.items()
            },
            "headers": {
                "RequestId": {
                    "description": "The caller's `X-Request-ID`, or a new one; also in logs",
                    "required": True,
                    "schema": {"type": "string"},
                }
            },
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from `python -m service tokens create`",
                }
            },
        },
    }


Key = tuple[type[BaseModel], JsonSchemaMode]


def _schemas(operations: tuple[Operation, ...]) -> tuple[dict[Key, Any], dict[str, Any]]:
    """One JSON Schema per model (requests as validated, answers as serialised), shared defs."""
    keys: dict[Key, None] = {(ErrorBody, "serialization"): None}
    for operation in operations:
        for model in (operation.query, operation.body):
            if model is not None:
                keys[(model, "validation")] = None
        for answer in operation.answers:
            if answer.model is not None:
                keys[(answer.model, "serialization")] = None
    refs, top = models_json_schema(list(keys), ref_template=SCHEMA_REF)
    return {key: refs[key] for key in keys}, dict(top.get("$defs", {}))


def _operation(
    operation: Operation, refs: Mapping[Key, Any], schemas: Mapping[str, Any]
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "operationId": getattr(operation.handler, "__name__", operation.path),
        "summary": operation.summary,
        "tags": [operation.tag],
    }
    description = operation.description
    scopes = sorted(scope.value for scope in operation.scopes)
    if operation.needs_token:
        needs = " or ".join(f"`{scope}`" for scope in scopes) if scopes else "any scope"
        description = f"{description}\n\nNeeds a token with the scope {needs}.".strip()
        spec["security"] = [{SECURITY_SCHEME: [scope]} for scope in scopes] or [
            {SECURITY_SCHEME: []}
        ]
        spec[SCOPES_EXTENSION] = scopes
    else:
        spec["security"] = []
    if description:
        spec["description"] = description
    parameters = [
        *(_parameter(name, "path", param, required=True) for name, param in _path(operation)),
        *(_parameter(name, "header", param) for name, param in operation.headers.items()),
    ]
    if operation.query is not None:
        parameters += _query_parameters(refs[(operation.query, "validation")], schemas)
    if parameters:
        spec["parameters"] = parameters
    if operation.body is not None:
        spec["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(operation.body, "validation")]}},
        }
    responses: dict[str, Any] = {}
    for answer in operation.answers:
        schema = (
            {"type": "string"} if answer.model is None else refs[(answer.model, "serialization")]
        )
        responses[str(answer.status)] = {
            "description": answer.description,
            "headers": {REQUEST_ID_HEADER: {"$ref": "#/components/headers/RequestId"}},
            "content": {answer.media_type: {"schema": schema}},
        }
    for status in sorted(operation.errors):
        responses[str(status)] = {"$ref": f"#/components/responses/{_error_name(status)}"}
    spec["responses"] = responses
    return spec


def _path(operation: Operation) -> list[tuple[str, Param]]:
    names = re.findall(r"{([^}/]+)}", operation.path)
    if set(names) != set(operation.path_params):
        raise ValueError(f"{operation.path}: path parameters {names} are not all described")
    return [(name, operation.path_params[name]) for name in names]


def _parameter(name: str, where: str, param: Param, *, required: bool = False) -> dict[str, Any]:
    parameter: dict[str, Any] = {"name": name, "in": where, "required": required}
    if param.description:
        parameter["description"] = param.description
    parameter["schema"] = dict(param.schema)
    return parameter


def _query_parameters(ref: Mapping[str, Any], schemas: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A query model's fields, one parameter each; an absent parameter is the model's None."""
    model = schemas[ref["$ref"].rsplit("/", 1)[-1]]
    required = set(model.get("required", []))
    parameters = []
    for name, schema in model["properties"].items():
        parameter: dict[str, Any] = {"name": name, "in": "query", "required": name in required}
        if "description" in schema:
            parameter["description"] = schema["description"]
        parameter["schema"] = _without_null(schema)
        parameters.append(parameter)
    return parameters


def _without_null(schema: Mapping[str, Any]) -> dict[str, Any]:
    """`X | None = None` as a query parameter: absent, or an X (a query has no null)."""
    result = {key: value for key, value in schema.items() if key != "description"}
    if result.get("default", ...) is None:
        del result["default"]
    options = result.get("anyOf")
    if options is not None:
        kept = [option for option in options if option != {"type": "null"}]
        del result["anyOf"]
        if len(kept) == 1:
            result |= kept[0]
        else:
            result["anyOf"] = kept
    return result


def _error_name(status: int) -> str:
    return f"Error{status}"


def _version() -> str:
    try:
        return importlib.metadata.version("shipment-tracking-service")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"
