"""Pure rules: parsing ShipEngine's payloads, state transitions, retry timing, classification."""

from __future__ import annotations

import hashlib
import json
import random
import typing
from datetime import UTC, datetime

import pytest

from service.api.schemas import EventOut
from service.db.dispatch import bucket_shape
from service.domain.subscriptions import (
    CallOutcome,
    Operation,
    OutcomeKind,
    RetryPolicy,
    SubscriptionState,
    Transition,
    transition,
)
from service.domain.tracking import (
    TrackEvent,
    content_digest,
    number,
    parse_track_payload,
    text,
    timestamp,
)
from service.shipengine.classification import ERROR_CODES
from service.shipengine.client import classify
from tests.payloads import track_body

ACCEPTED = CallOutcome(OutcomeKind.ACCEPTED, http_status=204)
REJECTED = CallOutcome(
    OutcomeKind.REJECTED,
    http_status=400,
    request_id="aa3d8e8e-462b-4476-9618-72db7f7b7009",
    errors=[{"error_code": "invalid_identifier"}],
)
TRANSIENT = CallOutcome(OutcomeKind.TRANSIENT, http_status=503)


class TestParsing:
    def test_reads_status_events_and_resource_url(self) -> None:
        update = parse_track_payload(track_body("9405", "stamps_com", 3))
        assert update.tracking_number == "9405"
        assert update.carrier_code == "stamps_com"
        assert update.resource_type == "API_TRACK"
        assert [event.status_code for event in update.events] == [None, "IT", "AC"]
        assert update.newest_event_at == datetime(2026, 11, 22, 7, 45, tzinfo=UTC)

    def test_data_carrier_code_wins_over_resource_url(self) -> None:
        body = track_body("9405", "stamps_com", 1)
        body["data"]["carrier_code"] = "usps"
        assert parse_track_payload(body).carrier_code == "usps"

    def test_a_number_the_data_leaves_out_is_read_from_the_resource_url(self) -> None:
        body = track_body("9405", "stamps_com", 1)
        body["data"]["carrier_code"] = "usps"
        del body["data"]["tracking_number"]
        update = parse_track_payload(body)
        assert (update.tracking_number, update.carrier_code) == ("9405", "usps")

    @pytest.mark.parametrize("payload", [None, [], "x", {"data": []}, {"data": {"events": {}}}])
    def test_nonsense_parses_to_nothing_rather_than_raising(self, payload: object) -> None:
        update = parse_track_payload(payload)
        assert update.tracking_number is None
        assert update.events == ()

    @pytest.mark.parametrize(
        ("value", "expected"),
        [("", None), ("  ", None), (None, None), (True, None), (12, "12"), (" IT ", "IT")],
    )
    def test_text(self, value: object, expected: str | None) -> None:
        assert text(value) == expected

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (-85.76, -85.76),
            (38, 38.0),
            ("35.1", 35.1),
            ("NaN", None),
            ("-inf", None),
            (float("inf"), None),
            (10**400, None),
            ("north", None),
            (True, None),
            ([1.0], None),
        ],
    )
    def test_number_is_finite_or_none(self, value: object, expected: float | None) -> None:
        assert number(value) == expected

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("2026-11-20T09:00:00Z", datetime(2026, 11, 20, 9, tzinfo=UTC)),
            ("2026-11-20T09:00:00", datetime(2026, 11, 20, 9, tzinfo=UTC)),
            ("2026-11-20T04:00:00-05:00", datetime(2026, 11, 20, 9, tzinfo=UTC)),
            ("2026-11-20T09:00:00.1234567Z", datetime(2026, 11, 20, 9, 0, 0, 123456, tzinfo=UTC)),
            ("yesterday", None),
            (1732000000, None),
        ],
    )
    def test_timestamp(self, value: object, expected: datetime | None) -> None:
        assert timestamp(value) == expected

    def test_event_key_ignores_fields_that_do_not_identify_it(self) -> None:
        first = parse_track_payload(track_body("9405", "ups", 1)).events[0]
        body = track_body("9405", "ups", 1)
        body["data"]["events"][0]["latitude"] = 1.0
        assert parse_track_payload(body).events[0].key == first.key
        body["data"]["events"][0]["description"] = "Something else"
        assert parse_track_payload(body).events[0].key != first.key


