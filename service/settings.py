"""Settings: read once, at start, from environment variables; frozen afterwards.

A setting is one declaration: a field whose type parses and checks its variable's text, and
whose `setting(default, meaning)` documents it for README's configuration table (generated:
`python -m service settings --markdown`). The variable is the field's name in capitals, after
the class's `ENV_PREFIX`. Names carry their unit (`_s`, `_bytes`). A missing or malformed value
raises `SettingsError` naming the variable, which the entry point prints as one line.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar, Self, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, model_validator
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from service.domain.notifications import SEND_AHEAD_S
from service.domain.subscriptions import Budget
from service.domain.tracking import RearmPolicy

SHIPENGINE_PRODUCTION_URL = "https://api.shipengine.com"

N = TypeVar("N", int, float)


class SettingsError(Exception):
    """A setting is missing or malformed; the message names the variable."""


def parsed(parse: Callable[[str], object]) -> BeforeValidator:
    """Text, as the environment gives it, is parsed and checked by `parse` (a ValueError is the
    message after the variable's name); a value set in code is only checked for its type."""
    return BeforeValidator(lambda value: parse(value) if isinstance(value, str) else value)


def setting(
    default: Any, meaning: str, *, shown: str | None = None, note: str | None = None
) -> Any:
    """A setting's default (`...`: required) and meaning, as README's table shows them: the
    default in backticks, then `(note)`; or, where the value alone would mislead, `shown`."""
    return Field(default, description=meaning, json_schema_extra={"shown": shown, "note": note})


@dataclass(frozen=True, kw_only=True)
class FromEnvironment:
    """Settings read with `from_env`, one variable per field: `ENV_PREFIX` + its name."""

    ENV_PREFIX: ClassVar[str] = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Self:
        """Each field from its variable, surrounding whitespace stripped; empty is unset."""
        values: dict[str, str] = {}
        for field in dataclasses.fields(cls):
            raw = env.get(cls.variable(field.name), "").strip()
            if raw:
                values[field.name] = raw
        try:
            return cls(**values)
        except ValidationError as error:
            first = error.errors()[0]
            name = cls.variable(str(first["loc"][0])) if first["loc"] else cls.__name__
            raise SettingsError(f"{name}: {_message(first)}") from None

    @classmethod
    def variable(cls, field_name: str) -> str:
        return cls.ENV_PREFIX + field_name.upper()

    @classmethod
    def markdown_rows(cls) -> list[str]:
        """One row of README's configuration table per setting."""
        rows = []
        for field in dataclasses.fields(cls):
            info = cls.__pydantic_fields__[field.name]  # type: ignore[attr-defined]
            extra = info.json_schema_extra
            if not isinstance(extra, dict):
                raise TypeError(f"{cls.__name__}.{field.name}: declared without setting()")
            default = str(extra["shown"] or _shown(info))
            if extra["note"]:
                default += f" ({extra['note']})"
            rows.append(f"| `{cls.variable(field.name)}` | {default} | {info.description} |")
        return rows


def markdown_table(*classes: type[FromEnvironment]) -> str:
    """README's configuration table: every setting of `classes`, in declaration order."""
    rows = [row for cls in classes for row in cls.markdown_rows()]
    return "\n".join(["| variable | default | meaning |", "|---|---|---|", *rows])


def _shown(info: FieldInfo) -> str:
    if info.is_required():
        return "(required)"
    default = info.default
    if default is None:
        return "unset"
    if isinstance(default, SecretStr):
        default = default.get_secret_value()
    if isinstance(default, bool):
        default = str(default).lower()
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    return f"`{default}`"


def _message(error: ErrorDetails) -> str:
    if error["type"] == "missing":
        return "required, but not set"
    if error["type"] == "value_error":
        return str(error.get("ctx", {})["error"])  # a parser's own words
    return error["msg"]


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


def integer(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"must be an integer, got {raw!r}") from None


def finite_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"must be a number, got {raw!r}") from None
    # float() takes "nan" and "inf", which would make every timeout misbehave.
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {raw!r}")
    return value


