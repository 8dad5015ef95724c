"""Who may call the API: named clients holding tokens with scopes.

A token is `tt_<id>_<secret>`: the id finds the row, the secret is only ever stored as its
SHA-256 (it is 256 random bits, so a fast hash is enough: nothing to brute-force) and compared
in constant time.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable

TOKEN_PREFIX = "tt"  # noqa: S105 - the marker that starts every token, not a secret
MAX_AUTHORIZATION_CHARS = 256
# What issue_token makes: hex ids, url-safe base64 secrets (ASCII, so hashing cannot fail).
_TOKEN_ID = re.compile(r"[0-9a-f]{1,32}", re.ASCII)
_SECRET = re.compile(r"[A-Za-z0-9_-]{1,128}", re.ASCII)


class Scope(enum.StrEnum):
    READ = "subscriptions:read"  # dashboards
    WRITE = "subscriptions:write"  # internal callers
    OPS = "ops"  # retry, replay, pause
    METRICS = "metrics"  # Prometheus' scrapes of /metrics, and nothing else


@dataclasses.dataclass(frozen=True)
class IssuedToken:
    token_id: str
    secret_sha256: bytes = dataclasses.field(repr=False)
    plaintext: str = dataclasses.field(repr=False)  # shown once, never stored

    def __repr__(self) -> str:
        return f"IssuedToken(token_id={self.token_id!r}, plaintext='***')"


@dataclasses.dataclass(frozen=True)
class PresentedToken:
    token_id: str
    secret: str = dataclasses.field(repr=False)

    def __repr__(self) -> str:
        return f"PresentedToken(token_id={self.token_id!r}, secret='***')"

    def matches(self, secret_sha256: bytes) -> bool:
        return hmac.compare_digest(_digest(self.secret), secret_sha256)


def known_scopes(values: Iterable[str]) -> frozenset[Scope]:
    """The scopes among `values` that this service knows (a newer one's are ignored)."""
    known = {scope.value for scope in Scope}
    return frozenset(Scope(value) for value in values if value in known)


def issue_token() -> IssuedToken:
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return IssuedToken(token_id, _digest(secret), f"{TOKEN_PREFIX}_{token_id}_{secret}")


def read_token(authorization: str | None) -> PresentedToken | None:
    """The token of an `Authorization: Bearer ...` header, if it has a token's shape: anything
    else (other characters, bytes that were not UTF-8, an absurd length) is no token at all."""
    if not authorization or len(authorization) > MAX_AUTHORIZATION_CHARS:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    prefix, _, rest = value.strip().partition("_")
    token_id, _, secret = rest.partition("_")
    if prefix != TOKEN_PREFIX or not _TOKEN_ID.fullmatch(token_id) or not _SECRET.fullmatch(secret):
        return None
    return PresentedToken(token_id, secret)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()