POLICY = RetryPolicy(base_s=1.0, cap_s=10.0, max_attempts=3)
RATE_LIMITED = CallOutcome(OutcomeKind.RATE_LIMITED, http_status=429, retry_after_s=30)
ACCOUNT = CallOutcome(OutcomeKind.ACCOUNT, http_status=401)


def move(
    outcome: CallOutcome,
    state: SubscriptionState = SubscriptionState.PENDING,
    operation: Operation = Operation.START,
    attempt: int = 1,
) -> Transition:
    return transition(
        state,
        operation,
        outcome,
        attempt=attempt,
        retry_in_s=3.0,
        paused_for_s=30.0,
        policy=POLICY,
    )


class TestTransitions:
    @pytest.mark.parametrize(
        ("outcome", "state", "retry", "has_error"),
        [
            (ACCEPTED, SubscriptionState.ACTIVE, None, False),
            (REJECTED, SubscriptionState.FAILED, None, True),
            (TRANSIENT, SubscriptionState.PENDING, 3.0, True),
            (RATE_LIMITED, SubscriptionState.PENDING, 30.0, True),
            (ACCOUNT, SubscriptionState.PENDING, 30.0, True),
        ],
    )
    def test_start(
        self,
        outcome: CallOutcome,
        state: SubscriptionState,
        retry: float | None,
        has_error: bool,
    ) -> None:
        moved = move(outcome)
        assert (moved.state, moved.retry_in_s, moved.last_error is not None) == (
            state,
            retry,
            has_error,
        )

    @pytest.mark.parametrize("outcome", [ACCEPTED, REJECTED, TRANSIENT, RATE_LIMITED, ACCOUNT])
    def test_a_cancel_during_the_start_wins_and_makes_the_stop_due(
        self, outcome: CallOutcome
    ) -> None:
        moved = move(outcome, state=SubscriptionState.STOPPING)
        assert moved.state is SubscriptionState.STOPPING
        assert moved.retry_in_s == 0.0

    @pytest.mark.parametrize(
        ("outcome", "state", "retry"),
        [
            (ACCEPTED, SubscriptionState.STOPPED, None),
            (REJECTED, SubscriptionState.STOPPED, None),
            (TRANSIENT, SubscriptionState.STOPPING, 3.0),
            (RATE_LIMITED, SubscriptionState.STOPPING, 30.0),
            (ACCOUNT, SubscriptionState.STOPPING, 30.0),
        ],
    )
    def test_stop(
        self, outcome: CallOutcome, state: SubscriptionState, retry: float | None
    ) -> None:
        moved = move(outcome, state=SubscriptionState.STOPPING, operation=Operation.STOP)
        assert (moved.state, moved.retry_in_s) == (state, retry)

    def test_pauses_spend_no_attempt_and_others_do(self) -> None:
        assert not move(RATE_LIMITED).attempt_spent
        assert not move(ACCOUNT).attempt_spent
        assert move(TRANSIENT).attempt_spent

    def test_transient_failures_give_up_after_the_last_attempt_keeping_the_error(self) -> None:
        assert move(TRANSIENT, attempt=2).state is SubscriptionState.PENDING
        given_up = move(TRANSIENT, attempt=3)
        assert (given_up.state, given_up.retry_in_s) == (SubscriptionState.FAILED, None)
        assert given_up.last_error == TRANSIENT.as_error(Operation.START)
        stop = move(TRANSIENT, SubscriptionState.STOPPING, Operation.STOP, attempt=3)
        assert stop.state is SubscriptionState.STOPPED

    def test_pauses_never_give_up(self) -> None:
        assert move(RATE_LIMITED, attempt=99).state is SubscriptionState.PENDING

    def test_the_error_kept_is_shipengines_own(self) -> None:
        assert move(REJECTED).last_error == {
            "operation": "start",
            "http_status": 400,
            "request_id": "aa3d8e8e-462b-4476-9618-72db7f7b7009",
            "errors": [{"error_code": "invalid_identifier"}],
        }