def checked(
    number: Callable[[str], N], fits: Callable[[N], bool], must_be: str
) -> Callable[[str], N]:
    """A parser of `number`s that refuses those that do not fit, in the words of `must_be`."""

    def parse(raw: str) -> N:
        value = number(raw)
        if not fits(value):
            raise ValueError(f"must be {must_be}, got {raw!r}")
        return value

    return parse


port_number = checked(integer, lambda value: 0 <= value <= 65535, "a port number")
positive_int = checked(integer, lambda value: value > 0, "a positive integer")
non_negative_int = checked(integer, lambda value: value >= 0, "zero or more")
positive_float = checked(finite_float, lambda value: value > 0, "a positive number")
non_negative_float = checked(finite_float, lambda value: value >= 0, "zero or more")


def host_names(raw: str) -> tuple[str, ...]:
    """Comma-separated host names, lowercased, without a trailing dot; blanks between commas
    are skipped."""
    names = tuple(name.strip().lower().rstrip(".") for name in raw.split(","))
    return tuple(name for name in names if name)


def log_level(raw: str) -> str:
    level = raw.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"must be DEBUG, INFO, WARNING or ERROR, got {raw!r}")
    return level


# What a variable's text may be; in code, values are only checked for their type.
Flag = Annotated[bool, parsed(boolean)]
Port = Annotated[int, parsed(port_number)]
PositiveInt = Annotated[int, parsed(positive_int)]
ZeroOrMoreInt = Annotated[int, parsed(non_negative_int)]
PositiveFloat = Annotated[float, parsed(positive_float)]
ZeroOrMoreFloat = Annotated[float, parsed(non_negative_float)]
HttpURL = Annotated[str, parsed(http_url)]
PostgresURL = Annotated[str, parsed(postgres_url)]
WebOrigin = Annotated[str, parsed(web_origin)]
LogLevel = Annotated[str, parsed(log_level)]
HostNames = Annotated[tuple[str, ...], parsed(host_names)]


