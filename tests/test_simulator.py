"""The ShipEngine simulator, over real HTTP: its API, its signed webhooks, its scripts."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import re
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers
from multidict import CIMultiDict

from service.settings import SettingsError
from service.simulator import (
    CANCELLED_STATUS,
    SIMULATOR,
    Simulator,
    SimulatorConfig,
    create_simulator_app,
)
from service.simulator.lifecycle import plan_life
from service.simulator.ratelimit import SlidingWindow

API_KEY = "TEST_key_for_tests"
PUBLIC_URL = "https://api.shipengine.test"
CARRIER = "stamps_com"
LIFE = ["AC", "IT", "IT", "IT", "DE"]
RATE_LIMIT_ERROR = {
    "error_source": "shipengine",
    "error_type": "system",
    "error_code": "rate_limit_exceeded",
    "message": "You have exceeded the rate limit. Please see https://www.shipengine.com/docs/rate-limits",
}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


# -- a receiver of webhooks -------------------------------------------------------------------


@dataclasses.dataclass
class Received:
    headers: CIMultiDict[str]
    body: bytes

    @property
    def payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = json.loads(self.body)
        return payload

    @property
    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = self.payload["data"]
        return data


@dataclasses.dataclass
class Receiver:
    """A real HTTP endpoint that records every delivery and answers as told."""

    url: str = ""
    received: list[Received] = dataclasses.field(default_factory=list)
    answers: list[int] = dataclasses.field(default_factory=list)
    """Statuses for the next deliveries, in order; 200 once exhausted."""
    on_delivery: Callable[[Received], None] | None = None
    got_one: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        delivery = Received(CIMultiDict(request.headers), await request.read())
        self.received.append(delivery)
        if self.on_delivery is not None:
            self.on_delivery(delivery)
        self.got_one.set()
        return web.Response(status=self.answers.pop(0) if self.answers else 200)

    @property
    def statuses(self) -> list[str]:
        return [delivery.data["status_code"] for delivery in self.received]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hooks/shipengine", receiver.handle)
    server = TestServer(app)
    await server.start_server()
    receiver.url = str(server.make_url("/hooks/shipengine"))
    yield receiver
    await server.close()


# -- the simulator ----------------------------------------------------------------------------


@pytest.fixture
async def sim_server() -> AsyncIterator[TestServer]:
    config = SimulatorConfig(
        api_key=API_KEY, pace_s=0.0, delivery_retry_s=0.0, public_url=PUBLIC_URL
    )
    server = TestServer(create_simulator_app(config))
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
def simulator(sim_server: TestServer) -> Simulator:
    return sim_server.app[SIMULATOR]


@pytest.fixture
async def http(sim_server: TestServer) -> AsyncIterator[ClientSession]:
    """A client that knows the API key."""
    async with ClientSession(
        base_url=sim_server.make_url("/"), headers={"API-Key": API_KEY}
    ) as session:
        yield session


@pytest.fixture
async def anonymous(sim_server: TestServer) -> AsyncIterator[ClientSession]:
    async with ClientSession(base_url=sim_server.make_url("/")) as session:
        yield session


def track_query(tracking_number: str, carrier_code: str = CARRIER) -> dict[str, str]:
    return {"carrier_code": carrier_code, "tracking_number": tracking_number}


async def register(http: ClientSession, url: str, **extra: Any) -> dict[str, Any]:
    async with http.post(
        "/v1/environment/webhooks", json={"event": "track", "url": url, **extra}
    ) as response:
        assert response.status == 200, await response.text()
        webhook: dict[str, Any] = await response.json()
        return webhook


async def start(http: ClientSession, tracking_number: str) -> int:
    async with http.post("/v1/tracking/start", params=track_query(tracking_number)) as response:
        assert await response.read() == b""
        return response.status


async def error_of(response: Any, status: int) -> dict[str, Any]:
    """The one error of a ShipEngine error answer, after checking its shape."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"request_id", "errors"}
    assert uuid.UUID(body["request_id"]).version == 4
    assert len(body["errors"]) == 1
    error: dict[str, Any] = body["errors"][0]
    return error