class TestRetryPolicy:
    def test_full_jitter_under_an_exponential_ceiling_with_a_cap(self) -> None:
        rng = random.Random(7)
        for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (40, 10.0)]:
            delays = [POLICY.delay_s(attempt, rng) for _ in range(200)]
            assert min(delays) >= 0
            assert max(delays) <= ceiling
            assert max(delays) > ceiling / 2


def error_body(*errors: tuple[str, str]) -> bytes:
    return json.dumps(
        {
            "request_id": "r-1",
            "errors": [
                {"error_source": "carrier", "error_type": kind, "error_code": code, "message": "m"}
                for code, kind in errors
            ],
        }
    ).encode()


# The `error_code` enum of ShipEngine's start-tracking reference (../shared/shipengine/).
SHIPENGINE_ERROR_CODES = (
    "auto_fund_not_supported",
    "batch_cannot_be_modified",
    "carrier_conflict",
    "carrier_disconnected",
    "carrier_not_connected",
    "carrier_not_supported",
    "confirmation_not_supported",
    "customs_items_required",
    "default_warehouse_cannot_be_deleted",
    "field_conflict",
    "field_value_required",
    "file_not_found",
    "forbidden",
    "funding_source_error",
    "funding_source_missing_configuration",
    "funding_source_registration_in_progress",
    "identifier_conflict",
    "identifiers_must_match",
    "incompatible_paired_labels",
    "insufficient_funds",
    "insurance_failure",
    "invalid_address",
    "invalid_billing_plan",
    "invalid_charge_event",
    "invalid_field_value",
    "invalid_identifier",
    "invalid_object",
    "invalid_status",
    "invalid_string_length",
    "label_images_not_supported",
    "meter_failure",
    "no_rates_returned",
    "order_source_not_active",
    "rate_limit_exceeded",
    "refresh_not_supported",
    "request_body_required",
    "return_label_not_supported",
    "service_not_determined",
    "settings_not_supported",
    "shipping_rule_not_found",
    "subscription_inactive",
    "terms_not_accepted",
    "tracking_not_supported",
    "trial_expired",
    "unauthorized",
    "unknown",
    "unspecified",
    "verification_failure",
    "warehouse_conflict",
    "webhook_event_type_conflict",
)


