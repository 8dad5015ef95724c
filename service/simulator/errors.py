"""ShipEngine's error answers: `{"request_id": uuid, "errors": [{...}]}`, always JSON."""

from __future__ import annotations

import uuid
from typing import Any

RATE_LIMIT_MESSAGE = (
    "You have exceeded the rate limit. Please see https://www.shipengine.com/docs/rate-limits"
)


class ApiError(Exception):
    """An answer in ShipEngine's error shape; the app's middleware renders it."""

    def __init__(
        self,
        status: int,
        *,
        error_source: str,
        error_type: str,
        error_code: str,
        message: str,
        headers: dict[str, str] | None = None,
        **extra: str,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
        self.error: dict[str, Any] = {
            "error_source": error_source,
            "error_type": error_type,
            "error_code": error_code,
            "message": message,
            **extra,
        }

    def body(self) -> dict[str, Any]:
        # A fresh request id per answer, as ShipEngine gives one per request.
        return {"request_id": str(uuid.uuid4()), "errors": [self.error]}


def unauthorized() -> ApiError:
    return ApiError(
        401,
        error_source="shipengine",
        error_type="security",
        error_code="unauthorized",
        message="The API key is invalid. Please see https://www.shipengine.com/docs/auth",
    )


def field_required(field_name: str) -> ApiError:
    return ApiError(
        400,
        error_source="shipengine",
        error_type="validation",
        error_code="field_value_required",
        message=f"{field_name} is required.",
        field_name=field_name,
    )


def invalid_field(field_name: str, message: str) -> ApiError:
    return ApiError(
        400,
        error_source="shipengine",
        error_type="validation",
        error_code="invalid_field_value",
        message=message,
        field_name=field_name,
    )


def request_body_required() -> ApiError:
    return ApiError(
        400,
        error_source="shipengine",
        error_type="validation",
        error_code="request_body_required",
        message="Body of request cannot be null.",
    )


def not_found(message: str) -> ApiError:
    # The enum has no "not_found": ShipEngine answers an unknown id with invalid_identifier.
    return ApiError(
        404,
        error_source="shipengine",
        error_type="validation",
        error_code="invalid_identifier",
        message=message,
    )


def webhook_conflict(event: str) -> ApiError:
    return ApiError(
        409,
        error_source="shipengine",
        error_type="business_rules",
        error_code="webhook_event_type_conflict",
        message=f"A webhook for the '{event}' event already exists.",
    )


def rate_limited(retry_after_s: int) -> ApiError:
    return ApiError(
        429,
        error_source="shipengine",
        error_type="system",
        error_code="rate_limit_exceeded",
        message=RATE_LIMIT_MESSAGE,
        headers={"Retry-After": str(retry_after_s)},
    )


def unspecified(status: int = 500) -> ApiError:
    return ApiError(
        status,
        error_source="shipengine",
        error_type="system",
        error_code="unspecified",
        message="An unexpected error occurred. Please try again later.",
    )
