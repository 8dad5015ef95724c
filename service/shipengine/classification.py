"""What each ShipEngine error means for a tracking call: whose fault, and what to do.

Every `error_code` of ShipEngine's enum (../shared/shipengine/start-tracking.md) is listed. Codes
that cannot come from a tracking call (labels, batches, warehouses) are still classified, by what
they would mean. A code ShipEngine adds later falls back on its `error_type`, then on the HTTP
status; when several errors come back, the one with the widest consequence decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from service.domain.subscriptions import OutcomeKind

REJECTED = OutcomeKind.REJECTED
ACCOUNT = OutcomeKind.ACCOUNT
RATE_LIMITED = OutcomeKind.RATE_LIMITED
TRANSIENT = OutcomeKind.TRANSIENT

ERROR_CODES: Mapping[str, OutcomeKind] = {
    # The package or the request built for it is wrong: retrying cannot help.
    "carrier_conflict": REJECTED,
    "carrier_not_supported": REJECTED,
    "field_conflict": REJECTED,
    "field_value_required": REJECTED,
    "identifier_conflict": REJECTED,
    "identifiers_must_match": REJECTED,
    "invalid_address": REJECTED,
    "invalid_field_value": REJECTED,
    "invalid_identifier": REJECTED,
    "invalid_object": REJECTED,
    "invalid_status": REJECTED,
    "invalid_string_length": REJECTED,
    "refresh_not_supported": REJECTED,
    "request_body_required": REJECTED,
    "tracking_not_supported": REJECTED,
    "file_not_found": REJECTED,
    "shipping_rule_not_found": REJECTED,
    "service_not_determined": REJECTED,
    "no_rates_returned": REJECTED,
    "customs_items_required": REJECTED,
    "incompatible_paired_labels": REJECTED,
    "invalid_charge_event": REJECTED,
    "batch_cannot_be_modified": REJECTED,
    "confirmation_not_supported": REJECTED,
    "label_images_not_supported": REJECTED,
    "return_label_not_supported": REJECTED,
    "settings_not_supported": REJECTED,
    "default_warehouse_cannot_be_deleted": REJECTED,
    "warehouse_conflict": REJECTED,
    "webhook_event_type_conflict": REJECTED,
    # Our account: every call would fail the same way until someone fixes it.
    "unauthorized": ACCOUNT,
    "forbidden": ACCOUNT,
    "subscription_inactive": ACCOUNT,
    "trial_expired": ACCOUNT,
    "invalid_billing_plan": ACCOUNT,
    "carrier_not_connected": ACCOUNT,
    "carrier_disconnected": ACCOUNT,
    "terms_not_accepted": ACCOUNT,
    "insufficient_funds": ACCOUNT,
    "auto_fund_not_supported": ACCOUNT,
    "order_source_not_active": ACCOUNT,
    "verification_failure": ACCOUNT,
    "funding_source_registration_in_progress": ACCOUNT,
    "funding_source_missing_configuration": ACCOUNT,
    "funding_source_error": ACCOUNT,
    "insurance_failure": ACCOUNT,
    # ShipEngine or the carrier had a bad moment.
    "rate_limit_exceeded": RATE_LIMITED,
    "unknown": TRANSIENT,
    "unspecified": TRANSIENT,
    "meter_failure": TRANSIENT,
}

ERROR_TYPES: Mapping[str, OutcomeKind] = {
    "validation": REJECTED,
    "business_rules": REJECTED,
    "account_status": ACCOUNT,
    "security": ACCOUNT,
    "system": TRANSIENT,
    "integrations": TRANSIENT,
}

# Ordered by how far a consequence reaches: one package < every package for a while.
_PRECEDENCE = (REJECTED, TRANSIENT, RATE_LIMITED, ACCOUNT)


def classify_errors(status: int, errors: Iterable[Mapping[str, Any]]) -> OutcomeKind:
    """The outcome of a non-2xx answer that carried ShipEngine's error body."""
    if status == 429:
        return RATE_LIMITED
    if status in (401, 403):
        return ACCOUNT
    kinds = [_classify_one(error) for error in errors]
    known = [kind for kind in kinds if kind is not None]
    if status >= 500:
        # A server error is never the package's fault, whatever its body says.
        known = [kind for kind in known if kind is not REJECTED] or [TRANSIENT]
    if not known:
        return REJECTED if 400 <= status < 500 and status not in (408, 409, 425) else TRANSIENT
    return max(known, key=_PRECEDENCE.index)


def _classify_one(error: Mapping[str, Any]) -> OutcomeKind | None:
    code, kind = error.get("error_code"), error.get("error_type")
    if isinstance(code, str) and code in ERROR_CODES:
        return ERROR_CODES[code]
    if isinstance(kind, str) and kind in ERROR_TYPES:
        return ERROR_TYPES[kind]
    return None
