"""Verifying ShipEngine's signature on a `track` webhook, and our own shared-secret check.

ShipEngine signs `timestamp header + "." + raw body` with RSASSA-PKCS1-v1_5 / SHA-256 and names
the key in a header; the public keys are a JWKS we fetch, cache and fetch again when a new
`kid` appears (key rotation). Every refusal is a value, never an exception, so a handler can
map it to a status: `KEYS_UNAVAILABLE` is our outage (answer 503 so ShipEngine retries), the
others are the sender's fault.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import hmac
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import aiohttp
import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

log = structlog.get_logger(__name__)

KEY_ID_HEADER = "x-shipengine-rsa-sha256-key-id"
SIGNATURE_HEADER = "x-shipengine-rsa-sha256-signature"
TIMESTAMP_HEADER = "x-shipengine-timestamp"
SIGNATURE_HEADERS = (KEY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER)

# A JWKS is a few kilobytes; a cap keeps a misbehaving endpoint from filling our memory.
_MAX_JWKS_BYTES = 1024 * 1024
# Weaker keys prove little; ShipEngine's are 2048-bit.
_MIN_RSA_BITS = 2048
# Hostile header values end up in `detail`, and from there in logs: keep them short.
_MAX_ECHO_CHARS = 64

# ISO 8601 / RFC 3339 as ShipEngine sends it (`2026-11-27T16:04:05.123Z`), plus the 7-digit
# fraction .NET writes. Fractions beyond microseconds are truncated.
_ISO_TIMESTAMP = re.compile(
    r"(?P<year>[0-9]{4})-(?P<month>[0-9]{2})-(?P<day>[0-9]{2})"
    r"T(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})"
    r"(?:\.(?P<fraction>[0-9]{1,9}))?"
    r"(?P<offset>Z|[+-][0-9]{2}:[0-9]{2})?",
    re.IGNORECASE,
)
# Unix seconds, accepted defensively; 12 digits reach beyond the year 9999 already.
_UNIX_TIMESTAMP = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")


class Refusal(enum.StrEnum):
    MISSING_HEADERS = "missing_headers"
    MALFORMED_HEADERS = "malformed_headers"
    STALE_TIMESTAMP = "stale_timestamp"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    KEYS_UNAVAILABLE = "keys_unavailable"


@dataclass(frozen=True)
class Verification:
    """The outcome of one check: `refusal` is None when the signature holds."""

    refusal: Refusal | None
    kid: str | None
    timestamp: datetime | None
    detail: str

    @property
    def verified(self) -> bool:
        return self.refusal is None


class KeysUnavailable(Exception):
    """The JWKS could not be fetched and no cached key has the `kid` asked for."""


class KeySet:
    """ShipEngine's RSA signing keys by `kid`, fetched from the JWKS URL and cached.

    An unknown `kid` triggers a fetch (ShipEngine rotated its key), but at most one per
    `refresh_interval_s` whoever asks, so random `kid`s cannot make us hammer ShipEngine; and
    concurrent callers wait for the same fetch instead of each starting one.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        *,
        refresh_interval_s: float = 60.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._url = url
        self._refresh_interval_s = refresh_interval_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._clock = clock
        self._keys: dict[str, rsa.RSAPublicKey] = {}
        self._attempted_at: float | None = None
        # Whether the latest fetch gave us the current set. While it is False an unknown `kid`
        # may well be genuine, so it is our outage, not the sender's fault.
        self._current = False
        self._lock = asyncio.Lock()

    async def key(self, kid: str) -> rsa.RSAPublicKey | None:
        """The key named `kid`, or None if ShipEngine does not publish it.

        Raises KeysUnavailable when the key is not cached and the latest fetch failed.
        """
        if (cached := self._keys.get(kid)) is not None:
            return cached
        async with self._lock:
            # Whoever held the lock before us may have just fetched this very key.
            if (cached := self._keys.get(kid)) is None and self._refresh_due():
                await self._refresh()
                cached = self._keys.get(kid)
        if cached is None and not self._current:
            raise KeysUnavailable(f"no key {_echo(kid)} cached and {self._url} unreachable")
        return cached

    def _refresh_due(self) -> bool:
        if self._attempted_at is None:
            return True
        return self._clock() - self._attempted_at >= self._refresh_interval_s

    async def _refresh(self) -> None:
        # Counted from the start, and as failed until it succeeds: a fetch that hangs or is
        # cancelled still spends this interval's budget.
        self._attempted_at = self._clock()
        self._current = False
        try:
            keys = await self._fetch()
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            # The old keys stay: the deliveries they signed still verify during the outage.
            log.warning(
                "webhook_keys.fetch_failed",
                url=self._url,
                error=f"{type(error).__name__}: {error}",
                cached_kids=sorted(self._keys),
            )
            return
        # Replaced, not merged: a key ShipEngine no longer publishes is no longer trusted.
        self._keys = keys
        self._current = True
        log.info("webhook_keys.fetched", url=self._url, kids=sorted(keys))

    async def _fetch(self) -> dict[str, rsa.RSAPublicKey]:
        async with self._session.get(
            self._url, timeout=self._timeout, headers={"Accept": "application/json"}
        ) as response:
            response.raise_for_status()
            raw = await response.content.read(_MAX_JWKS_BYTES + 1)
        if len(raw) > _MAX_JWKS_BYTES:
            raise ValueError(f"JWKS larger than {_MAX_JWKS_BYTES} bytes")
        document = json.loads(raw)
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ValueError("JWKS without a `keys` list")
        keys = dict(filter(None, map(_rsa_signing_key, entries)))
        if not keys:
            # ShipEngine always publishes the key it signs with: an empty set is far more
            # likely a fault on their side than every key revoked, so keep what we have.
            raise ValueError("JWKS holds no usable RSA signing key")
        return keys