def b64url_int(text: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def verify_signature(jwks: dict[str, Any], delivery: Received) -> str:
    """Verify as a receiver would: the RSA key named by kid, over `timestamp.body`."""
    rsa_keys = {key["kid"]: key for key in jwks["keys"] if key["kty"] == "RSA"}
    kid = delivery.headers["x-shipengine-rsa-sha256-key-id"]
    key = rsa_keys[kid]
    public_key = RSAPublicNumbers(b64url_int(key["e"]), b64url_int(key["n"])).public_key()
    timestamp = delivery.headers["x-shipengine-timestamp"]
    signature = base64.b64decode(delivery.headers["x-shipengine-rsa-sha256-signature"])
    signed = timestamp.encode() + b"." + delivery.body
    public_key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
    return kid


async def fetch_jwks(anonymous: ClientSession) -> dict[str, Any]:
    async with anonymous.get("/jwks") as response:
        assert response.status == 200
        jwks: dict[str, Any] = await response.json()
        return jwks


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# A client that sends a start call and hangs until killed, as a dispatcher mid-call.
CALL_AND_HANG = """
import sys, urllib.request
request = urllib.request.Request(sys.argv[1], method="POST", headers={"API-Key": sys.argv[2]})
urllib.request.urlopen(request)
"""


async def kill_mid_call(simulator: Simulator, url: str) -> None:
    """Start a client calling `url`, and SIGKILL it once its call is in flight."""
    client = await asyncio.create_subprocess_exec(sys.executable, "-c", CALL_AND_HANG, url, API_KEY)
    try:
        await asyncio.wait_for(simulator.wait_for_in_flight(1), timeout=20)
    finally:
        client.kill()
        await client.wait()


# -- authentication and validation ------------------------------------------------------------


async def test_a_call_without_an_api_key_is_unauthorized(anonymous: ClientSession) -> None:
    async with anonymous.post("/v1/tracking/start", params=track_query("9400")) as response:
        error = await error_of(response, 401)
    assert error["error_source"] == "shipengine"
    assert error["error_type"] == "security"
    assert error["error_code"] == "unauthorized"
    assert error["message"]


async def test_a_call_with_a_wrong_api_key_is_unauthorized(anonymous: ClientSession) -> None:
    headers = {"API-Key": "TEST_wrong"}
    async with anonymous.get("/v1/environment/webhooks", headers=headers) as response:
        error = await error_of(response, 401)
    assert error["error_code"] == "unauthorized"


async def test_start_without_a_tracking_number_is_a_validation_error(
    http: ClientSession,
) -> None:
    async with http.post("/v1/tracking/start", params={"carrier_code": CARRIER}) as response:
        error = await error_of(response, 400)
    assert error["error_type"] == "validation"
    assert error["error_code"] == "field_value_required"
    assert error["field_name"] == "tracking_number"


async def test_start_answers_204_with_an_empty_body(http: ClientSession) -> None:
    params = {**track_query("9400100000000000000001"), "carrier_id": "se-123456"}
    async with http.post("/v1/tracking/start", params=params) as response:
        assert response.status == 204
        assert await response.read() == b""


# -- the life of a package --------------------------------------------------------------------


async def test_a_whole_life_is_delivered_signed_and_newest_first(
    http: ClientSession,
    anonymous: ClientSession,
    simulator: Simulator,
    receiver: Receiver,
) -> None:
    await register(http, receiver.url, headers=[{"key": "X-Our-Secret", "value": "s3cret"}])
    tracking_number = "9400111899223197428490"

    assert await start(http, tracking_number) == 204
    await simulator.wait_idle()

    assert receiver.statuses == LIFE
    details = [delivery.data["status_detail_code"] for delivery in receiver.received]
    assert details[3] == "OUT_FOR_DELIVERY"
    jwks = await fetch_jwks(anonymous)
    now = datetime.now(UTC)
    previous_newest: datetime | None = None
    for delivery in receiver.received:
        assert delivery.headers["Content-Type"] == "application/json"
        assert delivery.headers["User-Agent"] == "ShipEngine/v1"
        assert delivery.headers["X-Our-Secret"] == "s3cret"
        assert TIMESTAMP.match(delivery.headers["x-shipengine-timestamp"])
        verify_signature(jwks, delivery)
        payload = delivery.payload
        assert payload["resource_type"] == "API_TRACK"
        assert payload["resource_url"] == (
            f"{PUBLIC_URL}/v1/tracking?carrier_code={CARRIER}&tracking_number={tracking_number}"
        )
        data = delivery.data
        # The carrier code travels only in resource_url, as with the real ShipEngine.
        assert "carrier_code" not in data
        assert CARRIER not in json.dumps(data)
        assert data["tracking_number"] == tracking_number
        times = [parse_time(event["occurred_at"]) for event in data["events"]]
        assert times == sorted(times, reverse=True)
        assert len(set(times)) == len(times)
        assert times[0] < now
        if previous_newest is not None:
            assert times[0] > previous_newest
        previous_newest = times[0]
        if data["status_code"] != "DE":
            assert data["actual_delivery_date"] is None

    history_sizes = [len(delivery.data["events"]) for delivery in receiver.received]
    assert history_sizes == sorted(history_sizes)
    final = receiver.received[-1].data
    assert final["actual_delivery_date"] == final["events"][0]["occurred_at"]
    assert final["events"][0]["status_code"] == "DE"
    assert final["events"][-1]["status_code"] == ""  # real label events come like this
    assert any(event["postal_code"] == "" for event in final["events"])
    assert not re.search(r"[Z+]", final["events"][0]["carrier_occurred_at"][10:])
    assert all(record.delivered for record in simulator.deliveries)


async def test_resource_url_values_are_url_encoded(
    http: ClientSession, simulator: Simulator, receiver: Receiver
) -> None:
    await register(http, receiver.url)
    tracking_number = "1Z 999&AA=10"

    assert await start(http, tracking_number) == 204
    await simulator.wait_idle()

    resource_url = receiver.received[0].payload["resource_url"]
    assert urlencode({"tracking_number": tracking_number}) in resource_url
    query = parse_qs(urlsplit(resource_url).query)
    assert query == {"carrier_code": [CARRIER], "tracking_number": [tracking_number]}


async def test_start_is_idempotent(
    http: ClientSession, simulator: Simulator, receiver: Receiver
) -> None:
    await register(http, receiver.url)

    assert await start(http, "9400A") == 204
    await simulator.wait_idle()
    assert await start(http, "9400A") == 204
    await simulator.wait_idle()

    assert receiver.statuses == LIFE


async def test_signatures_follow_a_key_rotation(
    http: ClientSession, anonymous: ClientSession, simulator: Simulator, receiver: Receiver
) -> None:
    await register(http, receiver.url)
    jwks_before = await fetch_jwks(anonymous)
    assert {key["kty"] for key in jwks_before["keys"]} == {"RSA", "EC"}
    old_kid = simulator.keys.kid

    async with anonymous.post("/_sim/rotate-key") as response:
        new_kid = (await response.json())["kid"]
    assert await start(http, "9400ROT") == 204
    await simulator.wait_idle()

    jwks_after = await fetch_jwks(anonymous)
    assert old_kid not in {key["kid"] for key in jwks_after["keys"]}
    assert {verify_signature(jwks_after, delivery) for delivery in receiver.received} == {new_kid}


async def test_stop_halts_deliveries_and_start_resumes_the_life(
    http: ClientSession, simulator: Simulator, receiver: Receiver
) -> None:
    await register(http, receiver.url)

    def slow_down_after_the_first(_: Received) -> None:
        # Runs before the delivery is answered, so the next step waits an hour.
        simulator.configure(pace_s=3600)

    receiver.on_delivery = slow_down_after_the_first
    assert await start(http, "9400STOP") == 204
    await asyncio.wait_for(receiver.got_one.wait(), timeout=10)

    async with http.post("/v1/tracking/stop", params=track_query("9400STOP")) as response:
        assert response.status == 204
        assert await response.read() == b""
    await simulator.wait_idle()
    assert receiver.statuses == ["AC"]

    receiver.on_delivery = None
    simulator.configure(pace_s=0)
    assert await start(http, "9400STOP") == 204
    await simulator.wait_idle()
    assert receiver.statuses == LIFE


async def test_without_a_registered_webhook_a_delivery_is_undeliverable(
    http: ClientSession, simulator: Simulator
) -> None:
    assert await start(http, "9400NOHOOK") == 204
    await simulator.wait_idle()

    assert [record.status_code for record in simulator.deliveries] == LIFE
    assert all(record.url is None and record.attempt == 1 for record in simulator.deliveries)


async def test_a_failed_delivery_is_retried(
    http: ClientSession, anonymous: ClientSession, simulator: Simulator, receiver: Receiver
) -> None:
    await register(http, receiver.url)
    receiver.answers = [500]

    assert await start(http, "9400RETRY") == 204
    await simulator.wait_idle()

    assert receiver.statuses == ["AC", *LIFE]
    first, second = simulator.deliveries[:2]
    assert (first.status_code, first.attempt, first.http_status) == ("AC", 1, 500)
    assert (second.status_code, second.attempt, second.http_status) == ("AC", 2, 200)
    jwks = await fetch_jwks(anonymous)
    for delivery in receiver.received:
        verify_signature(jwks, delivery)


async def test_an_unreachable_webhook_gets_every_attempt(
    http: ClientSession, simulator: Simulator
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    await register(http, f"http://127.0.0.1:{closed_port}/hooks")

    assert await start(http, "9400DOWN") == 204
    await simulator.wait_idle()

    attempts = simulator.config.delivery_attempts
    assert len(simulator.deliveries) == attempts * len(LIFE)
    assert all(record.http_status is None and record.error for record in simulator.deliveries)


async def test_duplicate_each_sends_every_delivery_twice(
    http: ClientSession, simulator: Simulator, receiver: Receiver
) -> None:
    await register(http, receiver.url)
    simulator.script_lifecycle("9400DUP", duplicate_each=True)

    assert await start(http, "9400DUP") == 204
    await simulator.wait_idle()

    assert receiver.statuses == [status for status in LIFE for _ in range(2)]
    pairs = zip(receiver.received[::2], receiver.received[1::2], strict=True)
    assert all(first.body == second.body for first, second in pairs)


async def test_replay_older_sends_the_previous_state_after_each_new_one(
    http: ClientSession, anonymous: ClientSession, simulator: Simulator, receiver: Receiver
) -> None:
    await register(http, receiver.url)
    body = {"tracking_number": "9400OLD", "replay_older": True}
    async with anonymous.post("/_sim/lifecycles", json=body) as response:
        assert response.status == 201

    assert await start(http, "9400OLD") == 204
    await simulator.wait_idle()

    seen = [(d.data["status_code"], len(d.data["events"])) for d in receiver.received]
    assert seen == [
        ("AC", 2),
        ("IT", 3),
        ("AC", 2),
        ("IT", 4),
        ("IT", 3),
        ("IT", 6),
        ("IT", 4),
        ("DE", 7),
        ("IT", 6),
    ]


# -- scripted answers -------------------------------------------------------------------------


async def test_a_scripted_400_answers_once_then_start_succeeds(
    http: ClientSession, simulator: Simulator
) -> None:
    simulator.script("9400BAD", status=400, error_code="invalid_identifier", times=1)

    async with http.post("/v1/tracking/start", params=track_query("9400BAD")) as response:
        error = await error_of(response, 400)
    assert error["error_source"] == "carrier"
    assert error["error_type"] == "validation"
    assert error["error_code"] == "invalid_identifier"
    assert error["carrier_code"] == CARRIER
    assert simulator.package(CARRIER, "9400BAD") is None

    assert await start(http, "9400BAD") == 204


async def test_a_scripted_429_has_retry_after_and_the_exact_body(
    http: ClientSession, simulator: Simulator
) -> None:
    simulator.script("9400RATE", status=429, retry_after_s=7)

    async with http.post("/v1/tracking/start", params=track_query("9400RATE")) as response:
        error = await error_of(response, 429)
        assert response.headers["Retry-After"] == "7"
    assert error == RATE_LIMIT_ERROR


async def test_a_scripted_500_over_http(http: ClientSession, anonymous: ClientSession) -> None:
    script = {"tracking_number": "9400ERR", "operation": "stop", "status": 500, "times": 2}
    async with anonymous.post("/_sim/scripts", json=script) as response:
        assert response.status == 201

    for _ in range(2):
        async with http.post("/v1/tracking/stop", params=track_query("9400ERR")) as response:
            error = await error_of(response, 500)
        assert (error["error_type"], error["error_code"]) == ("system", "unspecified")
    async with http.post("/v1/tracking/stop", params=track_query("9400ERR")) as response:
        assert response.status == 204


async def test_a_scripted_delay_then_success(
    http: ClientSession, simulator: Simulator, receiver: Receiver
) -> None:
    await register(http, receiver.url)
    simulator.script("9400SLOW", status=204, delay_s=0.3, times=1)

    began = time.monotonic()
    assert await start(http, "9400SLOW") == 204
    assert time.monotonic() - began >= 0.3
    await simulator.wait_idle()

    assert receiver.statuses == LIFE


async def test_latency_is_added_to_api_answers(
    http: ClientSession, anonymous: ClientSession
) -> None:
    async with anonymous.post("/_sim/config", json={"latency_s": 0.2}) as response:
        assert (await response.json())["latency_s"] == 0.2

    began = time.monotonic()
    async with http.get("/v1/tracking", params=track_query("9400LAT")) as response:
        assert response.status == 200
    assert time.monotonic() - began >= 0.2


# -- the rate limit ---------------------------------------------------------------------------


async def test_the_rate_limit_refuses_calls_over_it_until_the_window_moves_on(
    http: ClientSession, anonymous: ClientSession, simulator: Simulator
) -> None:
    # 600 a minute over a 1 s window: at most 10 calls in any second, every endpoint together.
    limit = {"rate_limit_per_minute": 600, "rate_limit_window_s": 1.0}
    async with anonymous.post("/_sim/config", json=limit) as response:
        assert response.status == 200
        assert (await response.json()).items() >= limit.items()
    simulator.script("9400SCRIPTED", status=429, times=1)

    async with anonymous.post("/v1/tracking/start", params=track_query("9400")) as response:
        assert response.status == 401  # not authenticated, so not counted
    async with http.post("/v1/tracking/start", params=track_query("9400SCRIPTED")) as response:
        assert response.status == 429  # a scripted 429 is a call like any other
    for number in range(3):
        assert await start(http, f"9400LIMIT{number}") == 204
        async with http.get("/v1/tracking", params=track_query(f"9400LIMIT{number}")) as response:
            assert response.status == 200
        async with http.get("/v1/environment/webhooks") as response:
            assert response.status == 200

    async with http.get("/v1/tracking", params=track_query("9400LIMIT0")) as response:
        error = await error_of(response, 429)
        retry_after = int(response.headers["Retry-After"])
    assert error == RATE_LIMIT_ERROR
    assert retry_after == 1  # whole seconds, at least 1, and the window is only 1 s long

    statuses = [(call.http_status, call.rate_limited) for call in simulator.calls]
    assert statuses == [
        (401, False),
        (429, False),
        *[(204, False), (200, False), (200, False)] * 3,
        (429, True),
    ]
    async with anonymous.get("/_sim/stats") as response:
        stats = await response.json()
    assert (stats["calls"], stats["rate_limited"], stats["in_flight"]) == (12, 1, 0)

    # The behaviour under test is time passing: waiting Retry-After must free the window.
    await asyncio.sleep(retry_after)
    for number in range(10):
        async with http.get("/v1/tracking", params=track_query(f"9400AGAIN{number}")) as response:
            assert response.status == 200
    assert not any(call.rate_limited for call in simulator.calls[-10:])


async def test_the_rate_limit_is_off_by_default_and_at_zero(
    http: ClientSession, simulator: Simulator
) -> None:
    assert simulator.config.rate_limit_per_minute is None
    simulator.configure(rate_limit_per_minute=60, rate_limit_window_s=1.0)
    assert simulator.config.calls_per_rate_window == 1
    async with http.get("/v1/environment/webhooks") as response:
        assert response.status == 200
    async with http.get("/v1/environment/webhooks") as response:
        assert response.status == 429

    simulator.configure(rate_limit_per_minute=0)
    assert simulator.config.rate_limit_per_minute is None
    for _ in range(5):
        async with http.get("/v1/environment/webhooks") as response:
            assert response.status == 200


async def test_a_rate_limit_that_lets_no_call_through_is_refused(
    anonymous: ClientSession, simulator: Simulator
) -> None:
    with pytest.raises(ValueError, match="no call"):
        simulator.configure(rate_limit_per_minute=30, rate_limit_window_s=1.0)
    body = {"rate_limit_per_minute": 30, "rate_limit_window_s": 1.0}
    async with anonymous.post("/_sim/config", json=body) as response:
        error = await error_of(response, 400)
    assert "no call" in error["message"]
    assert simulator.config.rate_limit_per_minute is None


def test_the_window_slides_and_retry_after_waits_for_its_oldest_call() -> None:
    now = [0.0]
    window = SlidingWindow(clock=lambda: now[0])
    per_minute, window_s = 12, 10.0  # 2 calls in any 10 s

    assert window.admit(per_minute, window_s) is None  # at 0
    now[0] = 6.0
    assert window.admit(per_minute, window_s) is None  # at 6
    now[0] = 7.5
    assert window.admit(per_minute, window_s) == 3  # the call at 0 leaves at 10: 2.5 s, rounded up
    now[0] = 9.9
    assert window.admit(per_minute, window_s) == 1  # never less than 1
    now[0] = 10.0
    assert window.admit(per_minute, window_s) is None  # the refused calls took no slot
    now[0] = 15.0
    assert window.admit(per_minute, window_s) == 1  # the call at 6 leaves at 16
    # A limit lowered at runtime: the slot frees only once the surplus has left too.
    assert window.admit(6, window_s) == 5


# -- calls in flight --------------------------------------------------------------------------


async def test_calls_in_flight_are_counted_and_overlaps_per_package_measured(
    http: ClientSession, anonymous: ClientSession, simulator: Simulator
) -> None:
    simulator.script("9400BOTH", status=204, delay_s=0.5)
    stops_answered = asyncio.create_task(simulator.wait_for_calls(1, "/v1/tracking/stop"))
    calls = [asyncio.create_task(start(http, "9400BOTH")) for _ in range(2)]

    await asyncio.wait_for(simulator.wait_for_in_flight(2), timeout=10)
    assert simulator.in_flight == 2
    assert simulator.calls == []
    await asyncio.wait_for(simulator.wait_for_calls(2, "/v1/tracking/start"), timeout=10)
    assert simulator.in_flight == 0
    assert await asyncio.gather(*calls) == [204, 204]
    assert not stops_answered.done()

    assert await start(http, "9400ONEBYONE") == 204
    async with http.post("/v1/tracking/stop", params=track_query("9400ONEBYONE")) as response:
        assert response.status == 204
    await asyncio.wait_for(stops_answered, timeout=10)
    async with http.get("/v1/tracking", params=track_query("9400ONEBYONE")) as response:
        assert response.status == 200  # only start and stop calls act on a package

    assert simulator.max_concurrent_per_package() == {
        (CARRIER, "9400BOTH"): 2,
        (CARRIER, "9400ONEBYONE"): 1,
    }
    for call in simulator.calls:
        assert call.at <= call.ended_at
    both = [call for call in simulator.calls if call.query == track_query("9400BOTH")]
    assert all(call.ended_at - call.at >= 0.5 for call in both)
    assert max(call.at for call in both) < min(call.ended_at for call in both)
    async with anonymous.get("/_sim/stats") as response:
        stats = await response.json()
    assert stats["in_flight"] == 0
    assert {"carrier_code": CARRIER, "tracking_number": "9400BOTH", "max_concurrent": 2} in (
        stats["max_concurrent_per_package"]
    )
    async with anonymous.get("/_sim/calls") as response:
        logged = await response.json()
    assert {"at", "ended_at", "rate_limited", "http_status"} <= logged[0].keys()


async def test_a_client_killed_mid_call_ends_its_call_with_499(
    sim_server: TestServer, simulator: Simulator
) -> None:
    # TestServer always cancels a handler whose client went away (handler_cancellation).
    simulator.script("9400KILLED", status=204, delay_s=3600)
    url = sim_server.make_url("/v1/tracking/start").with_query(track_query("9400KILLED"))

    await kill_mid_call(simulator, str(url))
    await asyncio.wait_for(simulator.wait_for_calls(1), timeout=20)

    assert simulator.in_flight == 0
    [call] = simulator.calls
    assert (call.path, call.http_status, call.rate_limited) == (
        "/v1/tracking/start",
        CANCELLED_STATUS,
        False,
    )
    assert simulator.package(CARRIER, "9400KILLED") is None  # cancelled before it acted
    assert simulator.max_concurrent_per_package() == {(CARRIER, "9400KILLED"): 1}


async def test_without_handler_cancellation_a_killed_clients_call_is_answered_all_the_same() -> (
    None
):
    # aiohttp's default, as `python -m service simulator` and the devstack serve it.
    config = SimulatorConfig(api_key=API_KEY, pace_s=3600, public_url=PUBLIC_URL)
    app = create_simulator_app(config)
    simulator = app[SIMULATOR]
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        simulator.script("9400KILLED", status=204, delay_s=0.3)
        query = urlencode(track_query("9400KILLED"))

        await kill_mid_call(simulator, f"http://{host}:{port}/v1/tracking/start?{query}")
        await asyncio.wait_for(simulator.wait_for_calls(1), timeout=20)

        assert simulator.in_flight == 0
        [call] = simulator.calls
        assert (call.http_status, call.rate_limited) == (204, False)
        assert call.ended_at - call.at >= 0.3
        assert simulator.package(CARRIER, "9400KILLED") is not None
    finally:
        await runner.cleanup()


# -- reading tracking, webhook registrations --------------------------------------------------


async def test_get_tracking_follows_the_life(
    http: ClientSession, simulator: Simulator, receiver: Receiver
) -> None:
    async with http.get("/v1/tracking", params=track_query("9400GET")) as response:
        assert response.status == 200
        unknown = await response.json()
    assert (unknown["status_code"], unknown["status_description"]) == ("UN", "Unknown")
    assert unknown["events"] == []

    await register(http, receiver.url)
    assert await start(http, "9400GET") == 204
    await simulator.wait_idle()

    async with http.get("/v1/tracking", params=track_query("9400GET")) as response:
        current = await response.json()
    assert current == receiver.received[-1].data
    assert current["status_code"] == "DE"

    async with http.get("/v1/tracking", params={"tracking_number": "9400GET"}) as response:
        error = await error_of(response, 400)
    assert error["field_name"] == "carrier_code"


async def test_webhook_registrations(http: ClientSession, receiver: Receiver) -> None:
    webhook = await register(http, receiver.url)
    assert webhook["event"] == "track"
    assert webhook["url"] == receiver.url
    assert webhook["webhook_id"].startswith("se-")

    body = {"event": "track", "url": "https://elsewhere.test/hook"}
    async with http.post("/v1/environment/webhooks", json=body) as response:
        error = await error_of(response, 409)
    assert error["error_code"] == "webhook_event_type_conflict"
    assert error["error_type"] == "business_rules"

    path = f"/v1/environment/webhooks/{webhook['webhook_id']}"
    update = {"url": "https://elsewhere.test/hook", "headers": [{"key": "k", "value": "v"}]}
    async with http.put(path, json=update) as response:
        assert response.status == 204
    async with http.get("/v1/environment/webhooks") as response:
        listed = await response.json()
    assert listed == [{**webhook, **update}]

    async with http.delete(path) as response:
        assert response.status == 204
    async with http.delete(path) as response:
        error = await error_of(response, 404)
    async with http.get("/v1/environment/webhooks") as response:
        assert await response.json() == []


# -- the call log and reset -------------------------------------------------------------------


async def test_every_api_call_is_logged(
    http: ClientSession, anonymous: ClientSession, simulator: Simulator
) -> None:
    before = time.time()
    await start(http, "9400LOG")
    async with anonymous.post("/v1/tracking/stop", params=track_query("9400LOG")) as response:
        assert response.status == 401
    async with http.get("/v1/tracking", params=track_query("9400LOG")) as response:
        assert response.status == 200
    await simulator.wait_idle()

    calls = [(c.method, c.path, c.query, c.http_status) for c in simulator.calls]
    assert calls == [
        ("POST", "/v1/tracking/start", track_query("9400LOG"), 204),
        ("POST", "/v1/tracking/stop", track_query("9400LOG"), 401),
        ("GET", "/v1/tracking", track_query("9400LOG"), 200),
    ]
    assert all(before <= call.at <= time.time() for call in simulator.calls)
    async with anonymous.get("/_sim/calls") as response:
        assert [call["http_status"] for call in await response.json()] == [204, 401, 200]


async def test_reset_forgets_packages_scripts_calls_and_deliveries(
    http: ClientSession, anonymous: ClientSession, simulator: Simulator, receiver: Receiver
) -> None:
    await register(http, receiver.url)
    simulator.configure(pace_s=3600)
    simulator.script("9400RESET", operation="stop", status=500)
    assert await start(http, "9400RESET") == 204

    async with anonymous.post("/_sim/reset") as response:
        assert response.status == 204
    await simulator.wait_idle()

    assert simulator.calls == []
    assert simulator.packages == []
    assert simulator.scripts == []
    async with anonymous.get("/_sim/deliveries") as response:
        assert await response.json() == []
    assert len(simulator.webhooks) == 1


# -- configuration ----------------------------------------------------------------------------


def test_config_from_env_reads_the_rate_limit() -> None:
    config = SimulatorConfig.from_env(
        {"SIMULATOR_RATE_LIMIT_PER_MINUTE": "20", "SIMULATOR_RATE_LIMIT_WINDOW_S": "6"}
    )
    assert (config.rate_limit_per_minute, config.rate_limit_window_s) == (20, 6.0)
    assert config.calls_per_rate_window == 2
    assert SimulatorConfig.from_env({"SIMULATOR_RATE_LIMIT_PER_MINUTE": "0"}) == SimulatorConfig()
    with pytest.raises(SettingsError, match=r"^SIMULATOR_RATE_LIMIT_PER_MINUTE: .*no call"):
        SimulatorConfig.from_env(
            {"SIMULATOR_RATE_LIMIT_PER_MINUTE": "30", "SIMULATOR_RATE_LIMIT_WINDOW_S": "1"}
        )


def test_config_from_env_reads_the_simulator_variables() -> None:
    config = SimulatorConfig.from_env(
        {"SIMULATOR_HOST": "localhost", "SIMULATOR_PORT": "9000", "SIMULATOR_PACE_S": "0.5"}
    )
    assert (config.host, config.port, config.pace_s) == ("localhost", 9000, 0.5)
    assert config.public_url == "http://localhost:9000"
    assert SimulatorConfig.from_env({}) == SimulatorConfig()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SIMULATOR_PORT", "eighty"),
        ("SIMULATOR_PACE_S", "-1"),
        ("SIMULATOR_LATENCY_S", "soon"),
        ("SIMULATOR_PUBLIC_URL", "ftp://x"),
        ("SIMULATOR_RATE_LIMIT_PER_MINUTE", "-1"),
        ("SIMULATOR_RATE_LIMIT_WINDOW_S", "0"),
    ],
)
def test_config_from_env_names_the_bad_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"^{name}"):
        SimulatorConfig.from_env({name: value})


def test_event_times_are_in_the_past_and_local_times_have_no_offset() -> None:
    now = datetime.now(UTC)
    life = plan_life("9400PLAN", CARRIER, now)
    events = life[-1]["events"]
    assert all(parse_time(event["occurred_at"]) < now for event in events)
    assert parse_time(events[-1]["occurred_at"]) > now - timedelta(days=5)
    assert all(datetime.fromisoformat(e["carrier_occurred_at"]).tzinfo is None for e in events)
