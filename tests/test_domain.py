"""Pure rules: parsing ShipEngine's payloads, state transitions, retry timing, classification."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from service.domain.subscriptions import (
    CallOutcome,
    Operation,
    OutcomeKind,
    RetryPolicy,
    SubscriptionState,
    transition,
)
from service.domain.tracking import parse_track_payload, text, timestamp
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


class TestTransitions:
    @pytest.mark.parametrize(
        ("outcome", "state", "retry", "has_error"),
        [
            (ACCEPTED, SubscriptionState.ACTIVE, None, False),
            (REJECTED, SubscriptionState.FAILED, None, True),
            (TRANSIENT, SubscriptionState.PENDING, 3.0, True),
        ],
    )
    def test_start(
        self,
        outcome: CallOutcome,
        state: SubscriptionState,
        retry: float | None,
        has_error: bool,
    ) -> None:
        moved = transition(SubscriptionState.PENDING, Operation.START, outcome, 3.0)
        assert (moved.state, moved.retry_in_s, moved.last_error is not None) == (
            state,
            retry,
            has_error,
        )

    @pytest.mark.parametrize("outcome", [ACCEPTED, REJECTED, TRANSIENT])
    def test_a_cancel_during_the_start_wins_and_makes_the_stop_due(
        self, outcome: CallOutcome
    ) -> None:
        moved = transition(SubscriptionState.STOPPING, Operation.START, outcome, 3.0)
        assert moved.state is SubscriptionState.STOPPING
        assert moved.retry_in_s == 0.0

    @pytest.mark.parametrize(
        ("outcome", "state", "retry"),
        [
            (ACCEPTED, SubscriptionState.STOPPED, None),
            (REJECTED, SubscriptionState.STOPPED, None),
            (TRANSIENT, SubscriptionState.STOPPING, 3.0),
        ],
    )
    def test_stop(
        self, outcome: CallOutcome, state: SubscriptionState, retry: float | None
    ) -> None:
        moved = transition(SubscriptionState.STOPPING, Operation.STOP, outcome, 3.0)
        assert (moved.state, moved.retry_in_s) == (state, retry)

    def test_the_error_kept_is_shipengines_own(self) -> None:
        moved = transition(SubscriptionState.PENDING, Operation.START, REJECTED, 0)
        assert moved.last_error == {
            "operation": "start",
            "http_status": 400,
            "request_id": "aa3d8e8e-462b-4476-9618-72db7f7b7009",
            "errors": [{"error_code": "invalid_identifier"}],
        }


class TestRetryPolicy:
    def test_full_jitter_under_an_exponential_ceiling_with_a_cap(self) -> None:
        policy = RetryPolicy(base_s=1.0, cap_s=10.0)
        rng = random.Random(7)
        for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (40, 10.0)]:
            delays = [policy.delay_s(attempt, TRANSIENT, rng) for _ in range(200)]
            assert min(delays) >= 0
            assert max(delays) <= ceiling
            assert max(delays) > ceiling / 2

    def test_retry_after_is_honoured(self) -> None:
        policy = RetryPolicy(base_s=1.0, cap_s=10.0)
        limited = CallOutcome(OutcomeKind.TRANSIENT, http_status=429, retry_after_s=30)
        assert policy.delay_s(1, limited, random.Random(1)) == 30


class TestClassify:
    BODY = (
        b'{"request_id": "r-1", "errors": [{"error_source": "carrier", '
        b'"error_type": "validation", "error_code": "invalid_identifier", "message": "bad"}]}'
    )

    def test_204_is_accepted(self) -> None:
        assert classify(204, b"", None).kind is OutcomeKind.ACCEPTED

    @pytest.mark.parametrize("status", [400, 404, 422])
    def test_4xx_with_shipengines_body_is_rejected_and_kept(self, status: int) -> None:
        outcome = classify(status, self.BODY, None)
        assert outcome.kind is OutcomeKind.REJECTED
        assert outcome.request_id == "r-1"
        assert outcome.errors[0]["error_code"] == "invalid_identifier"

    @pytest.mark.parametrize("status", [401, 403, 429, 500, 502, 503])
    def test_account_rate_and_server_errors_are_transient(self, status: int) -> None:
        assert classify(status, self.BODY, None).kind is OutcomeKind.TRANSIENT

    @pytest.mark.parametrize("body", [b"", b"<html>Bad Gateway</html>", b"[]", b'{"a": 1}'])
    def test_answers_without_shipengines_body_are_transient(self, body: bytes) -> None:
        outcome = classify(404, body, None)
        assert outcome.kind is OutcomeKind.TRANSIENT
        assert outcome.message

    @pytest.mark.parametrize(("header", "seconds"), [("7", 7.0), ("x", None), ("-1", None)])
    def test_retry_after(self, header: str, seconds: float | None) -> None:
        assert classify(429, self.BODY, header).retry_after_s == seconds
