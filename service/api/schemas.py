"""Request and response bodies: validated and serialised by the same pydantic models."""

from __future__ import annotations

import base64
import binascii
import json
import re
import typing
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from aiohttp import web
from multidict import MultiMapping
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)
from pydantic import ValidationError as PydanticValidationError
from sqlalchemy.engine import RowMapping

from service.api.errors import (
    ApiError,
    BadRequest,
    ErrorDetail,
    ErrorItem,
    NotFound,
    ValidationFailed,
    is_none,
)
from service.api.operations import Param
from service.db.subscriptions import Cursor, NewSubscription
from service.domain.changes import ChangeType
from service.domain.deliveries import DeliveryOutcome
from service.domain.subscriptions import Operation, OutcomeKind, SubscriptionState

METADATA_MAX_BYTES = 8 * 1024
METADATA_MAX_DEPTH = 32

CarrierCode = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9]+(_[a-z0-9]+)*$")
]
# Printable ASCII, no spaces: what carriers' tracking numbers and ShipEngine's ids are made of.
Identifier = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=r"^[!-~]+$")
]
Reference = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256)]


class SubscriptionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    carrier_code: CarrierCode
    tracking_number: Identifier
    carrier_id: Identifier | None = None
    reference: Reference | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_small(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and _depth(value) > METADATA_MAX_DEPTH:
            # Deeper than pydantic serialises (255): it would be stored, then never answered.
            raise ValueError(f"metadata must nest at most {METADATA_MAX_DEPTH} levels deep")
        if value is None:
            return value
        try:
            # allow_nan=False: NaN and Infinity parse, but are not JSON: PostgreSQL refuses them
            # (a 500), or orjson writes them as null (a silent change).
            size = len(json.dumps(value, allow_nan=False))
        except ValueError:
            raise ValueError("metadata must hold finite numbers only") from None
        if size > METADATA_MAX_BYTES:
            raise ValueError(f"metadata must be at most {METADATA_MAX_BYTES} bytes of JSON")
        return value

    def to_domain(self, created_by: str) -> NewSubscription:
        return NewSubscription(
            carrier_code=self.carrier_code,
            tracking_number=self.tracking_number,
            carrier_id=self.carrier_id,
            reference=self.reference,
            metadata=self.metadata,
            created_by=created_by,
        )


BATCH_MAX = 1000


class BatchIn(BaseModel):
    """Items are validated one by one (each answered on its own), so here they are just objects."""

    model_config = ConfigDict(extra="forbid")

    subscriptions: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=BATCH_MAX)]


class SubscriptionOut(BaseModel):
    id: uuid.UUID
    carrier_code: str
    tracking_number: str
    carrier_id: str | None
    reference: str | None
    metadata: dict[str, Any] | None
    state: SubscriptionState
    status_code: str | None
    status_description: str | None
    estimated_delivery_date: datetime | None
    actual_delivery_date: datetime | None
    last_event_at: datetime | None
    last_error: dict[str, Any] | None
    created_by: str | None
    created_at: datetime
    updated_at: datetime


class BatchItemResult(BaseModel):
    index: int
    status: Literal[200, 202, 422] = Field(description="as the single subscribe answers it")
    # Each written only when set: an item has its subscription or its errors, never both.
    subscription: SubscriptionOut | None = Field(
        default=None, description="when 200 or 202", exclude_if=is_none
    )
    errors: list[ErrorItem] | None = Field(default=None, description="when 422", exclude_if=is_none)


class BatchResult(BaseModel):
    results: list[BatchItemResult] = Field(description="one per item, in order")


class SubscriptionPage(BaseModel):
    items: list[SubscriptionOut]
    next_cursor: str | None


class TrackEventOut(BaseModel):
    """A carrier's event, as the carrier told it."""

    occurred_at: datetime | None
    carrier_occurred_at: str | None
    status_code: str | None
    description: str | None
    event_code: str | None
    carrier_status_code: str | None
    carrier_detail_code: str | None
    status_detail_code: str | None
    city_locality: str | None
    state_province: str | None
    postal_code: str | None
    country_code: str | None
    company_name: str | None
    signer: str | None
    latitude: float | None
    longitude: float | None


