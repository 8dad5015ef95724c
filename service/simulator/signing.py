"""Webhook signing as ShipEngine does it, and the JWKS that publishes the public keys.

ShipEngine signs `timestamp + "." + raw body` with RSASSA-PKCS1-v1_5 / SHA-256 and names the
key by `kid`; receivers fetch the keys from `/jwks`. The set also holds an EC key here,
because the real one may hold non-RSA keys and receivers must skip them.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

KEY_ID_HEADER = "x-shipengine-rsa-sha256-key-id"
SIGNATURE_HEADER = "x-shipengine-rsa-sha256-signature"
TIMESTAMP_HEADER = "x-shipengine-timestamp"


def _new_kid() -> str:
    return f"se-sim-{uuid.uuid4().hex[:16]}"


def _b64url_uint(value: int) -> str:
    length = max(1, (value.bit_length() + 7) // 8)
    raw = value.to_bytes(length, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64url_fixed(value: int, length: int) -> str:
    # EC coordinates keep their full width (RFC 7518 6.2.1.2), leading zeros included.
    raw = value.to_bytes(length, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def webhook_timestamp(now: datetime | None = None) -> str:
    """ISO 8601 UTC with milliseconds and `Z`, as in `2026-11-27T16:04:05.123Z`."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class SigningKeys:
    """The current RSA signing key, and a decoy EC key that is only ever published."""

    def __init__(self) -> None:
        self._rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._kid = _new_kid()
        self._ec = ec.generate_private_key(ec.SECP256R1())
        self._ec_kid = _new_kid()

    @property
    def kid(self) -> str:
        return self._kid

    def rotate(self) -> str:
        """Switch to a new RSA key; the old one leaves the JWKS at once. Returns the new kid."""
        self._rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._kid = _new_kid()
        return self._kid

    def sign(self, body: bytes, timestamp: str) -> str:
        signed = timestamp.encode() + b"." + body
        signature = self._rsa.sign(signed, padding.PKCS1v15(), hashes.SHA256())
        return base64.b64encode(signature).decode("ascii")

    def headers(self, body: bytes, now: datetime | None = None) -> dict[str, str]:
        """The three signature headers for `body`, timestamped now."""
        timestamp = webhook_timestamp(now)
        return {
            KEY_ID_HEADER: self._kid,
            SIGNATURE_HEADER: self.sign(body, timestamp),
            TIMESTAMP_HEADER: timestamp,
        }

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self._rsa_jwk(), self._ec_jwk()]}

    def _rsa_jwk(self) -> dict[str, Any]:
        numbers = self._rsa.public_key().public_numbers()
        return {
            "kty": "RSA",
            "kid": self._kid,
            "use": "sig",
            "alg": "RS256",
            "n": _b64url_uint(numbers.n),
            "e": _b64url_uint(numbers.e),
        }

    def _ec_jwk(self) -> dict[str, Any]:
        numbers = self._ec.public_key().public_numbers()
        return {
            "kty": "EC",
            "kid": self._ec_kid,
            "use": "sig",
            "alg": "ES256",
            "crv": "P-256",
            "x": _b64url_fixed(numbers.x, 32),
            "y": _b64url_fixed(numbers.y, 32),
        }