def _rsa_signing_key(jwk: object) -> tuple[str, rsa.RSAPublicKey] | None:
    """`(kid, key)` for an RSA signature key; None for any other key (EC, `use: enc`, broken)."""
    if not isinstance(jwk, dict) or jwk.get("kty") != "RSA":
        return None
    if "use" in jwk and jwk["use"] != "sig":
        return None
    kid, n, e = jwk.get("kid"), jwk.get("n"), jwk.get("e")
    if not (isinstance(kid, str) and kid and isinstance(n, str) and isinstance(e, str)):
        return None
    try:
        numbers = rsa.RSAPublicNumbers(e=_b64url_uint(e), n=_b64url_uint(n))
        key = numbers.public_key()
    except ValueError:
        return None
    if key.key_size < _MIN_RSA_BITS:
        return None
    return kid, key


def _b64url_uint(value: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except binascii.Error as error:
        raise ValueError(str(error)) from error
    if not raw:
        raise ValueError("empty integer")
    return int.from_bytes(raw, "big")


class SignatureVerifier:
    """Checks a delivery's signature headers against its raw body."""

    def __init__(
        self,
        keys: KeySet,
        *,
        tolerance_s: float = 300,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._keys = keys
        self._tolerance = timedelta(seconds=tolerance_s)
        self._now = now

    async def verify(self, headers: Mapping[str, str], body: bytes) -> Verification:
        """Verify `body` exactly as received; the checks run in order, first failure wins."""
        found = _signature_headers(headers)
        kids = found.get(KEY_ID_HEADER, [])
        kid = kids[0] if len(kids) == 1 else None
        missing = [name for name in SIGNATURE_HEADERS if name not in found]
        if missing:
            return _refuse(Refusal.MISSING_HEADERS, kid, None, f"missing {', '.join(missing)}")
        if repeated := [name for name, values in found.items() if len(values) > 1]:
            # Which copy was signed is not ours to guess; ShipEngine sends each once.
            return _refuse(Refusal.MALFORMED_HEADERS, kid, None, f"repeated {', '.join(repeated)}")
        kid, encoded, stamp = (found[name][0] for name in SIGNATURE_HEADERS)

        timestamp = parse_timestamp(stamp)
        if timestamp is None:
            detail = f"unreadable timestamp {_echo(stamp)}"
            return _refuse(Refusal.MALFORMED_HEADERS, kid, None, detail)
        signature = _b64decode(encoded)
        if signature is None:
            return _refuse(Refusal.MALFORMED_HEADERS, kid, timestamp, "signature is not base64")

        # Either way: a timestamp far ahead is as suspect as one far behind.
        age = self._now() - timestamp
        if abs(age) > self._tolerance:
            seconds = age.total_seconds()
            detail = f"timestamp {abs(seconds):.0f}s {'old' if seconds > 0 else 'ahead'}"
            return _refuse(Refusal.STALE_TIMESTAMP, kid, timestamp, detail)

        try:
            key = await self._keys.key(kid)
        except KeysUnavailable as error:
            return _refuse(Refusal.KEYS_UNAVAILABLE, kid, timestamp, str(error))
        if key is None:
            return _refuse(Refusal.UNKNOWN_KEY, kid, timestamp, f"no key {_echo(kid)}")

        # The timestamp exactly as sent is part of what was signed: re-rendering it would
        # break valid signatures, and verifying it is what stops a replay with a new time.
        signed = stamp.encode() + b"." + body
        try:
            key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return _refuse(Refusal.BAD_SIGNATURE, kid, timestamp, "signature does not match")
        return Verification(refusal=None, kid=kid, timestamp=timestamp, detail="verified")


def _signature_headers(headers: Mapping[str, str]) -> dict[str, list[str]]:
    """The values of the three signature headers by lower-case name, from any mapping.

    A CIMultiDict can hold a name twice, and a dict can hold two spellings of it: both show
    up as two values. Empty values count as absent.
    """
    found: dict[str, list[str]] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in SIGNATURE_HEADERS and isinstance(value, str) and value.strip():
            found.setdefault(lowered, []).append(value.strip())
    return found


def parse_timestamp(value: str) -> datetime | None:
    """The aware UTC moment in `x-shipengine-timestamp`, or None if it is unreadable.

    ISO 8601 with up to 9 fractional digits; no offset means UTC (ShipEngine documents UTC,
    and the tolerance bounds the harm of a wrong guess). Unix seconds are accepted too.
    """
    if match := _ISO_TIMESTAMP.fullmatch(value):
        return _from_iso(match)
    if _UNIX_TIMESTAMP.fullmatch(value):
        try:
            return datetime.fromtimestamp(float(value), UTC)
        except (ValueError, OverflowError, OSError):
            return None
    return None


def _from_iso(match: re.Match[str]) -> datetime | None:
    fraction = (match["fraction"] or "").ljust(6, "0")[:6]
    offset = (match["offset"] or "Z").upper()
    try:
        zone = UTC if offset == "Z" else _zone(offset)
        moment = datetime(
            int(match["year"]),
            int(match["month"]),
            int(match["day"]),
            int(match["hour"]),
            int(match["minute"]),
            int(match["second"]),
            int(fraction),
            tzinfo=zone,
        )
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def _zone(offset: str) -> timezone:
    sign = -1 if offset[0] == "-" else 1
    hours, minutes = int(offset[1:3]), int(offset[4:6])
    if minutes >= 60:
        raise ValueError(f"bad offset {offset}")
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def _b64decode(value: str) -> bytes | None:
    """Standard base64 as ShipEngine sends it, strictly: stray characters mean tampering."""
    try:
        decoded = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None
    return decoded or None


def _refuse(
    refusal: Refusal, kid: str | None, timestamp: datetime | None, detail: str
) -> Verification:
    return Verification(refusal=refusal, kid=kid, timestamp=timestamp, detail=detail)


def _echo(value: str) -> str:
    """A hostile value, quoted and cut short, fit for a log line."""
    return repr(value if len(value) <= _MAX_ECHO_CHARS else value[:_MAX_ECHO_CHARS] + "...")


def secret_matches(presented: str | None, expected: str) -> bool:
    """Whether the shared secret in our custom header is the one we registered.

    Constant time, so the comparison leaks nothing of the secret. An empty `expected` never
    matches: an unset secret must not let every request through. Header bytes that are not
    UTF-8 reach us as lone surrogates, which plain `.encode()` refuses; "surrogatepass" encodes
    any string, and equal strings alike.
    """
    if presented is None or not expected:
        return False
    return hmac.compare_digest(
        presented.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )
