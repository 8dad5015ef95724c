"""The API's errors, one hierarchy, rendered in ShipEngine's own error shape.

Callers already speak ShipEngine's vocabulary (`error_type`, `error_code`, `field_name`), so our
errors use it too; `error_source` says they come from this service, not from ShipEngine.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, Field

ERROR_SOURCE = "tracking_service"
# What a 503 for an unreachable or saturated database asks callers to wait: a failover or a
# burst is usually over within seconds.
RETRY_AFTER_S = 2


@dataclasses.dataclass(frozen=True)
class ErrorDetail:
    error_type: str
    error_code: str
    message: str
    field_name: str | None = None

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "error_source": ERROR_SOURCE,
            "error_type": self.error_type,
            "error_code": self.error_code,
            "message": self.message,
        }
        if self.field_name is not None:
            body["field_name"] = self.field_name
        return body


def is_none(value: object) -> bool:
    """For `Field(exclude_if=...)`: a field written only when it is set."""
    return value is None


class ErrorItem(BaseModel):
    error_source: str = Field(description="`tracking_service` for this service's own errors")
    error_type: str = Field(description="`validation`, `security`, `business_rules`, `system`")
    error_code: str = Field(description="e.g. `invalid_field_value`, `not_found`, `forbidden`")
    message: str
    # Left out when None, as `ErrorDetail.as_json` leaves it out.
    field_name: str | None = Field(
        default=None, description="the field at fault, if one is", exclude_if=is_none
    )


class ErrorBody(BaseModel):
    """Every error, whatever its cause, in ShipEngine's error shape."""

    request_id: str
    errors: list[ErrorItem] = Field(min_length=1)


Answer = TypeVar("Answer", bound=web.StreamResponse)


def retry_later(response: Answer) -> Answer:
    """`response` (a 503 for the database) with how long to wait before trying again."""
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


class ApiError(Exception):
    """An error the caller can act on; `status` is the HTTP status it is answered with."""

    status = 400

    def __init__(self, *details: ErrorDetail) -> None:
        super().__init__("; ".join(detail.message for detail in details))
        self.details = details


class BadRequest(ApiError):
    status = 400

    @classmethod
    def invalid(cls, message: str, field_name: str | None = None) -> BadRequest:
        return cls(ErrorDetail("validation", "invalid_field_value", message, field_name))


class ValidationFailed(ApiError):
    status = 422


class NotFound(ApiError):
    status = 404

    @classmethod
    def resource(cls, what: str) -> NotFound:
        return cls(ErrorDetail("validation", "not_found", f"{what} not found"))


class Conflict(ApiError):
    status = 409


class Gone(ApiError):
    status = 410


class TooManyRequests(ApiError):
    status = 429


def http_error_detail(status: int, reason: str) -> ErrorDetail:
    """aiohttp's own HTTP errors (no route, wrong method, body too large) in our shape."""
    codes = {
        404: ("validation", "not_found"),
        405: ("validation", "method_not_allowed"),
        409: ("business_rules", "invalid_status"),
        413: ("validation", "request_too_large"),
        415: ("validation", "unsupported_media_type"),
    }
    error_type, error_code = codes.get(status, ("system", "unspecified"))
    return ErrorDetail(error_type, error_code, reason)
