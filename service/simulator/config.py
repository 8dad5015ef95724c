"""The simulator's settings: defaults suit tests; `from_env` serves local demos."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TypeVar

from service.settings import (
    EnvReader,
    http_url,
    non_negative_float,
    port_number,
    positive_float,
    positive_int,
    text,
)

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

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SimulatorConfig:
        read = EnvReader(env).optional
        host = read("SIMULATOR_HOST", text, cls.host)
        port = read("SIMULATOR_PORT", port_number, cls.port)
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
        )
