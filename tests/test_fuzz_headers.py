"""What schemathesis does not send: random and adversarial bytes in every header the service
reads, and in the bodies of the receiver and the dashboard's forms. Thousands of requests,
written byte for byte on plain sockets, and not one answer may be a 5xx.

The generator is seeded, so a failure names the request that caused it and reproduces.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import AsyncIterator, Callable

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from service.api.app import create_app
from service.settings import Settings
from service.webhooks.signatures import KEY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER
from tests.conftest import RunningSimulator
from tests.payloads import track_body
from tests.raw_http import exchange, request_bytes

Client = TestClient[web.Request, web.Application]
SECRET_HEADER = "X-Hook-Secret"
SECRET = "fuzz-secret"
REQUESTS_PER_TARGET = 1000
SEED = 20261206
# A safety stop for a server that never answers, not a guess at how long anything takes.
ANSWER_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True)
class Request:
    method: bytes
    path: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def describe(self) -> str:
        return f"{self.method!r} {self.path!r} {self.headers!r} body={self.body[:200]!r}"


# -- adversarial values ------------------------------------------------------------------------

ODD_CHARSETS = [
    b"utf-8", b"utf-7", b"utf-16", b"utf-32-be", b"latin-1", b"ebcdic-cp-be", b"x-unknown",
    b"", b'"utf-8"', b"\xff\xfe", b"utf-8; charset=ascii", b"cp1252", b"idna", b"rot13",
    b"base64", b"zlib", b"uu", b"punycode", b"mbcs", b"undefined",
]  # fmt: skip
MEDIA_TYPES = [
    b"application/json", b"application/x-www-form-urlencoded", b"multipart/form-data",
    b"text/plain", b"application/*", b"*/*", b"", b"application/json\xff",
]  # fmt: skip


def header_value(rng: random.Random, valid: bytes) -> bytes:
    """A header value: the valid one bent, or noise, or something long or strange."""
    choice = rng.randrange(10)
    if choice == 0:
        return valid
    if choice == 1:
        return valid + bytes([rng.randrange(0x80, 0x100)])  # not UTF-8 at the end
    if choice == 2:
        cut = rng.randrange(len(valid) + 1)
        return valid[:cut] + bytes([rng.randrange(0x80, 0x100)]) + valid[cut:]
    if choice == 3:
        return noise(rng, rng.randrange(1, 64))
    if choice == 4:
        return noise(rng, rng.randrange(1000, 7000))  # under aiohttp's 8 KiB line limit
    if choice == 5:
        return "🙂".encode() * rng.randrange(1, 50)
    if choice == 6:
        return b"\xed\xa0\x80" + valid  # an encoded surrogate: invalid UTF-8
    if choice == 7:
        return b" " * rng.randrange(1, 5) + valid + b"\t"
    if choice == 8:
        return b"\xc0\xaf" * rng.randrange(1, 10)  # overlong encodings
    return valid.upper()


def noise(rng: random.Random, length: int) -> bytes:
    """Bytes a header may carry on the wire: anything but CR, LF and NUL."""
    allowed = [b for b in range(1, 256) if b not in (10, 13)]
    return bytes(rng.choice(allowed) for _ in range(length))


def content_type(rng: random.Random, valid: bytes) -> bytes:
    if rng.random() < 0.3:
        return valid
    media = rng.choice(MEDIA_TYPES)
    if rng.random() < 0.7:
        media += b"; charset=" + rng.choice(ODD_CHARSETS)
    if rng.random() < 0.3:
        media += b"; boundary=" + header_value(rng, b"zz")
    return media


def body_value(rng: random.Random, valid: bytes) -> bytes:
    choice = rng.randrange(9)
    if choice == 0:
        return valid
    if choice == 1:
        return noise(rng, rng.randrange(0, 4000))
    if choice == 2:
        depth = rng.choice([100, 1000, 50_000])
        return b"[" * depth + b"]" * depth
    if choice == 3:
        depth = rng.choice([100, 1000, 20_000])
        return b'{"a":' * depth + b"1" + b"}" * depth
    if choice == 4:
        cut = rng.randrange(len(valid) + 1)
        return valid[:cut]
    if choice == 5:
        return valid.replace(b'"', b"\xff", rng.randrange(1, 5))
    if choice == 6:
        return "\ufeff".encode() + valid  # a byte order mark
    if choice == 7:
        return valid.decode().encode("utf-16")
    return b'{"x": 1' + b"9" * rng.randrange(10, 5000) + b"}"


# -- targets -----------------------------------------------------------------------------------

Generate = Callable[[random.Random], Request]


def receiver_requests(signed: bytes, headers: dict[str, str]) -> Generate:
    valid = {name.lower(): value.encode() for name, value in headers.items()}

    def generate(rng: random.Random) -> Request:
        sent = [
            (b"content-type", content_type(rng, b"application/json")),
            (SECRET_HEADER.encode(), header_value(rng, SECRET.encode())),
        ]
        for name in (KEY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER):
            if rng.random() < 0.9:
                sent.append((name.encode(), header_value(rng, valid[name])))
        if rng.random() < 0.2:
            sent.append((SIGNATURE_HEADER.encode(), header_value(rng, valid[SIGNATURE_HEADER])))
        body = signed if rng.random() < 0.3 else body_value(rng, signed)
        return Request(b"POST", b"/v1/webhooks/shipengine", sent, body)

    return generate


def api_requests(token: str) -> Generate:
    subscribe = json.dumps({"carrier_code": "ups", "tracking_number": "1Z999"}).encode()

    def generate(rng: random.Random) -> Request:
        sent = [
            (b"authorization", header_value(rng, f"Bearer {token}".encode())),
            (b"x-request-id", header_value(rng, b"req-1")),
            (b"content-type", content_type(rng, b"application/json")),
        ]
        if rng.random() < 0.5:
            return Request(b"GET", b"/v1/subscriptions?limit=2", sent, b"")
        return Request(b"POST", b"/v1/subscriptions", sent, body_value(rng, subscribe))

    return generate


def dashboard_requests(token: str) -> Generate:
    login = f"token={token}".encode()

    def generate(rng: random.Random) -> Request:
        sent = [
            (b"content-type", content_type(rng, b"application/x-www-form-urlencoded")),
            (b"cookie", b"dashboard_session=" + header_value(rng, b"abc")),
            (b"origin", header_value(rng, b"http://127.0.0.1")),
            (b"sec-fetch-site", header_value(rng, b"same-origin")),
        ]
        path = rng.choice([b"/dashboard/login", b"/dashboard/logout", b"/dashboard/failures/retry"])
        if rng.random() < 0.2:
            return Request(b"GET", b"/dashboard/subscriptions", sent, b"")
        return Request(b"POST", path, sent, body_value(rng, login))

    return generate


# -- sending -----------------------------------------------------------------------------------


async def send(client: Client, request: Request) -> int:
    """Write the request on its own connection; the answer's status (0: no answer)."""
    host, port = client.server.host, client.server.port
    assert port is not None
    wire = request_bytes(
        request.method, request.path, request.headers, request.body, f"{host}:{port}".encode()
    )
    return (await exchange(host, port, wire)).status


