"""Settings come from the environment once, and a bad one stops the program naming itself."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.settings import Settings, SettingsError, mask_url

URL = "postgresql://tracking:s3cret@db:5432/tracking"


def test_defaults() -> None:
    settings = Settings.from_env({"DATABASE_URL": URL})
    assert settings.port == 8080
    assert settings.shipengine_base_url == "https://api.shipengine.com"
    assert settings.shipengine_jwks_url == "https://api.shipengine.com/jwks"
    assert settings.log_level == "INFO"


def test_jwks_follows_the_base_url_unless_set() -> None:
    base = {"DATABASE_URL": URL, "SHIPENGINE_BASE_URL": "http://127.0.0.1:8090/"}
    assert Settings.from_env(base).shipengine_jwks_url == "http://127.0.0.1:8090/jwks"
    explicit = {**base, "SHIPENGINE_JWKS_URL": "https://keys.example/jwks"}
    assert Settings.from_env(explicit).shipengine_jwks_url == "https://keys.example/jwks"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({}, "DATABASE_URL"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"DATABASE_URL": URL, "PORT": "eighty"}, "PORT"),
        ({"DATABASE_URL": URL, "PORT": "70000"}, "PORT"),
        ({"DATABASE_URL": URL, "SHIPENGINE_BASE_URL": "ftp://x"}, "SHIPENGINE_BASE_URL"),
        ({"DATABASE_URL": URL, "LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"DATABASE_URL": URL, "DISPATCH_CONCURRENCY": "0"}, "DISPATCH_CONCURRENCY"),
        ({"DATABASE_URL": URL, "API_WORKERS": "0"}, "API_WORKERS"),
        (
            {"DATABASE_URL": URL, "WEBHOOK_REFUSAL_SAMPLE_PER_MINUTE": "-1"},
            "WEBHOOK_REFUSAL_SAMPLE_PER_MINUTE",
        ),
        # Deliveries are the evidence for events: never kept longer than them.
        (
            {"DATABASE_URL": URL, "DELIVERY_RETENTION_DAYS": "90", "EVENT_RETENTION_DAYS": "60"},
            "DELIVERY_RETENTION_DAYS",
        ),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=rf"^{variable}: "):
        Settings.from_env(env)


def test_refused_webhooks_are_sampled_60_a_minute_unless_set() -> None:
    assert Settings.from_env({"DATABASE_URL": URL}).webhook_refusal_sample_per_minute == 60
    # 0: every refusal counted, none stored.
    none = {"DATABASE_URL": URL, "WEBHOOK_REFUSAL_SAMPLE_PER_MINUTE": "0"}
    assert Settings.from_env(none).webhook_refusal_sample_per_minute == 0


def test_the_dispatcher_needs_an_api_key() -> None:
    with pytest.raises(SettingsError, match=r"^SHIPENGINE_API_KEY: "):
        Settings.from_env({"DATABASE_URL": URL}).require_api_key()


def test_passwords_are_masked() -> None:
    assert mask_url(URL) == "postgresql://tracking:***@db:5432/tracking"
    assert mask_url("postgresql://db/x") == "postgresql://db/x"


def test_the_program_stops_with_one_line_naming_the_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "api"],
        env={"PORT": "8080"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "configuration error: DATABASE_URL: required, but not set"
    ]