class TestClassify:
    BODY = error_body(("invalid_identifier", "validation"))

    def test_the_table_covers_every_code_shipengine_documents(self) -> None:
        assert set(SHIPENGINE_ERROR_CODES) <= set(ERROR_CODES)

    def test_204_is_accepted(self) -> None:
        assert classify(204, b"", None).kind is OutcomeKind.ACCEPTED

    @pytest.mark.parametrize(
        "code",
        [
            "invalid_field_value",
            "tracking_not_supported",
            "carrier_not_supported",
            "invalid_identifier",
            "field_value_required",
        ],
    )
    def test_the_packages_own_fault_rejects_it(self, code: str) -> None:
        outcome = classify(400, error_body((code, "validation")), None)
        assert outcome.kind is OutcomeKind.REJECTED
        assert outcome.request_id == "r-1"
        assert outcome.error_code == code

    @pytest.mark.parametrize(
        "code",
        [
            "unauthorized",
            "forbidden",
            "subscription_inactive",
            "trial_expired",
            "invalid_billing_plan",
            "carrier_not_connected",
            "carrier_disconnected",
            "terms_not_accepted",
        ],
    )
    def test_the_accounts_fault_pauses_dispatch(self, code: str) -> None:
        assert classify(400, error_body((code, "account_status")), None).kind is ACCOUNT.kind

    @pytest.mark.parametrize(
        ("status", "errors"),
        [
            (400, [("unknown", "system")]),
            (400, [("unspecified", "system")]),
            (500, [("unspecified", "system")]),
            (503, [("invalid_identifier", "validation")]),  # a 5xx is never the package's fault
            (502, []),
        ],
    )
    def test_transient_errors_are_retried(self, status: int, errors: list[tuple[str, str]]) -> None:
        assert classify(status, error_body(*errors), None).kind is OutcomeKind.TRANSIENT

    def test_429_is_a_global_pause_honouring_retry_after(self) -> None:
        outcome = classify(429, error_body(("rate_limit_exceeded", "system")), "7")
        assert (outcome.kind, outcome.retry_after_s) == (OutcomeKind.RATE_LIMITED, 7.0)

    @pytest.mark.parametrize("status", [401, 403])
    def test_401_and_403_are_the_account_even_without_a_body(self, status: int) -> None:
        assert classify(status, b"", None).kind is OutcomeKind.ACCOUNT

    def test_unknown_codes_fall_back_on_their_type(self) -> None:
        assert classify(400, error_body(("brand_new", "security")), None).kind is ACCOUNT.kind
        assert classify(400, error_body(("brand_new", "business_rules")), None).kind is (
            OutcomeKind.REJECTED
        )

    def test_the_widest_consequence_wins(self) -> None:
        body = error_body(("invalid_identifier", "validation"), ("trial_expired", "account_status"))
        assert classify(400, body, None).kind is OutcomeKind.ACCOUNT

    @pytest.mark.parametrize("body", [b"", b"<html>Bad Gateway</html>", b"[]", b'{"a": 1}'])
    def test_answers_without_shipengines_body_are_transient(self, body: bytes) -> None:
        outcome = classify(404, body, None)
        assert outcome.kind is OutcomeKind.TRANSIENT
        assert outcome.message

    @pytest.mark.parametrize(("header", "seconds"), [("7", 7.0), ("x", None), ("-1", None)])
    def test_retry_after(self, header: str, seconds: float | None) -> None:
        assert classify(429, self.BODY, header).retry_after_s == seconds


@pytest.mark.parametrize("rate", [1, 20, 200, 1200, 12000, 100000])
def test_the_bucket_never_lets_a_minute_exceed_the_rate(rate: int) -> None:
    capacity, refill_s = bucket_shape(rate)
    assert capacity >= 1
    assert capacity + refill_s * 60 <= max(rate, 2)
    assert refill_s * 60 >= rate * 0.9 or rate < 20


def _stdlib_digest(payload: dict[str, object]) -> bytes:
    """The content hash as first written, with the standard library: what stored rows hold."""
    update = parse_track_payload(payload)
    content = {
        "carrier_code": update.carrier_code,
        "tracking_number": update.tracking_number,
        "data": payload.get("data"),
    }
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).digest()


@pytest.mark.parametrize("steps", [0, 1, 7])
def test_the_content_hash_is_unchanged_for_real_shaped_deliveries(steps: int) -> None:
    payload = track_body("1Z999AA10123456784", "ups", steps)
    payload["data"]["events"].append(
        {"description": "Nachbar: Müller 東京", "latitude": -85.76, "zip": None}
    )
    payload["data"]["extra"] = {"b": [1, 2.5, True, ""], "a": '\u001f\n"quoted"'}
    assert content_digest(payload, parse_track_payload(payload)) == _stdlib_digest(payload)


def test_the_content_hash_takes_integers_past_64_bits() -> None:
    payload = track_body("1Z999AA10123456784", "ups", 1)
    payload["data"]["weight"] = 2**70
    digest = content_digest(payload, parse_track_payload(payload))
    assert digest == _stdlib_digest(payload)


def test_an_events_answer_shows_exactly_the_fields_trackevent_declares() -> None:
    """TrackEvent is the one declaration of an event: the table's columns are made from it,
    and the answer model, which the OpenAPI document needs spelled out, is held to it here."""
    answer_fields = {name: field.annotation for name, field in EventOut.model_fields.items()}
    assert answer_fields.pop("received_at") == datetime
    assert answer_fields == typing.get_type_hints(TrackEvent)