@pytest.fixture
async def fuzzed(live_settings: Settings) -> AsyncIterator[Client]:
    settings = dataclasses.replace(
        live_settings, webhook_secret_header=SECRET_HEADER, webhook_secret=SECRET
    )
    async with TestClient(TestServer(create_app(settings))) as client:
        yield client


@pytest.mark.slow
@pytest.mark.parametrize("target", ["receiver", "api", "dashboard"])
async def test_no_header_or_body_gets_a_5xx(
    fuzzed: Client, token: str, shipengine: RunningSimulator, target: str
) -> None:
    signed = json.dumps(track_body("FUZZ1", "stamps_com", 1)).encode()
    generators = {
        "receiver": receiver_requests(signed, shipengine.simulator.keys.headers(signed)),
        "api": api_requests(token),
        "dashboard": dashboard_requests(token),
    }
    rng = random.Random(f"{SEED}-{target}")
    statuses: dict[int, int] = {}
    with structlog.testing.capture_logs() as logs:
        for _ in range(REQUESTS_PER_TARGET):
            request = generators[target](rng)
            status = await send(fuzzed, request)
            assert status < 500, request.describe()
            statuses[status] = statuses.get(status, 0) + 1
    assert not [entry for entry in logs if entry["log_level"] in ("error", "critical")]
    assert len(statuses) > 1, statuses  # the requests were not all refused alike
