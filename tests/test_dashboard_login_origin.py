"""Login CSRF: a login posted from another site is refused; the dashboard's own, and clients
that say nothing of where they post from, log in."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from service.api.app import create_app
from service.settings import Settings, SettingsError

Client = TestClient[web.Request, web.Application]


def own_origin(api: Client, scheme: str = "http") -> str:
    return f"{scheme}://{api.server.host}:{api.server.port}"


async def post_login(api: Client, token: str, headers: dict[str, str]) -> ClientResponse:
    return await api.post(
        "/dashboard/login", data={"token": token}, headers=headers, allow_redirects=False
    )


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "same-origin", "Origin": "{own}"},
        {"Origin": "{own}"},
        {"Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},  # typed or bookmarked: the user's own doing
        {},  # old browsers and scripts say nothing
        {"Origin": "{own_https}"},  # behind a TLS proxy: https outside, http here
        {"Origin": "https://tracking.example.com", "Host": "tracking.example.com:443"},
        {"Origin": "http://TRACKING.example.com", "Host": "tracking.example.com"},
    ],
    ids=[
        "same-origin",
        "origin-only",
        "fetch-site-only",
        "fetch-site-none",
        "neither",
        "tls-proxy",
        "default-port",
        "case",
    ],
)
async def test_a_login_from_this_site_or_a_silent_client_is_accepted(
    api: Client, token: str, headers: dict[str, str]
) -> None:
    filled = {
        name: value.format(own=own_origin(api), own_https=own_origin(api, "https"))
        for name, value in headers.items()
    }
    response = await post_login(api, token, filled)
    assert response.status == 303
    assert "dashboard_session=" in response.headers.get("Set-Cookie", "")


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "cross-site", "Origin": "{own}"},
        {"Origin": "https://evil.example"},
        {"Origin": "null"},  # sandboxed frames, opaque origins
        {"Origin": "{own}:1"},
        {"Sec-Fetch-Site": "same-site", "Origin": "https://evil.tracking.example.com"},
    ],
    ids=["cross-site", "cross-site-own-origin", "evil", "null", "other-port", "sibling"],
)
async def test_a_login_from_another_site_is_refused(
    api: Client, token: str, headers: dict[str, str]
) -> None:
    filled = {name: value.format(own=own_origin(api)) for name, value in headers.items()}
    response = await post_login(api, token, filled)
    assert response.status == 403
    assert "dashboard_session=" not in response.headers.get("Set-Cookie", "")
    text = await response.text()
    assert "did not come from this dashboard" in text
    assert 'name="token"' in text  # the login page, to log in from the right place


@pytest.fixture
async def behind_proxy(live_settings: Settings) -> AsyncIterator[Client]:
    """A proxy that rewrites Host to the service's own address, its public origin configured."""
    settings = dataclasses.replace(live_settings, dashboard_origin="https://tracking.example.com")
    async with TestClient(TestServer(create_app(settings))) as client:
        yield client


async def test_a_proxy_that_rewrites_host_needs_its_origin_configured(
    api: Client, behind_proxy: Client, token: str
) -> None:
    public = {"Origin": "https://tracking.example.com", "Host": "127.0.0.1:8080"}
    assert (await post_login(api, token, public)).status == 403
    assert (await post_login(behind_proxy, token, public)).status == 303
    evil = {"Origin": "https://evil.example", "Host": "127.0.0.1:8080"}
    assert (await post_login(behind_proxy, token, evil)).status == 403


def test_dashboard_settings_from_the_environment() -> None:
    base = {"DATABASE_URL": "postgresql://u@127.0.0.1/db"}
    default = Settings.from_env(base)
    assert default.dashboard_cookie_secure is True
    assert default.dashboard_origin is None
    configured = Settings.from_env(
        base
        | {"DASHBOARD_COOKIE_SECURE": "false", "DASHBOARD_ORIGIN": "HTTPS://Tracking.Example.com/"}
    )
    assert configured.dashboard_cookie_secure is False
    assert configured.dashboard_origin == "https://tracking.example.com"
    for name, value in [
        ("DASHBOARD_COOKIE_SECURE", "maybe"),
        ("DASHBOARD_ORIGIN", "https://tracking.example.com/dashboard"),
        ("DASHBOARD_ORIGIN", "tracking.example.com"),
    ]:
        with pytest.raises(SettingsError, match=name):
            Settings.from_env(base | {name: value})
