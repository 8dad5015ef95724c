"""Settings: read once, at start, from environment variables; frozen afterwards.

Every setting is documented here and in the README. Names carry their unit (`_s`, `_bytes`).
A missing or malformed value raises `SettingsError` naming the variable, which the entry
point prints as one line before exiting.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from service.domain.subscriptions import Budget
from service.domain.tracking import RearmPolicy

SHIPENGINE_PRODUCTION_URL = "https://api.shipengine.com"

T = TypeVar("T")


class SettingsError(Exception):
    """A setting is missing or malformed; the message names the variable."""


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class Settings:
    database_url: str
    """DATABASE_URL: `postgresql://user:pass@host:port/db` of the service's database."""
    host: str = "0.0.0.0"  # noqa: S104 - a service in a container listens on every interface
    """HOST: address the HTTP API listens on."""
    port: int = 8080
    """PORT: port the HTTP API listens on."""
    api_workers: int = 1
    """API_WORKERS: API processes sharing the port (SO_REUSEPORT); one per core to use them all."""
    shipengine_api_key: str | None = None
    """SHIPENGINE_API_KEY: ShipEngine API key; the dispatcher needs it, the API does not."""
    shipengine_base_url: str = SHIPENGINE_PRODUCTION_URL
    """SHIPENGINE_BASE_URL: ShipEngine's base URL (the simulator's, locally)."""
    shipengine_jwks_url: str = ""
    """SHIPENGINE_JWKS_URL: where ShipEngine's webhook signing keys are; `<base>/jwks`."""
    shipengine_timeout_s: float = 10.0
    """SHIPENGINE_TIMEOUT_S: total time allowed for one ShipEngine call."""
    shipengine_rate_limit_per_minute: int = 200
    """SHIPENGINE_RATE_LIMIT_PER_MINUTE: calls a minute for the account, all instances together
    (0: no limit)."""
    log_level: str = "INFO"
    """LOG_LEVEL: DEBUG, INFO, WARNING or ERROR."""
    database_pool_size: int = 10
    """DATABASE_POOL_SIZE: connections each process keeps to PostgreSQL."""
    database_pool_timeout_s: float = 3.0
    """DATABASE_POOL_TIMEOUT_S: how long a request waits for a free connection before it is
    answered 503 with Retry-After."""
    database_command_timeout_s: float = 15.0
    """DATABASE_COMMAND_TIMEOUT_S: longest a statement (or a connection attempt, 5 s at most)
    may take before the request is answered 503: a database gone silent is not waited for."""
    database_read_url: str | None = None
    """DATABASE_READ_URL: a replica for dashboard reads (lists, ops views); unset: the primary."""
    database_statement_cache: bool = True
    """DATABASE_STATEMENT_CACHE: false behind PgBouncer in transaction mode."""
    dispatch_concurrency: int = 32
    """DISPATCH_CONCURRENCY: ShipEngine calls one dispatcher keeps in flight at most."""
    dispatch_lease_s: float = 60.0
    """DISPATCH_LEASE_S: how long a claim lasts; a dead dispatcher's claims expire after it."""
    dispatch_poll_interval_s: float = 5.0
    """DISPATCH_POLL_INTERVAL_S: longest sleep between looks for due work (NOTIFY wakes sooner)."""
    dispatch_retry_base_s: float = 5.0
    """DISPATCH_RETRY_BASE_S: first retry delay; doubles each attempt, with full jitter."""
    dispatch_retry_max_s: float = 600.0
    """DISPATCH_RETRY_MAX_S: the cap of the retry delay."""
    dispatch_max_attempts: int = 20
    """DISPATCH_MAX_ATTEMPTS: failed calls before a subscription is given up (`failed`)."""
    dispatch_account_probe_s: float = 60.0
    """DISPATCH_ACCOUNT_PROBE_S: while our account is refused, one probe call this often."""
    dispatch_shutdown_grace_s: float = 10.0
    """DISPATCH_SHUTDOWN_GRACE_S: on SIGTERM, how long in-flight calls may take to finish."""
    dispatcher_status_port: int = 0
    """DISPATCHER_STATUS_PORT: where a dispatcher process serves /healthz, /readyz and /metrics
    (0: nowhere)."""
    webhook_max_bytes: int = 1024 * 1024
    """WEBHOOK_MAX_BYTES: largest webhook body accepted; larger ones get 413."""
    webhook_verify: bool = True
    """WEBHOOK_VERIFY: check ShipEngine's signature on every delivery; `false` only locally."""
    webhook_keys_refresh_s: float = 60.0
    """WEBHOOK_KEYS_REFRESH_S: an unknown key id fetches ShipEngine's keys again, at most this
    often, whatever senders send."""
    webhook_timestamp_tolerance_s: float = 300.0
    """WEBHOOK_TIMESTAMP_TOLERANCE_S: a signature timestamp further from now is a replay."""
    webhook_secret_header: str | None = None
    """WEBHOOK_SECRET_HEADER: a custom header ShipEngine sends (set at registration) ..."""
    webhook_secret: str | None = None
    """WEBHOOK_SECRET: ... and the value it must carry, compared in constant time."""
    webhook_refusal_sample_per_minute: int = 60
    """WEBHOOK_REFUSAL_SAMPLE_PER_MINUTE: refused deliveries each API process stores a minute
    at most (a sample, 4 KiB each); the rest, and requests without signature headers, are only
    counted (0: count them all, store none)."""
    reconcile_interval_s: float = 60.0
    """RECONCILE_INTERVAL_S: how often the reconciler looks for silent packages."""
    reconcile_batch: int = 50
    """RECONCILE_BATCH: packages polled at most per round."""
    tracking_done_after_s: float = 3 * 24 * 3600.0
    """TRACKING_DONE_AFTER_S: after DE/SP plus this long, a subscription is done: no polls."""
    tracking_ex_rearm_max: int = 3
    """TRACKING_EX_REARM_MAX: times tracking is restarted after an EX (ShipEngine stops on EX)."""
    tracking_ex_rearm_delay_s: float = 900.0
    """TRACKING_EX_REARM_DELAY_S: how long after an EX tracking is restarted."""
    delivery_retention_days: int = 35
    """DELIVERY_RETENTION_DAYS: raw webhook deliveries are dropped, a week at a time, after."""
    event_retention_days: int = 400
    """EVENT_RETENTION_DAYS: tracking history is dropped, a month of subscriptions at a time,
    this long after its subscription was created."""
    dashboard_cookie_secure: bool = True
    """DASHBOARD_COOKIE_SECURE: the dashboard's session cookie is `Secure` (sent over HTTPS
    only); `false` only for plain HTTP, as under `make run`."""
    dashboard_origin: str | None = None
    """DASHBOARD_ORIGIN: the dashboard's public origin (`https://host[:port]`), when a proxy in
    front rewrites the Host header; login posts from it are same-site."""

    def __post_init__(self) -> None:
        if not self.shipengine_jwks_url:
            jwks = self.shipengine_base_url.rstrip("/") + "/jwks"
            object.__setattr__(self, "shipengine_jwks_url", jwks)
        if not self.webhook_verify and self.shipengine_base_url == SHIPENGINE_PRODUCTION_URL:
            raise SettingsError(
                "WEBHOOK_VERIFY: may be false only with a local SHIPENGINE_BASE_URL "
                "(the simulator), never with ShipEngine's own"
            )
        if bool(self.webhook_secret_header) != bool(self.webhook_secret):
            raise SettingsError(
                "WEBHOOK_SECRET_HEADER: set together with WEBHOOK_SECRET, or neither"
            )
        if self.delivery_retention_days > self.event_retention_days:
            # A delivery is the evidence for events: kept no longer than what it explains.
            raise SettingsError(
                "DELIVERY_RETENTION_DAYS: must not be longer than EVENT_RETENTION_DAYS "
                f"({self.delivery_retention_days} > {self.event_retention_days})"
            )
        if self.dispatch_lease_s <= self.shipengine_timeout_s:
            # A claim must outlive its call, or a second dispatcher could call while the first
            # is still waiting for ShipEngine's answer.
            raise SettingsError(
                f"DISPATCH_LEASE_S: must be longer than SHIPENGINE_TIMEOUT_S "
                f"({self.dispatch_lease_s} <= {self.shipengine_timeout_s})"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        read = EnvReader(env)
        optional = read.optional
        return cls(
            database_url=read.required("DATABASE_URL", postgres_url),
            host=optional("HOST", text, cls.host),
            port=optional("PORT", port_number, cls.port),
            api_workers=optional("API_WORKERS", positive_int, cls.api_workers),
            shipengine_api_key=optional("SHIPENGINE_API_KEY", text, None),
            shipengine_base_url=optional("SHIPENGINE_BASE_URL", http_url, cls.shipengine_base_url),
            shipengine_jwks_url=optional("SHIPENGINE_JWKS_URL", http_url, ""),
            shipengine_timeout_s=optional(
                "SHIPENGINE_TIMEOUT_S", positive_float, cls.shipengine_timeout_s
            ),
            shipengine_rate_limit_per_minute=optional(
                "SHIPENGINE_RATE_LIMIT_PER_MINUTE",
                non_negative_int,
                cls.shipengine_rate_limit_per_minute,
            ),
            log_level=optional("LOG_LEVEL", log_level, cls.log_level),
            database_read_url=optional("DATABASE_READ_URL", postgres_url, None),
            database_statement_cache=optional(
                "DATABASE_STATEMENT_CACHE", boolean, cls.database_statement_cache
            ),
            database_pool_size=optional("DATABASE_POOL_SIZE", positive_int, cls.database_pool_size),
            database_pool_timeout_s=optional(
                "DATABASE_POOL_TIMEOUT_S", positive_float, cls.database_pool_timeout_s
            ),
            database_command_timeout_s=optional(
                "DATABASE_COMMAND_TIMEOUT_S", positive_float, cls.database_command_timeout_s
            ),
            dispatch_concurrency=optional(
                "DISPATCH_CONCURRENCY", positive_int, cls.dispatch_concurrency
            ),
            dispatch_lease_s=optional("DISPATCH_LEASE_S", positive_float, cls.dispatch_lease_s),
            dispatch_poll_interval_s=optional(
                "DISPATCH_POLL_INTERVAL_S", positive_float, cls.dispatch_poll_interval_s
            ),
            dispatch_retry_base_s=optional(
                "DISPATCH_RETRY_BASE_S", positive_float, cls.dispatch_retry_base_s
            ),
            dispatch_retry_max_s=optional(
                "DISPATCH_RETRY_MAX_S", positive_float, cls.dispatch_retry_max_s
            ),
            dispatch_max_attempts=optional(
                "DISPATCH_MAX_ATTEMPTS", positive_int, cls.dispatch_max_attempts
            ),
            dispatch_account_probe_s=optional(
                "DISPATCH_ACCOUNT_PROBE_S", positive_float, cls.dispatch_account_probe_s
            ),
            dispatch_shutdown_grace_s=optional(
                "DISPATCH_SHUTDOWN_GRACE_S", non_negative_float, cls.dispatch_shutdown_grace_s
            ),
            dispatcher_status_port=optional(
                "DISPATCHER_STATUS_PORT", port_number, cls.dispatcher_status_port
            ),
            webhook_max_bytes=optional("WEBHOOK_MAX_BYTES", positive_int, cls.webhook_max_bytes),
            webhook_verify=optional("WEBHOOK_VERIFY", boolean, cls.webhook_verify),
            webhook_keys_refresh_s=optional(
                "WEBHOOK_KEYS_REFRESH_S", positive_float, cls.webhook_keys_refresh_s
            ),
            webhook_timestamp_tolerance_s=optional(
                "WEBHOOK_TIMESTAMP_TOLERANCE_S", positive_float, cls.webhook_timestamp_tolerance_s
            ),
            webhook_secret_header=optional("WEBHOOK_SECRET_HEADER", text, None),
            webhook_secret=optional("WEBHOOK_SECRET", text, None),
            webhook_refusal_sample_per_minute=optional(
                "WEBHOOK_REFUSAL_SAMPLE_PER_MINUTE",
                non_negative_int,
                cls.webhook_refusal_sample_per_minute,
            ),
            reconcile_interval_s=optional(
                "RECONCILE_INTERVAL_S", positive_float, cls.reconcile_interval_s
            ),
            reconcile_batch=optional("RECONCILE_BATCH", positive_int, cls.reconcile_batch),
            tracking_done_after_s=optional(
                "TRACKING_DONE_AFTER_S", positive_float, cls.tracking_done_after_s
            ),
            tracking_ex_rearm_max=optional(
                "TRACKING_EX_REARM_MAX", non_negative_int, cls.tracking_ex_rearm_max
            ),
            tracking_ex_rearm_delay_s=optional(
                "TRACKING_EX_REARM_DELAY_S", positive_float, cls.tracking_ex_rearm_delay_s
            ),
            delivery_retention_days=optional(
                "DELIVERY_RETENTION_DAYS", positive_int, cls.delivery_retention_days
            ),
            event_retention_days=optional(
                "EVENT_RETENTION_DAYS", positive_int, cls.event_retention_days
            ),
            dashboard_cookie_secure=optional(
                "DASHBOARD_COOKIE_SECURE", boolean, cls.dashboard_cookie_secure
            ),
            dashboard_origin=optional("DASHBOARD_ORIGIN", web_origin, None),
        )

    def __repr__(self) -> str:
        """Every field, secrets as `***` (passwords inside URLs too): a settings object in a
        traceback or a debugger's output shows no secret."""
        shown = (
            f"{field.name}={_masked(field.name, getattr(self, field.name))!r}"
            for field in dataclasses.fields(self)
        )
        return f"Settings({', '.join(shown)})"

    def secret_values(self) -> list[str]:
        """The values that no log line may show, as they are written and as they are read."""
        values = [self.shipengine_api_key, self.webhook_secret]
        for url in (self.database_url, self.database_read_url):
            password = urlsplit(url).password if url else None
            values += [password, unquote(password)] if password else []
        return [value for value in values if value]

    @property
    def budget(self) -> Budget:
        return Budget(
            rate_per_minute=self.shipengine_rate_limit_per_minute,
            account_probe_s=self.dispatch_account_probe_s,
        )

    @property
    def rearm_policy(self) -> RearmPolicy:
        return RearmPolicy(
            max_rearms=self.tracking_ex_rearm_max, delay_s=self.tracking_ex_rearm_delay_s
        )

    def require_api_key(self) -> str:
        if not self.shipengine_api_key:
            raise SettingsError("SHIPENGINE_API_KEY: required to call ShipEngine, but not set")
        return self.shipengine_api_key


class EnvReader:
    """Reads variables, turning a parser's ValueError into a SettingsError naming the variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def required(self, name: str, parse: Callable[[str], T]) -> T:
        raw = self._env.get(name, "").strip()
        if not raw:
            raise SettingsError(f"{name}: required, but not set")
        return self._parse(name, raw, parse)

    def optional(self, name: str, parse: Callable[[str], T], default: T) -> T:
        raw = self._env.get(name, "").strip()
        return self._parse(name, raw, parse) if raw else default

    @staticmethod
    def _parse(name: str, raw: str, parse: Callable[[str], T]) -> T:
        try:
            return parse(raw)
        except ValueError as error:
            raise SettingsError(f"{name}: {error}") from None


def text(raw: str) -> str:
    return raw


def boolean(raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {raw!r}")


def postgres_url(raw: str) -> str:
    if urlsplit(raw).scheme not in ("postgresql", "postgres"):
        raise ValueError("must be a postgresql:// URL")
    return raw


def http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http(s) URL, got {raw!r}")
    return raw.rstrip("/")


def web_origin(raw: str) -> str:
    """`https://host[:port]`, lowercased as browsers send it in `Origin`."""
    parts = urlsplit(raw.rstrip("/"))
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
        raise ValueError(f"must be an origin such as https://tracking.example.com, got {raw!r}")
    return f"{parts.scheme}://{parts.netloc}".lower()


def port_number(raw: str) -> int:
    value = integer(raw)
    if not 0 <= value <= 65535:
        raise ValueError(f"must be a port number, got {raw!r}")
    return value


def positive_int(raw: str) -> int:
    value = integer(raw)
    if value <= 0:
        raise ValueError(f"must be a positive integer, got {raw!r}")
    return value


def non_negative_int(raw: str) -> int:
    value = integer(raw)
    if value < 0:
        raise ValueError(f"must be zero or more, got {raw!r}")
    return value


def integer(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"must be an integer, got {raw!r}") from None


def positive_float(raw: str) -> float:
    value = finite_float(raw)
    if value <= 0:
        raise ValueError(f"must be a positive number, got {raw!r}")
    return value


def non_negative_float(raw: str) -> float:
    value = finite_float(raw)
    if value < 0:
        raise ValueError(f"must be zero or more, got {raw!r}")
    return value


def finite_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"must be a number, got {raw!r}") from None
    # float() takes "nan" and "inf", which would make every timeout misbehave.
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {raw!r}")
    return value


def log_level(raw: str) -> str:
    level = raw.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"must be DEBUG, INFO, WARNING or ERROR, got {raw!r}")
    return level


_SECRET_FIELDS = frozenset({"shipengine_api_key", "webhook_secret"})
_URL_FIELDS = frozenset({"database_url", "database_read_url"})


def _masked(name: str, value: object) -> object:
    if value and name in _SECRET_FIELDS:
        return "***"
    if isinstance(value, str) and name in _URL_FIELDS:
        return mask_url(value)
    return value


def mask_url(url: str) -> str:
    """The URL with its password replaced, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
