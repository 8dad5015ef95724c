"""The simulator's settings: defaults suit tests; `from_env` (`SIMULATOR_*`) serves demos."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Self, TypeVar

from pydantic import SecretStr, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from service.settings import (
    FromEnvironment,
    HttpURL,
    Port,
    PositiveFloat,
    PositiveInt,
    SettingsError,
    ZeroOrMoreFloat,
    non_negative_int,
    parsed,
    setting,
)
from service.simulator.ratelimit import calls_per_window

C = TypeVar("C", bound=type[Any])


def _rules_raise_their_value_error(cls: C) -> C:
    """A rule between fields raises its own ValueError, not pydantic's ValidationError around
    it: `Simulator.configure` builds configs with `dataclasses.replace` and reports its words."""
    validate = cls.__init__

    @functools.wraps(validate)
    def __init__(self: Any, **values: Any) -> None:
        try:
            validate(self, **values)
        except ValidationError as error:
            first = error.errors()[0]
            if first["loc"] or first["type"] != "value_error":
                raise
            raise first.get("ctx", {})["error"] from None

    setattr(cls, "__init__", __init__)  # noqa: B010 - mypy refuses to assign a method
    return cls


def no_limit_at_zero(raw: str) -> int | None:
    """`0`, like unset, is no limit."""
    return non_negative_int(raw) or None


@_rules_raise_their_value_error
@dataclass(frozen=True, kw_only=True)
class SimulatorConfig(FromEnvironment):
    """The ShipEngine simulator's settings; `Simulator.configure` changes some at runtime."""

    ENV_PREFIX: ClassVar[str] = "SIMULATOR_"

    host: str = setting("127.0.0.1", "address the simulator listens on")
    port: Port = setting(8090, "port the simulator listens on")
    api_key: SecretStr = setting(
        SecretStr("TEST_simulator"), "the only `API-Key` the simulator's /v1 endpoints accept"
    )
    pace_s: ZeroOrMoreFloat = setting(
        2.0, "seconds between two steps of a simulated package's life (`0`: as fast as possible)"
    )
    latency_s: ZeroOrMoreFloat = setting(0.0, "added to every simulated API answer")
    public_url: HttpURL = setting(
        "", "base of `resource_url` in simulated webhooks", shown="`http://<host>:<port>`"
    )
    delivery_retry_s: ZeroOrMoreFloat = setting(
        1.0, "seconds between two attempts of one simulated webhook delivery"
    )
    delivery_attempts: PositiveInt = setting(
        3, "attempts per simulated webhook delivery, the first included"
    )
    delivery_timeout_s: PositiveFloat = setting(
        10.0, "time allowed for one simulated webhook delivery attempt"
    )
    rate_limit_per_minute: Annotated[int | None, parsed(no_limit_at_zero)] = setting(
        None,
        "authenticated /v1 calls allowed per minute, all endpoints together (ShipEngine: 200, "
        "sandbox 20)",
        shown="unset (no limit, as `0`)",
    )
    rate_limit_window_s: PositiveFloat = setting(
        60.0,
        "the sliding window of the rate limit; a shorter one scales the limit down, to at most "
        "`SIMULATOR_RATE_LIMIT_PER_MINUTE * window / 60` calls in any window",
    )

    @model_validator(mode="after")
    def _rules_between_settings(self) -> Self:
        """The public URL follows host and port unless set; a rate limit lets calls through."""
        if not self.public_url:
            object.__setattr__(self, "public_url", f"http://{self.host}:{self.port}")
        check_rate_limit(self.rate_limit_per_minute, self.rate_limit_window_s)
        return self

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Self:
        try:
            return super().from_env(env)
        except ValueError as error:  # the rate limit's rule, which names no variable
            raise SettingsError(f"SIMULATOR_RATE_LIMIT_PER_MINUTE: {error}") from None

    @property
    def calls_per_rate_window(self) -> int | None:
        """Calls admitted in any `rate_limit_window_s` seconds; None without a limit."""
        if self.rate_limit_per_minute is None:
            return None
        return calls_per_window(self.rate_limit_per_minute, self.rate_limit_window_s)


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