@dataclass(frozen=True, kw_only=True, repr=False)
class Settings(FromEnvironment):
    """The service's settings: the API's, the dispatcher's and the ops commands'."""

    database_url: PostgresURL = setting(
        ..., "the service's database, `postgresql://user:pass@host:5432/db`"
    )
    host: str = setting(
        "0.0.0.0",  # noqa: S104 - a service in a container listens on every interface
        "address the API listens on",
        note="`127.0.0.1` under `make run`",
    )
    port: Port = setting(8080, "port the API listens on")
    api_workers: PositiveInt = setting(
        1,
        "API processes sharing the port (SO_REUSEPORT), forked at start; one per core uses them "
        "all. A worker that dies stops the rest, so the supervisor restarts the whole",
    )
    shipengine_api_key: SecretStr | None = setting(
        None,
        "ShipEngine API key; the dispatcher needs it, the API does not",
        shown="(required by the dispatcher)",
    )
    shipengine_base_url: HttpURL = setting(
        SHIPENGINE_PRODUCTION_URL, "ShipEngine, or the simulator"
    )
    shipengine_jwks_url: HttpURL = setting(
        "", "ShipEngine's webhook signing keys", shown="`<base>/jwks`"
    )
    shipengine_timeout_s: PositiveFloat = setting(10.0, "time allowed for one ShipEngine call")
    shipengine_rate_limit_per_minute: ZeroOrMoreInt = setting(
        200, "the account's budget, shared by every dispatcher of every instance (`0`: no limit)"
    )
    log_level: LogLevel = setting(
        "INFO", "`DEBUG`, `INFO`, `WARNING`, `ERROR`; logs are JSON lines on stdout"
    )
    database_pool_size: PositiveInt = setting(
        10,
        "connections each process keeps to PostgreSQL (up to as many again while busy); under "
        "load, the API's group commits keep 4 of them between their transactions",
    )
    database_pool_timeout_s: PositiveFloat = setting(
        3.0,
        "how long a request waits for a free connection before it is answered 503 with "
        "`Retry-After`",
    )
    database_command_timeout_s: PositiveFloat = setting(
        15.0,
        "longest a statement (or a connection attempt, 5 s at most) may take before the request "
        "is answered 503: a database gone silent is not waited for",
    )
    database_read_url: PostgresURL | None = setting(
        None, "a replica for dashboard reads (lists, ops views)", note="the primary"
    )
    database_statement_cache: Flag = setting(True, "`false` behind PgBouncer in transaction mode")
    dispatch_concurrency: PositiveInt = setting(
        32, "ShipEngine calls one dispatcher keeps in flight"
    )
    dispatch_lease_s: PositiveFloat = setting(
        60.0,
        "how long a claim lasts before another dispatcher may take it (a dead dispatcher's "
        "claims expire after it); must exceed `SHIPENGINE_TIMEOUT_S`",
    )
    dispatch_poll_interval_s: PositiveFloat = setting(
        5.0, "longest sleep between looks for work (NOTIFY wakes sooner)"
    )
    dispatch_retry_base_s: PositiveFloat = setting(
        5.0, "first retry delay; doubles per attempt, full jitter"
    )
    dispatch_retry_max_s: PositiveFloat = setting(600.0, "cap of the retry delay")
    dispatch_max_attempts: PositiveInt = setting(
        20, "failed calls (5xx, timeouts...) before a subscription is `failed` with its last error"
    )
    dispatch_account_probe_s: PositiveFloat = setting(
        60.0, "while ShipEngine refuses our account, one probe call this often"
    )
    dispatch_shutdown_grace_s: ZeroOrMoreFloat = setting(
        10.0, "on SIGTERM, how long in-flight calls may take before their claims are released"
    )
    dispatcher_status_port: Port = setting(
        0,
        "a dispatcher process serves `/healthz`, `/readyz` and `/metrics` here (`/metrics` to a "
        "`metrics` token, as on the API's port)",
        note="off",
    )
    webhook_max_bytes: PositiveInt = setting(
        1024 * 1024, "largest webhook or request body; larger gets 413"
    )
    webhook_verify: Flag = setting(
        True, "verify ShipEngine's signatures; `false` only with a local `SHIPENGINE_BASE_URL`"
    )
    webhook_keys_refresh_s: PositiveFloat = setting(
        60.0, "an unknown key id refetches the JWKS at most this often, whatever senders send"
    )
    webhook_timestamp_tolerance_s: PositiveFloat = setting(
        300.0, "a signature timestamp further from now is a replay"
    )
    webhook_secret_header: str | None = setting(
        None, "a custom header the webhook registration adds; set with `WEBHOOK_SECRET`"
    )
    webhook_secret: SecretStr | None = setting(
        None, "the value `WEBHOOK_SECRET_HEADER` must carry, compared in constant time"
    )
    webhook_refusal_sample_per_minute: ZeroOrMoreInt = setting(
        60,
        "refused webhooks each API process stores a minute at most, as samples of 4 KiB; the "
        "rest, and every request without signature headers, are only counted (`0`: store none)",
    )
    dashboard_cookie_secure: Flag = setting(
        True,
        "the dashboard's session cookie is `Secure` (sent over HTTPS only); decided by this "
        "setting alone, never by the request's Host. `false` only for plain HTTP on loopback",
        note="`false` under `make run` and `docker compose`",
    )
    dashboard_origin: WebOrigin | None = setting(
        None,
        "the dashboard's public origin (`https://tracking.example.com`) when a proxy in front "
        "rewrites the `Host` header; logins posted from it count as same-site",
    )
    reconcile_interval_s: PositiveFloat = setting(
        60.0, "how often the reconciler looks for silent packages"
    )
    reconcile_batch: PositiveInt = setting(50, "packages polled at most per round")
    tracking_done_after_s: PositiveFloat = setting(
        3 * 24 * 3600.0, "after DE/SP plus this, a subscription costs nothing more", note="3 days"
    )
    tracking_ex_rearm_max: ZeroOrMoreInt = setting(
        3, "restarts of tracking after an EX (ShipEngine stops on EX)"
    )
    tracking_ex_rearm_delay_s: PositiveFloat = setting(900.0, "delay of such a restart")
    delivery_retention_days: PositiveInt = setting(
        35, "raw webhook deliveries are dropped, a week's partition at a time, after this"
    )
    event_retention_days: PositiveInt = setting(
        400,
        "tracking history is dropped this long after its subscription was created (a month's "
        "partition at a time); not shorter than the above",
    )
    change_retention_days: PositiveInt = setting(
        30, "the change feed keeps each change this long; an older cursor is told it expired"
    )
    stale_after_hours: PositiveFloat = setting(
        72.0,
        "an active package not delivered with no carrier news this long is `tracking.stale` "
        "in the change feed, once per silence",
    )
    change_stream_heartbeat_s: PositiveFloat = setting(
        15.0, "an idle change stream (SSE) sends a comment this often, to keep proxies open"
    )
    notify_concurrency_per_endpoint: PositiveInt = setting(
        16,
        "notifications in flight to one endpoint at most, across every worker (one per "
        "subscription: each subscription's arrive in order)",
    )
    notify_timeout_s: PositiveFloat = setting(
        10.0, "a notification not answered whole within this is retried"
    )
    notify_lease_s: PositiveFloat = setting(
        60.0,
        "a worker's claim on a notification it sends: one that dies mid-send has it sent "
        "again after this",
    )
    notify_concurrency: PositiveInt = setting(
        256, "notifications one dispatcher process keeps in flight, all endpoints together"
    )
    notify_queue_per_endpoint: PositiveInt = setting(
        10_000,
        "notifications queued for one endpoint at most; the rest wait in the change feed "
        "(so within its retention nothing is lost)",
    )
    notify_allowed_hosts: HostNames = setting(
        (),
        "comma-separated host names that notification endpoints may point at; any other is "
        "refused (link-local and metadata addresses are refused whatever this says)",
        shown="unset",
        note="any host",
    )

    @model_validator(mode="after")
    def _rules_between_settings(self) -> Self:
        """A SettingsError passes through pydantic as it is: the variable named, in code too."""
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
        if self.notify_lease_s <= self.notify_timeout_s + SEND_AHEAD_S:
            # A claim must outlive its send (and a rate-limited send's wait), or a second
            # worker could send the same message while the first still waits for the answer.
            raise SettingsError(
                f"NOTIFY_LEASE_S: must be longer than NOTIFY_TIMEOUT_S + "
                f"{SEND_AHEAD_S:g} ({self.notify_lease_s} <= {self.notify_timeout_s} "
                f"+ {SEND_AHEAD_S:g})"
            )
        return self

    def __repr__(self) -> str:
        """Every field, secrets as `***` (passwords inside URLs too): a settings object in a
        traceback or a debugger's output shows no secret."""
        shown = (
            f"{field.name}={_masked(getattr(self, field.name))!r}"
            for field in dataclasses.fields(self)
        )
        return f"Settings({', '.join(shown)})"

    def secret_values(self) -> list[str]:
        """The values that no log line may show, as they are written and as they are read."""
        values: list[str] = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, SecretStr):
                values.append(value.get_secret_value())
            elif password := _url_password(value):
                values += [password, unquote(password)]
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
        return self.shipengine_api_key.get_secret_value()


def _masked(value: object) -> object:
    if isinstance(value, SecretStr):
        return "***" if value.get_secret_value() else ""
    return mask_url(value) if isinstance(value, str) else value


def _url_password(value: object) -> str | None:
    """The password of a setting that is a URL with one (a database's). A text that is no URL
    at all (HOST='//[') has none: it must not stop the start with a traceback."""
    if not isinstance(value, str):
        return None
    try:
        return urlsplit(value).password
    except ValueError:
        return None


def mask_url(url: str) -> str:
    """The URL with its password replaced, for logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url  # not a URL, so no password in it
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
