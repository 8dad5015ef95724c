"""The simulator's settings: defaults suit tests; `from_env` serves local demos."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TypeVar

from service.settings import (
    EnvReader,
    SettingsError,
    http_url,
    integer,
    non_negative_float,
    port_number,
    positive_float,
    positive_int,
    text,
)
from service.simulator.ratelimit import calls_per_window

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimulatorConfig:
    api_key: str = "TEST_simulator"
    """SIMULATOR_API_KEY: the only `API-Key` the /v1 endpoints accept."""
    pace_s: float = 2.0
    """SIMULATOR_PACE_S: seconds between two steps of a package's life (0: as fast as possible)."""
    latency_s: float = 0.0
    """SIMULATOR_LATENCY_S: added before every /v1 answer."""
    delivery_retry_s: float = 1.0
    """SIMULATOR_DELIVERY_RETRY_S: seconds between two attempts of one webhook delivery."""
    delivery_attempts: int = 3
    """SIMULATOR_DELIVERY_ATTEMPTS: attempts per webhook delivery, the first included."""
    delivery_timeout_s: float = 10.0
    """SIMULATOR_DELIVERY_TIMEOUT_S: time allowed for one delivery attempt."""
    public_url: str = "http://127.0.0.1:8090"
    """SIMULATOR_PUBLIC_URL: base of `resource_url` in deliveries; `http://{host}:{port}`."""
    host: str = "127.0.0.1"
    """SIMULATOR_HOST: address the simulator listens on."""
    port: int = 8090
    """SIMULATOR_PORT: port the simulator listens on."""
    rate_limit_per_minute: int | None = None
    """SIMULATOR_RATE_LIMIT_PER_MINUTE: authenticated /v1 calls allowed per minute, all endpoints
    together (ShipEngine: 200, sandbox 20); None (env: 0 or unset) for no limit."""
    rate_limit_window_s: float = 60.0
    """SIMULATOR_RATE_LIMIT_WINDOW_S: the sliding window; shorter windows scale the limit down,
    to at most `rate_limit_per_minute * rate_limit_window_s / 60` calls in any window."""

    def __post_init__(self) -> None:
        check_rate_limit(self.rate_limit_per_minute, self.rate_limit_window_s)

    @property
    def calls_per_rate_window(self) -> int | None:
        """Calls admitted in any `rate_limit_window_s` seconds; None without a limit."""
        if self.rate_limit_per_minute is None:
            return None
        return calls_per_window(self.rate_limit_per_minute, self.rate_limit_window_s)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SimulatorConfig:
        read = EnvReader(env).optional
        host = read("SIMULATOR_HOST", text, cls.host)
        port = read("SIMULATOR_PORT", port_number, cls.port)
        per_minute = read("SIMULATOR_RATE_LIMIT_PER_MINUTE", non_negative_int, 0) or None
        window_s = read("SIMULATOR_RATE_LIMIT_WINDOW_S", positive_float, cls.rate_limit_window_s)
        try:
            check_rate_limit(per_minute, window_s)
        except ValueError as error:
            raise SettingsError(f"SIMULATOR_RATE_LIMIT_PER_MINUTE: {error}") from None
        return cls(
            api_key=read("SIMULATOR_API_KEY", text, cls.api_key),
            pace_s=read("SIMULATOR_PACE_S", non_negative_float, cls.pace_s),
            latency_s=read("SIMULATOR_LATENCY_S", non_negative_float, cls.latency_s),
            delivery_retry_s=read(
                "SIMULATOR_DELIVERY_RETRY_S", non_negative_float, cls.delivery_retry_s
            ),
            delivery_attempts=read(
                "SIMULATOR_DELIVERY_ATTEMPTS", positive_int, cls.delivery_attempts
            ),
            delivery_timeout_s=read(
                "SIMULATOR_DELIVERY_TIMEOUT_S", positive_float, cls.delivery_timeout_s
            ),
            public_url=read("SIMULATOR_PUBLIC_URL", http_url, f"http://{host}:{port}"),
            host=host,
            port=port,
            rate_limit_per_minute=per_minute,
            rate_limit_window_s=window_s,
        )


def check_rate_limit(per_minute: int | None, window_s: float) -> None:
    """Raise ValueError unless the limit lets at least one call through per window."""
    if not 0 < window_s < float("inf"):
        raise ValueError(f"rate_limit_window_s must be a finite positive number, got {window_s}")
    if per_minute is None:
        return
    if per_minute < 1:
        raise ValueError(f"rate_limit_per_minute must be 1 or more, got {per_minute}")
    # A window too short for one call would refuse everything: surely a mistake.
    if calls_per_window(per_minute, window_s) < 1:
        raise ValueError(
            f"{per_minute} calls per minute allow no call in a {window_s} s window; "
            "raise the limit or lengthen the window"
        )


def non_negative_int(raw: str) -> int:
    value = integer(raw)
    if value < 0:
        raise ValueError(f"must be zero or more, got {raw!r}")
    return value
