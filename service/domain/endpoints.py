"""Notification endpoints: where a consumer wants its changes pushed, and the secret it checks
them with (the sending itself is not built yet).

What is here has no I/O, so the API (when an endpoint is registered or changed) and the sender
(at send time: DNS can change) apply the same rules: `parse_url` to the URL, then
`refused_address` to every address its host resolves to.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import ipaddress
import secrets
import socket
from collections.abc import Iterable
from datetime import timedelta
from urllib.parse import urlsplit

# Standard Webhooks' form of a signing secret: the prefix, then base64 of 24 to 64 random bytes.
SECRET_PREFIX = "whsec_"  # noqa: S105 - the marker that starts every secret, not a secret
SECRET_BYTES = 32
# After a rotation the previous secret stays in force this long: every notification carries a
# signature under each, so a consumer can switch to the new one at its own pace.
PREVIOUS_SECRET_LIFETIME = timedelta(hours=24)
URL_MAX_CHARS = 2048
DESCRIPTION_MAX_CHARS = 512
RATE_LIMIT_MAX_PER_S = 10_000.0
# One send in 100 seconds at the slowest: a slower pace is a consumer that should be disabled.
RATE_LIMIT_MIN_PER_S = 0.01
DEFAULT_PORTS = {"http": 80, "https": 443}

# Link-local addresses, where clouds serve instance metadata (credentials among it): no
# notification may be sent there, whatever the URL's host looks like. AWS also serves it on
# fd00:ec2::254, which is not link-local.
FORBIDDEN_NETWORKS = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class EndpointState(enum.StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"  # by the sender, after its last retry or a 410; `enable` resumes


class UrlRefused(ValueError):
    """The URL may not be an endpoint's; the message says why, for the caller."""


@dataclasses.dataclass(frozen=True)
class EndpointUrl:
    url: str
    host: str  # lowercased, without brackets or a trailing dot
    port: int


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def parse_url(raw: str, allowed_hosts: Iterable[str] = ()) -> EndpointUrl:
    """The URL, if an endpoint may have it: http(s), a host, no user or password, not an IP
    literal that `refused_address` refuses and, when `allowed_hosts` is not empty, one of them.
    Whether its host resolves to a refused address is for the caller to check (I/O)."""
    if len(raw) > URL_MAX_CHARS:
        raise UrlRefused(f"must be at most {URL_MAX_CHARS} characters")
    if not raw.isascii() or any(character.isspace() or ord(character) < 32 for character in raw):
        # A non-ASCII host would be sent as its IDNA form: register that form instead.
        raise UrlRefused("must be ASCII without spaces or control characters (IDNA form)")
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as error:
        raise UrlRefused(f"is not a valid URL: {error}") from None
    if parts.scheme not in ("http", "https"):
        raise UrlRefused("must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise UrlRefused("must not carry a user name or password")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UrlRefused("must name a host")
    if reason := refused_address(host):
        raise UrlRefused(f"must not point at {reason}")
    allowed = {name.lower().rstrip(".") for name in allowed_hosts}
    if allowed and host not in allowed:
        raise UrlRefused(f"host {host} is not one of NOTIFY_ALLOWED_HOSTS")
    if port == 0:
        raise UrlRefused("port 0 is not a port one can send to")
    return EndpointUrl(raw, host, port if port is not None else DEFAULT_PORTS[parts.scheme])


def refused_address(host: str) -> str | None:
    """Why notifications may not go to `host` when it is an IP address (also in the legacy
    forms `inet_aton` takes, such as `2852039166`); None when they may, or it is a name."""
    address = ip_literal(host)
    if address is None:
        return None
    if any(candidate in network for candidate in _forms(address) for network in FORBIDDEN_NETWORKS):
        return f"a link-local or cloud metadata address ({address})"
    return None


def _forms(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The address, and the IPv4 address an IPv6 one carries and reaches where a network
    translates it: IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d), 6to4
    (2002:aabb:ccdd::) and NAT64's well-known prefix (64:ff9b::a.b.c.d)."""
    if isinstance(address, ipaddress.IPv4Address):
        return [address]
    forms: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if address.ipv4_mapped is not None:
        forms.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        forms.append(address.sixtofour)
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if int(address) >> 32 == 0 or address in NAT64:
        forms.append(low32)
    return forms


def ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])  # without an IPv6 zone
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))  # parses, resolves nothing
    except OSError:
        return None
