"""Webhook signature verification against real RSA keys served by a real JWKS endpoint.

The simulator's `SigningKeys` signs as ShipEngine does; a tiny aiohttp app serves its JWKS,
counts fetches and can fail, hang or serve extra keys. A fake monotonic clock drives the
refresh interval, so no test sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from multidict import CIMultiDict

from service.simulator.signing import SigningKeys, webhook_timestamp
from service.webhooks.signatures import (
    KEY_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    KeySet,
    KeysUnavailable,
    Refusal,
    SignatureVerifier,
    Verification,
    parse_timestamp,
    secret_matches,
)

NOW = datetime(2026, 11, 27, 16, 4, 5, 123000, tzinfo=UTC)
BODY = b'{"resource_type":"API_TRACK","data":{"tracking_number":"1Z999","status_code":"IT"}}'
INTERVAL_S = 60.0


@dataclass
class JwksEndpoint:
    """What the JWKS server serves, and how often it was asked."""

    signing: SigningKeys
    url: str = ""
    fetches: int = 0
    status: int = 200
    body: bytes | None = None  # served instead of the JWKS when set
    extra_keys: list[Any] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.gate.set()

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        self.arrived.set()
        await self.gate.wait()
        if self.status != 200:
            return web.json_response({"errors": ["down"]}, status=self.status)
        if self.body is not None:
            return web.Response(body=self.body, content_type="application/json")
        document = self.signing.jwks()
        document["keys"].extend(self.extra_keys)
        return web.json_response(document)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def signing() -> SigningKeys:
    return SigningKeys()


@pytest.fixture
async def endpoint(signing: SigningKeys) -> AsyncIterator[JwksEndpoint]:
    jwks = JwksEndpoint(signing)
    app = web.Application()
    app.router.add_get("/jwks", jwks.handle)
    server = TestServer(app)
    await server.start_server()
    jwks.url = str(server.make_url("/jwks"))
    yield jwks
    jwks.gate.set()  # a handler held at the gate must finish before the server can close
    await server.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def keyset(endpoint: JwksEndpoint, session: aiohttp.ClientSession, clock: FakeClock) -> KeySet:
    return KeySet(session, endpoint.url, refresh_interval_s=INTERVAL_S, timeout_s=2, clock=clock)


@pytest.fixture
def verifier(keyset: KeySet) -> SignatureVerifier:
    return SignatureVerifier(keyset, now=lambda: NOW)


def signed(signing: SigningKeys, body: bytes = BODY, at: datetime = NOW) -> dict[str, str]:
    return signing.headers(body, now=at)


def sign_raw(
    private: rsa.RSAPrivateKey, kid: str, timestamp: str, body: bytes = BODY
) -> dict[str, str]:
    """Headers signed by any RSA key, under any kid, with the timestamp exactly as given."""
    signature = private.sign(timestamp.encode() + b"." + body, padding.PKCS1v15(), hashes.SHA256())
    return {
        KEY_ID_HEADER: kid,
        SIGNATURE_HEADER: base64.b64encode(signature).decode(),
        TIMESTAMP_HEADER: timestamp,
    }


def new_rsa(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def rsa_jwk(private: rsa.RSAPrivateKey, kid: str, **extra: str) -> dict[str, str]:
    numbers = private.public_key().public_numbers()

    def b64url(value: int) -> str:
        raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return {"kty": "RSA", "kid": kid, "n": b64url(numbers.n), "e": b64url(numbers.e), **extra}


def assert_refused(result: Verification, refusal: Refusal) -> None:
    assert result.refusal is refusal, result.detail
    assert not result.verified


# --- the happy path and tampering -------------------------------------------------------


async def test_valid_signature_verifies(
    verifier: SignatureVerifier, signing: SigningKeys, endpoint: JwksEndpoint
) -> None:
    result = await verifier.verify(signed(signing), BODY)

    assert result.verified, result.detail
    assert result.refusal is None
    assert result.kid == signing.kid
    assert result.timestamp == NOW
    assert endpoint.fetches == 1


async def test_cached_key_is_not_fetched_again(
    verifier: SignatureVerifier, signing: SigningKeys, endpoint: JwksEndpoint, clock: FakeClock
) -> None:
    for _ in range(3):
        assert (await verifier.verify(signed(signing), BODY)).verified
        clock.advance(INTERVAL_S * 2)

    assert endpoint.fetches == 1


async def test_tampered_body_is_refused(verifier: SignatureVerifier, signing: SigningKeys) -> None:
    headers = signed(signing)

    result = await verifier.verify(headers, BODY.replace(b'"IT"', b'"DE"'))

    assert_refused(result, Refusal.BAD_SIGNATURE)
    assert result.kid == signing.kid


async def test_body_with_extra_whitespace_is_refused(
    verifier: SignatureVerifier, signing: SigningKeys
) -> None:
    # Same JSON, different bytes: the raw body is what is signed.
    assert_refused(await verifier.verify(signed(signing), BODY + b"\n"), Refusal.BAD_SIGNATURE)


async def test_timestamp_changed_after_signing_is_refused(
    verifier: SignatureVerifier, signing: SigningKeys
) -> None:
    headers = signed(signing)
    headers[TIMESTAMP_HEADER] = webhook_timestamp(NOW + timedelta(seconds=1))

    assert_refused(await verifier.verify(headers, BODY), Refusal.BAD_SIGNATURE)


async def test_timestamp_rewritten_in_another_format_is_refused(
    verifier: SignatureVerifier, signing: SigningKeys
) -> None:
    # Same instant, other spelling: the header bytes are signed, not the moment they name.
    headers = signed(signing)
    headers[TIMESTAMP_HEADER] = "2026-11-27T16:04:05.123000Z"

    assert_refused(await verifier.verify(headers, BODY), Refusal.BAD_SIGNATURE)


async def test_signature_by_another_key_under_the_same_kid_is_refused(
    verifier: SignatureVerifier, signing: SigningKeys
) -> None:
    headers = sign_raw(new_rsa(), signing.kid, webhook_timestamp(NOW))

    assert_refused(await verifier.verify(headers, BODY), Refusal.BAD_SIGNATURE)


async def test_signature_of_the_wrong_length_is_refused(
    verifier: SignatureVerifier, signing: SigningKeys
) -> None:
    headers = signed(signing)
    headers[SIGNATURE_HEADER] = base64.b64encode(b"short").decode()

    assert_refused(await verifier.verify(headers, BODY), Refusal.BAD_SIGNATURE)


# --- rotation and the refresh budget ----------------------------------------------------


async def test_rotated_key_is_fetched_once_then_verifies(
    verifier: SignatureVerifier, signing: SigningKeys, endpoint: JwksEndpoint, clock: FakeClock
) -> None:
    assert (await verifier.verify(signed(signing), BODY)).verified
    clock.advance(INTERVAL_S)
    signing.rotate()

    first = await verifier.verify(signed(signing), BODY)
    second = await verifier.verify(signed(signing), BODY)

    assert first.verified, first.detail
    assert second.verified, second.detail
    assert endpoint.fetches == 2


async def test_old_key_is_dropped_once_the_new_set_is_fetched(
    verifier: SignatureVerifier, signing: SigningKeys, endpoint: JwksEndpoint, clock: FakeClock
) -> None:
    old_headers = signed(signing)
    assert (await verifier.verify(old_headers, BODY)).verified
    clock.advance(INTERVAL_S)
    signing.rotate()
    assert (await verifier.verify(signed(signing), BODY)).verified

    assert_refused(await verifier.verify(old_headers, BODY), Refusal.UNKNOWN_KEY)
    assert endpoint.fetches == 2


async def test_unknown_kid_within_the_interval_does_not_fetch_again(
    verifier: SignatureVerifier, signing: SigningKeys, endpoint: JwksEndpoint, clock: FakeClock
) -> None:
    assert (await verifier.verify(signed(signing), BODY)).verified  # first use: fetch 1
    clock.advance(INTERVAL_S - 1)
    signing.rotate()

    result = await verifier.verify(signed(signing), BODY)

    assert_refused(result, Refusal.UNKNOWN_KEY)
    assert endpoint.fetches == 1

    clock.advance(1)
    later = await verifier.verify(signed(signing), BODY)

    assert later.verified, later.detail
    assert endpoint.fetches == 2


async def test_random_kids_cannot_make_us_hammer_the_jwks(
    verifier: SignatureVerifier, endpoint: JwksEndpoint, clock: FakeClock
) -> None:
    attacker = new_rsa()
    stamp = webhook_timestamp(NOW)
    for _ in range(20):
        headers = sign_raw(attacker, f"kid-{uuid.uuid4().hex}", stamp)
        assert_refused(await verifier.verify(headers, BODY), Refusal.UNKNOWN_KEY)
    assert endpoint.fetches == 1

    clock.advance(INTERVAL_S)
    for _ in range(20):
        headers = sign_raw(attacker, f"kid-{uuid.uuid4().hex}", stamp)
        assert_refused(await verifier.verify(headers, BODY), Refusal.UNKNOWN_KEY)
    assert endpoint.fetches == 2


async def test_concurrent_first_use_shares_one_fetch(
    verifier: SignatureVerifier, signing: SigningKeys, endpoint: JwksEndpoint
) -> None:
    endpoint.gate.clear()
    tasks = [asyncio.create_task(verifier.verify(signed(signing), BODY)) for _ in range(25)]
    # Once the fetch reached the server every task has already queued behind it.
    await endpoint.arrived.wait()
    endpoint.gate.set()
    results = await asyncio.gather(*tasks)

    assert all(result.verified for result in results)
    assert endpoint.fetches == 1


async def test_concurrent_unknown_kids_share_one_fetch(
    verifier: SignatureVerifier, signing: SigningKeys, endpoint: JwksEndpoint, clock: FakeClock
) -> None:
    assert (await verifier.verify(signed(signing), BODY)).verified
    clock.advance(INTERVAL_S)
    endpoint.arrived.clear()
    endpoint.gate.clear()
    attacker = new_rsa()
    stamp = webhook_timestamp(NOW)
    tasks = [
        asyncio.create_task(verifier.verify(sign_raw(attacker, f"kid-{n}", stamp), BODY))
        for n in range(50)
    ]
    await endpoint.arrived.wait()
    endpoint.gate.set()
    results = await asyncio.gather(*tasks)

    assert {result.refusal for result in results} == {Refusal.UNKNOWN_KEY}
    assert endpoint.fetches == 2


async def test_concurrent_deliveries_after_rotation_share_one_fetch(
    verifier: SignatureVerifier, signing: SigningKeys, endpoint: JwksEndpoint, clock: FakeClock
) -> None:
    assert (await verifier.verify(signed(signing), BODY)).verified
    clock.advance(INTERVAL_S)
    signing.rotate()
    endpoint.arrived.clear()
    endpoint.gate.clear()
    tasks = [asyncio.create_task(verifier.verify(signed(signing), BODY)) for _ in range(25)]
    await endpoint.arrived.wait()
    endpoint.gate.set()
    results = await asyncio.gather(*tasks)

    assert all(result.verified for result in results)
    assert endpoint.fetches == 2


# --- timestamps -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "offset",
    [timedelta(minutes=-6), timedelta(minutes=6), timedelta(seconds=-301), timedelta(days=365)],
    ids=["6-min-old", "6-min-ahead", "just-over-5-min-old", "a-year-ahead"],
)
async def test_timestamp_outside_tolerance_is_refused(
    verifier: SignatureVerifier, signing: SigningKeys, endpoint: JwksEndpoint, offset: timedelta
) -> None:
    result = await verifier.verify(signed(signing, at=NOW + offset), BODY)

    assert_refused(result, Refusal.STALE_TIMESTAMP)
    assert result.timestamp == NOW + offset
    assert endpoint.fetches == 0  # refused before any key is looked up


@pytest.mark.parametrize(
    "offset",
    [timedelta(minutes=-4), timedelta(minutes=4), timedelta(minutes=-5), timedelta(minutes=5)],
    ids=["4-min-old", "4-min-ahead", "5-min-old", "5-min-ahead"],
)
async def test_timestamp_within_tolerance_verifies(
    verifier: SignatureVerifier, signing: SigningKeys, offset: timedelta
) -> None:
    result = await verifier.verify(signed(signing, at=NOW + offset), BODY)

    assert result.verified, result.detail


async def test_tolerance_is_configurable(keyset: KeySet, signing: SigningKeys) -> None:
    strict = SignatureVerifier(keyset, tolerance_s=30, now=lambda: NOW)

    late = await strict.verify(signed(signing, at=NOW - timedelta(seconds=31)), BODY)

    assert_refused(late, Refusal.STALE_TIMESTAMP)


@pytest.mark.parametrize(
    ("stamp", "moment"),
    [
        ("2026-11-27T16:04:05.1234567Z", NOW.replace(microsecond=123456)),  # .NET, 7 digits
        ("2026-11-27T16:04:05Z", NOW.replace(microsecond=0)),
        ("2026-11-27T17:04:05.123+01:00", NOW),
        ("2026-11-27T16:04:05.123", NOW),  # no offset: UTC, as documented
        (str(int(NOW.timestamp())), NOW.replace(microsecond=0)),  # unix seconds
        (f"{NOW.timestamp():.3f}", NOW),
    ],
)
async def test_other_timestamp_spellings_verify(
    verifier: SignatureVerifier, signing: SigningKeys, stamp: str, moment: datetime
) -> None:
    headers = signed(signing)
    headers[TIMESTAMP_HEADER] = stamp
    headers[SIGNATURE_HEADER] = signing.sign(BODY, stamp)

    result = await verifier.verify(headers, BODY)

    assert result.verified, result.detail
    assert result.timestamp is not None
    assert abs(result.timestamp - moment) < timedelta(milliseconds=1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-27T16:04:05.123Z", datetime(2026, 11, 27, 16, 4, 5, 123000, tzinfo=UTC)),
        ("2026-11-27t16:04:05.123z", datetime(2026, 11, 27, 16, 4, 5, 123000, tzinfo=UTC)),
        ("2026-11-27T16:04:05.123456789Z", datetime(2026, 11, 27, 16, 4, 5, 123456, tzinfo=UTC)),
        ("2026-11-27T11:04:05-05:00", datetime(2026, 11, 27, 16, 4, 5, tzinfo=UTC)),
        ("0", datetime(1970, 1, 1, tzinfo=UTC)),
        ("yesterday", None),
        ("2026-13-01T00:00:00Z", None),
        ("2026-02-30T00:00:00Z", None),
        ("2026-11-27T24:00:00Z", None),
        ("2026-11-27T16:04:60Z", None),
        ("2026-11-27T16:04:05+24:00", None),
        ("2026-11-27T16:04:05+01:60", None),
        ("2026-11-27 16:04:05Z", None),
        ("2026-11-27T16:04:05.1234567890Z", None),
        ("2026-11-27T16:04:05.Z", None),
        ("2026-11-27", None),
        ("-5", None),
        ("1e9", None),
        ("9" * 12, None),
        ("9" * 40, None),
        ("\uff11" * 10, None),  # full-width digits are digits to Python, not to us
        ("2026-11-27T16:04:05.123Z\n", None),
    ],
)
def test_parse_timestamp(value: str, expected: datetime | None) -> None:
    assert parse_timestamp(value) == expected


# --- missing and malformed headers ------------------------------------------------------


@pytest.mark.parametrize("name", [KEY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER])
async def test_each_missing_header_is_refused(
    verifier: SignatureVerifier, signing: SigningKeys, endpoint: JwksEndpoint, name: str
) -> None:
    headers = signed(signing)
    del headers[name]

    result = await verifier.verify(headers, BODY)

    assert_refused(result, Refusal.MISSING_HEADERS)
    assert name in result.detail
    assert endpoint.fetches == 0


@pytest.mark.parametrize("name", [KEY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER])
async def test_empty_header_counts_as_missing(
    verifier: SignatureVerifier, signing: SigningKeys, name: str
) -> None:
    headers = signed(signing)
    headers[name] = "  "

    assert_refused(await verifier.verify(headers, BODY), Refusal.MISSING_HEADERS)


async def test_no_headers_at_all_is_refused(verifier: SignatureVerifier) -> None:
    result = await verifier.verify({}, BODY)

    assert_refused(result, Refusal.MISSING_HEADERS)
    assert result.kid is None
    assert result.timestamp is None


@pytest.mark.parametrize(
    "signature",
    ["not base64!", "abc", "Y===", "=YWJj", "YW Jj", "YW\nJj", "yWJ§", "-_-_", "===="],
)
async def test_malformed_signature_is_refused(
    verifier: SignatureVerifier, signing: SigningKeys, endpoint: JwksEndpoint, signature: str
) -> None:
    headers = signed(signing)
    headers[SIGNATURE_HEADER] = signature

    result = await verifier.verify(headers, BODY)

    assert_refused(result, Refusal.MALFORMED_HEADERS)
    assert endpoint.fetches == 0


@pytest.mark.parametrize(
    "stamp", ["yesterday", "2026-11-27", "2026-11-27T16:04:05.123Z; x", "NaN", "ä" * 5000]
)
async def test_unreadable_timestamp_is_refused(
    verifier: SignatureVerifier, signing: SigningKeys, endpoint: JwksEndpoint, stamp: str
) -> None:
    headers = signed(signing)
    headers[TIMESTAMP_HEADER] = stamp

    result = await verifier.verify(headers, BODY)

    assert_refused(result, Refusal.MALFORMED_HEADERS)
    assert len(result.detail) < 200  # hostile values are echoed cut short
    assert endpoint.fetches == 0


async def test_repeated_signature_header_is_refused(
    verifier: SignatureVerifier, signing: SigningKeys
) -> None:
    headers = CIMultiDict(signed(signing))
    headers.add(SIGNATURE_HEADER, headers[SIGNATURE_HEADER])

    assert_refused(await verifier.verify(headers, BODY), Refusal.MALFORMED_HEADERS)


async def test_same_header_in_two_cases_is_refused(
    verifier: SignatureVerifier, signing: SigningKeys
) -> None:
    headers = signed(signing)
    headers[KEY_ID_HEADER.upper()] = "another-kid"

    assert_refused(await verifier.verify(headers, BODY), Refusal.MALFORMED_HEADERS)


@pytest.mark.parametrize(
    "spell",
    [str.upper, str.title, lambda name: name.replace("shipengine", "ShipEngine")],
    ids=["upper", "title", "mixed"],
)
async def test_header_names_in_any_case(
    verifier: SignatureVerifier, signing: SigningKeys, spell: Callable[[str], str]
) -> None:
    headers = {spell(name): value for name, value in signed(signing).items()}

    result = await verifier.verify(headers, BODY)

    assert result.verified, result.detail


async def test_multidict_headers_with_other_headers(
    verifier: SignatureVerifier, signing: SigningKeys
) -> None:
    headers: CIMultiDict[str] = CIMultiDict(
        {"Content-Type": "application/json", "User-Agent": "ShipEngine/v1"}
    )
    headers.add("Accept", "*/*")
    headers.add("Accept", "application/json")  # repeats of other headers do not matter
    for name, value in signed(signing).items():
        headers[name.title()] = value

    result = await verifier.verify(headers, BODY)

    assert result.verified, result.detail


@pytest.mark.parametrize(
    "kid", ["x" * 100_000, "kid\x00with\nnewline", "ключ", "../../etc/passwd"], ids=repr
)
async def test_hostile_kid_is_an_unknown_key(
    verifier: SignatureVerifier, signing: SigningKeys, kid: str
) -> None:
    headers = signed(signing)
    headers[KEY_ID_HEADER] = kid

    result = await verifier.verify(headers, BODY)

    assert_refused(result, Refusal.UNKNOWN_KEY)
    assert len(result.detail) < 200


# --- what the JWKS holds ----------------------------------------------------------------


async def test_ec_key_in_the_jwks_is_skipped(
    verifier: SignatureVerifier, signing: SigningKeys
) -> None:
    (ec_key,) = [key for key in signing.jwks()["keys"] if key["kty"] == "EC"]
    headers = signed(signing)
    headers[KEY_ID_HEADER] = ec_key["kid"]

    assert_refused(await verifier.verify(headers, BODY), Refusal.UNKNOWN_KEY)


async def test_rsa_key_for_encryption_is_skipped(
    verifier: SignatureVerifier, endpoint: JwksEndpoint
) -> None:
    private = new_rsa()
    endpoint.extra_keys.append(rsa_jwk(private, "enc-key", use="enc"))

    result = await verifier.verify(sign_raw(private, "enc-key", webhook_timestamp(NOW)), BODY)

    assert_refused(result, Refusal.UNKNOWN_KEY)


async def test_rsa_key_without_use_is_accepted(
    verifier: SignatureVerifier, endpoint: JwksEndpoint
) -> None:
    private = new_rsa()
    endpoint.extra_keys.append(rsa_jwk(private, "plain-key"))

    result = await verifier.verify(sign_raw(private, "plain-key", webhook_timestamp(NOW)), BODY)

    assert result.verified, result.detail


async def test_broken_and_weak_entries_are_skipped_and_the_rest_kept(
    verifier: SignatureVerifier, signing: SigningKeys, endpoint: JwksEndpoint
) -> None:
    weak = new_rsa(1024)
    endpoint.extra_keys.extend(
        [
            "not a key",
            {"kty": "RSA"},
            {"kty": "RSA", "kid": "bad-n", "n": "!!!", "e": "AQAB"},
            {"kty": "RSA", "kid": "empty-n", "n": "", "e": "AQAB"},
            {"kty": "RSA", "kid": 7, "n": "AQAB", "e": "AQAB"},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            rsa_jwk(weak, "weak-key"),
        ]
    )

    assert (await verifier.verify(signed(signing), BODY)).verified
    weak_headers = sign_raw(weak, "weak-key", webhook_timestamp(NOW))
    assert_refused(await verifier.verify(weak_headers, BODY), Refusal.UNKNOWN_KEY)


# --- when the JWKS cannot be had ----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (503, None),
        (404, None),
        (200, b"<html>maintenance</html>"),
        (200, b'{"keys": "none"}'),
        (200, b"[]"),
        (200, b'{"keys": []}'),
        (200, b'{"keys": [{"kty": "EC", "kid": "only-ec"}]}'),
    ],
    ids=["503", "404", "not-json", "keys-not-a-list", "not-an-object", "empty", "no-rsa"],
)
async def test_jwks_unusable_at_first_use_means_keys_unavailable(
    verifier: SignatureVerifier,
    signing: SigningKeys,
    endpoint: JwksEndpoint,
    status: int,
    body: bytes | None,
) -> None:
    endpoint.status, endpoint.body = status, body

    result = await verifier.verify(signed(signing), BODY)

    assert_refused(result, Refusal.KEYS_UNAVAILABLE)
    assert endpoint.fetches == 1


async def test_failed_fetch_is_not_retried_within_the_interval(
    verifier: SignatureVerifier, signing: SigningKeys, endpoint: JwksEndpoint, clock: FakeClock
) -> None:
    endpoint.status = 503
    for _ in range(5):
        assert_refused(await verifier.verify(signed(signing), BODY), Refusal.KEYS_UNAVAILABLE)
    assert endpoint.fetches == 1

    endpoint.status = 200
    clock.advance(INTERVAL_S)
    result = await verifier.verify(signed(signing), BODY)

    assert result.verified, result.detail
    assert endpoint.fetches == 2


async def test_jwks_unreachable_means_keys_unavailable(
    session: aiohttp.ClientSession, signing: SigningKeys, clock: FakeClock
) -> None:
    server = TestServer(web.Application())
    await server.start_server()
    closed_url = str(server.make_url("/jwks"))
    await server.close()
    verifier = SignatureVerifier(KeySet(session, closed_url, clock=clock), now=lambda: NOW)

    assert_refused(await verifier.verify(signed(signing), BODY), Refusal.KEYS_UNAVAILABLE)


async def test_jwks_that_hangs_times_out_as_keys_unavailable(
    endpoint: JwksEndpoint, session: aiohttp.ClientSession, signing: SigningKeys
) -> None:
    endpoint.gate.clear()  # the handler never answers
    keys = KeySet(session, endpoint.url, timeout_s=0.2)
    verifier = SignatureVerifier(keys, now=lambda: NOW)

    assert_refused(await verifier.verify(signed(signing), BODY), Refusal.KEYS_UNAVAILABLE)


async def test_cached_key_still_verifies_when_the_jwks_is_down(
    verifier: SignatureVerifier, signing: SigningKeys, endpoint: JwksEndpoint, clock: FakeClock
) -> None:
    assert (await verifier.verify(signed(signing), BODY)).verified
    endpoint.status = 503
    clock.advance(INTERVAL_S * 10)

    result = await verifier.verify(signed(signing), BODY)

    assert result.verified, result.detail
    assert endpoint.fetches == 1


async def test_failed_refresh_keeps_the_old_keys(
    verifier: SignatureVerifier, signing: SigningKeys, endpoint: JwksEndpoint, clock: FakeClock
) -> None:
    old_headers = signed(signing)
    assert (await verifier.verify(old_headers, BODY)).verified
    endpoint.status = 503
    clock.advance(INTERVAL_S)
    signing.rotate()

    # The new kid is genuine but unknowable right now: our outage, so ShipEngine must retry.
    assert_refused(await verifier.verify(signed(signing), BODY), Refusal.KEYS_UNAVAILABLE)
    assert (await verifier.verify(old_headers, BODY)).verified
    assert endpoint.fetches == 2

    endpoint.status = 200
    clock.advance(INTERVAL_S)
    assert (await verifier.verify(signed(signing), BODY)).verified


async def test_key_set_raises_keys_unavailable_only_without_a_match(
    keyset: KeySet, signing: SigningKeys, endpoint: JwksEndpoint, clock: FakeClock
) -> None:
    assert await keyset.key(signing.kid) is not None
    assert await keyset.key("nobody") is None
    endpoint.status = 500
    clock.advance(INTERVAL_S)

    with pytest.raises(KeysUnavailable):
        await keyset.key("nobody")
    assert await keyset.key(signing.kid) is not None


# --- the shared secret --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("presented", "expected", "matches"),
    [
        ("s3cret-value", "s3cret-value", True),
        ("s3cret-valuE", "s3cret-value", False),
        ("s3cret", "s3cret-value", False),
        ("s3cret-value-and-more", "s3cret-value", False),
        ("", "s3cret-value", False),
        (None, "s3cret-value", False),
        ("", "", False),  # an unset secret lets nothing through
        (None, "", False),
        ("ключ-🔑", "ключ-🔑", True),
        ("ключ-🔑", "ключ-🗝", False),
    ],
)
def test_secret_matches(presented: str | None, expected: str, matches: bool) -> None:
    assert secret_matches(presented, expected) is matches