class EventOut(TrackEventOut):
    received_at: datetime


class EventList(BaseModel):
    items: list[EventOut]


class StatusChangeOut(BaseModel):
    previous_status_code: str | None
    status_code: str | None
    occurred_at: datetime | None
    learned_at: datetime
    delivery_id: int | None


class StatusChangeList(BaseModel):
    items: list[StatusChangeOut]


class AttemptOut(BaseModel):
    operation: Operation
    attempt: int
    started_at: datetime
    latency_ms: float
    outcome: OutcomeKind
    http_status: int | None
    request_id: str | None
    error_code: str | None
    errors: list[dict[str, Any]] | None
    message: str | None
    claim_lost: bool


class AttemptList(BaseModel):
    items: list[AttemptOut]


class ChangeData(SubscriptionOut):
    """The subscription as `GET /v1/subscriptions/{id}` showed it right after the change."""

    previous_status_code: str | None = Field(description="the status before the change")
    newest_event: TrackEventOut | None = Field(
        description="the newest event the change reports: a delivery's, or the subscription's"
    )


class ChangeOut(BaseModel):
    id: str = Field(description="unique and stable: the same change has the same id everywhere")
    type: ChangeType
    subscription_id: uuid.UUID
    sequence: int = Field(description="per subscription: 1, 2, 3, ... in the order made")
    occurred_at: datetime = Field(description="when this service made the change")
    data: ChangeData


class ChangePage(BaseModel):
    items: list[ChangeOut] = Field(description="in commit order")
    next_cursor: str = Field(
        description="always set: pass it back as `after` to go on exactly where this page ended"
    )


class ChangesQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    after: str | None = Field(
        default=None, description="a cursor this feed gave; absent: from the oldest change kept"
    )
    limit: QueryInt = Field(default=100, ge=1, le=1000)
    type: list[ChangeType] | None = Field(default=None, description="repeatable: any of these")
    subscription_id: uuid.UUID | None = None
    created_by: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None


class ListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: SubscriptionState | None = None
    status_code: Annotated[str, StringConstraints(min_length=1, max_length=8)] | None = None
    carrier_code: CarrierCode | None = None
    tracking_number: Identifier | None = None
    created_by: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    limit: QueryInt = Field(default=50, ge=1, le=500)
    cursor: str | None = None


# ShipEngine's webhook, and replays of what it delivered: service/webhooks/.


class TrackWebhook(BaseModel):
    """ShipEngine's `track` webhook, read tolerantly: any JSON object is taken and kept."""

    model_config = ConfigDict(extra="allow")

    resource_url: str | None = None
    resource_type: str | None = None
    data: dict[str, Any] | None = None


# What a delivery that was not refused came to (a refusal is answered as an error instead).
Outcome = Literal[DeliveryOutcome.FILED, DeliveryOutcome.ORPHAN, DeliveryOutcome.DUPLICATE]


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


DELIVERY_ID = {
    "id": Param(
        {"type": "integer", "format": "int64", "minimum": 1, "maximum": 2**63 - 1},
        "the stored delivery's id",
    ),
}


def subscription_out(row: RowMapping) -> SubscriptionOut:
    return SubscriptionOut.model_validate(dict(row))


def subscription_json(row: RowMapping) -> dict[str, Any]:
    return subscription_out(row).model_dump(mode="json")


def parse_body(model: type[BaseModel], payload: object) -> Any:
    try:
        parsed = model.model_validate(payload)
    except PydanticValidationError as error:
        raise ValidationFailed(*(_detail(item) for item in error.errors())) from None
    return _refuse_nul(parsed, ValidationFailed)


def path_id(request: web.Request, what: str) -> uuid.UUID:
    """The `{id}` of the path; one that is no UUID was never issued: no such `what` (404)."""
    try:
        return uuid.UUID(request.match_info["id"])
    except ValueError:
        raise NotFound.resource(what) from None


def parse_query(model: type[BaseModel], query: Mapping[str, str]) -> Any:
    """The query, validated by `model`: a parameter whose field is a list may repeat (each
    value one item), any other given twice is refused rather than one of them taken."""
    repeatable = {name for name, field in model.model_fields.items() if _is_list(field.annotation)}
    values: dict[str, Any] = {}
    for name in dict.fromkeys(query.keys()):
        given = query.getall(name) if isinstance(query, MultiMapping) else [query[name]]
        if name in repeatable:
            values[name] = given
        elif len(given) > 1:
            raise BadRequest.invalid(f"{name}: given more than once", name)
        else:
            values[name] = given[0]
    try:
        parsed = model.model_validate(values)
    except PydanticValidationError as error:
        raise BadRequest(*(_detail(item) for item in error.errors())) from None
    return _refuse_nul(parsed, BadRequest)


def _is_list(annotation: object) -> bool:
    return any(typing.get_origin(a) is list for a in (annotation, *typing.get_args(annotation)))


def _decimal(value: object) -> object:
    """A query's integer as decimal digits only: not `1_0`, `+5`, ` 5 ` nor `5.0`, which
    pydantic's lax mode would take."""
    if isinstance(value, str) and not re.fullmatch(r"[0-9]{1,18}", value, re.ASCII):
        raise ValueError("must be a whole number in decimal digits")
    return value


# An integer of a query string.
QueryInt = Annotated[int, BeforeValidator(_decimal)]


def _refuse_nul(parsed: BaseModel, refusal: type[ApiError]) -> BaseModel:
    """PostgreSQL stores no NUL character in text or jsonb: a text or object field holding one
    is invalid. (Lists are left to whoever validates their items, as a batch does each one.)"""
    message = "must not contain NUL characters (\\u0000)"
    details = [
        ErrorDetail("validation", "invalid_field_value", f"{name}: {message}", name)
        for name, value in parsed
        if isinstance(value, str | dict) and _has_nul(value)
    ]
    if details:
        raise refusal(*details)
    return parsed


def _has_nul(value: object) -> bool:
    pending = [value]  # a loop, not recursion: JSON may nest as deep as the parser allowed
    while pending:
        item = pending.pop()
        if isinstance(item, str) and "\x00" in item:
            return True
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _depth(value: object) -> int:
    """How deep JSON nests (a loop, not recursion: it may nest as deep as the parser allowed)."""
    deepest, pending = 0, [(value, 0)]
    while pending:
        item, level = pending.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level + 1)
            pending.extend((child, level + 1) for child in item)
    return deepest


def encode_cursor(row: RowMapping) -> str:
    raw = f"{row['created_at'].isoformat()}|{row['id']}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> Cursor:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, subscription_id = raw.split("|")
        return Cursor(_utc(datetime.fromisoformat(created_at)), uuid.UUID(subscription_id))
    except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise BadRequest.invalid("cursor is not one this service issued", "cursor") from None


def _utc(moment: datetime) -> datetime:
    """A cursor's time in UTC, as the database compares it. Year 1 at +14:00 parses, but is
    before year 1 in UTC: OverflowError, where the driver would have raised it as a 500."""
    if moment.tzinfo is None:
        raise ValueError("a cursor's time has its offset")
    return moment.astimezone(UTC)


_CODES = {
    "missing": "field_value_required",
    "string_too_short": "invalid_string_length",
    "string_too_long": "invalid_string_length",
}


def _detail(error: Any) -> ErrorDetail:
    field_name = ".".join(str(part) for part in error["loc"]) or None
    error_code = _CODES.get(error["type"], "invalid_field_value")
    message = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
    return ErrorDetail("validation", error_code, f"{field_name}: {message}", field_name)
