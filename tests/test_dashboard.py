"""/dashboard over plain HTTP: sessions, CSRF, scopes, escaping, and every page rendering.

The real app and database; the browser's part (following redirects, keeping the cookie) is
played by aiohttp's client. tests/test_dashboard_browser.py drives a real Chromium.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.app import create_app
from service.dashboard.charts import bar_chart
from service.dashboard.render import local_target
from service.db.tokens import create_token, revoke_token
from service.dispatcher.worker import Dispatcher
from service.domain.access import IssuedToken, Scope
from service.settings import Settings
from tests.conftest import RunningSimulator
from tests.payloads import track_body
from tests.webhook_sender import WebhookSender

Client = TestClient[web.Request, web.Application]

CSRF = re.compile(r'name="csrf" value="([^"]+)"')
PAGES = [
    "/dashboard",
    "/dashboard/subscriptions",
    "/dashboard/subscriptions/6a1c2e64-6d5e-4bd4-9d56-3b1b1ad2a1b0",
    "/dashboard/failures",
    "/dashboard/stuck",
    "/dashboard/deliveries",
]


async def issue(engine: AsyncEngine, client: str, *scopes: Scope) -> IssuedToken:
    async with engine.begin() as conn:
        return await create_token(conn, client, scopes)


async def log_in(api: Client, token: str) -> str:
    """Log in as the holder of `token`; returns the session's CSRF token."""
    response = await api.post("/dashboard/login", data={"token": token}, allow_redirects=False)
    assert response.status == 303, await response.text()
    return await csrf_of(api)


async def csrf_of(api: Client) -> str:
    response = await api.get("/dashboard")
    assert response.status == 200
    found = CSRF.search(await response.text())
    assert found is not None
    return found.group(1)


async def subscribe(api: Client, number: str, **fields: object) -> str:
    body = {"carrier_code": "ups", "tracking_number": number, **fields}
    response = await api.post("/v1/subscriptions", json=body)
    assert response.status == 202, await response.text()
    subscription_id: str = (await response.json())["id"]
    return subscription_id


async def failed_subscription(
    api: Client, shipengine: RunningSimulator, dispatcher: Dispatcher, number: str = "BAD1"
) -> str:
    shipengine.simulator.script(number, status=400, error_code="invalid_identifier")
    subscription_id = await subscribe(api, number)
    await dispatcher.drain()
    assert await state_of(api, subscription_id) == "failed"
    return subscription_id


async def state_of(api: Client, subscription_id: str) -> str:
    state: str = (await (await api.get(f"/v1/subscriptions/{subscription_id}")).json())["state"]
    return state


def session_cookie_header(response: web.StreamResponse | object) -> str:
    headers = response.headers.getall("Set-Cookie", [])  # type: ignore[attr-defined]
    [cookie] = [h for h in headers if h.startswith("dashboard_session=")]
    return str(cookie)


async def test_logging_in_sets_a_strict_http_only_cookie_that_is_not_the_token(
    api: Client, token: str
) -> None:
    response = await api.post(
        "/dashboard/login",
        data={"token": token, "next": "/dashboard/failures"},
        allow_redirects=False,
    )
    assert response.status == 303
    assert response.headers["Location"] == "/dashboard/failures"
    cookie = session_cookie_header(response)
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert "Path=/dashboard" in cookie
    assert "Secure" not in cookie  # the tests' DASHBOARD_COOKIE_SECURE=false, as `make run`'s
    secret = token.rsplit("_", 1)[1]
    assert secret not in cookie
    assert token.split("_")[1] not in cookie  # not even the token's id
    assert "tests" in await (await api.get("/dashboard")).text()


@pytest.fixture
async def secure_api(live_settings: Settings) -> AsyncIterator[Client]:
    """The API as deployed: DASHBOARD_COOKIE_SECURE left at its default."""
    secure = dataclasses.replace(
        live_settings, dashboard_cookie_secure=Settings.dashboard_cookie_secure
    )
    async with TestClient(TestServer(create_app(secure))) as client:
        yield client


@pytest.mark.parametrize(
    "headers",
    [{}, {"Host": "127.0.0.1:8080"}, {"Host": "localhost"}, {"X-Forwarded-Proto": "https"}],
    ids=["as-is", "loopback-host", "localhost", "behind-tls-proxy"],
)
async def test_the_cookie_is_secure_by_default_whatever_the_host(
    secure_api: Client, token: str, headers: dict[str, str]
) -> None:
    """A TLS proxy may forward `Host: 127.0.0.1`: the Host header decides nothing."""
    response = await secure_api.post(
        "/dashboard/login", data={"token": token}, headers=headers, allow_redirects=False
    )
    assert response.status == 303
    assert "Secure" in session_cookie_header(response)


async def test_the_cookie_is_not_secure_when_the_setting_says_so(api: Client, token: str) -> None:
    response = await api.post(
        "/dashboard/login",
        data={"token": token},
        headers={"Host": "dashboard.example.com", "X-Forwarded-Proto": "https"},
        allow_redirects=False,
    )
    assert response.status == 303
    assert "Secure" not in session_cookie_header(response)


async def test_the_login_page_warns_when_the_cookie_cannot_come_back(
    secure_api: Client, api: Client
) -> None:
    plain = await secure_api.get("/dashboard/login")
    assert "over plain HTTP" in await plain.text()
    assert "DASHBOARD_COOKIE_SECURE=false" in await plain.text()
    proxied = await secure_api.get("/dashboard/login", headers={"X-Forwarded-Proto": "https"})
    assert "over plain HTTP" not in await proxied.text()
    not_secure = await api.get("/dashboard/login")
    assert "over plain HTTP" not in await not_secure.text()


@pytest.mark.parametrize("pasted", ["tt_0123456789ab_wrong", "not a token", "", "x" * 300])
async def test_a_bad_token_is_refused_with_a_message(
    api: Client, engine: AsyncEngine, pasted: str
) -> None:
    if pasted.startswith("tt_"):  # a real id with a wrong secret
        issued = await issue(engine, "mallory", Scope.OPS)
        pasted = f"tt_{issued.token_id}_wrong"
    response = await api.post("/dashboard/login", data={"token": pasted}, allow_redirects=False)
    assert response.status == 401
    assert "unknown, revoked, or has no scope" in await response.text()
    assert "dashboard_session=" not in response.headers.get("Set-Cookie", "")


async def test_a_token_without_any_known_scope_cannot_log_in(
    api: Client, engine: AsyncEngine
) -> None:
    issued = await issue(engine, "nobody")
    response = await api.post("/dashboard/login", data={"token": issued.plaintext})
    assert response.status == 401


@pytest.mark.parametrize("path", PAGES)
async def test_pages_send_strangers_to_the_login_page(api: Client, path: str) -> None:
    response = await api.get(path, allow_redirects=False)
    assert response.status == 303
    assert response.headers["Location"].startswith("/dashboard/login?next=")
    followed = await api.get(path)
    assert followed.url.path == "/dashboard/login"
    assert "API token" in await followed.text()


async def test_a_stranger_cannot_act_either(api: Client) -> None:
    for path in ("/dashboard/subscriptions/6a1c2e64-6d5e-4bd4-9d56-3b1b1ad2a1b0/retry",
                 "/dashboard/failures/retry", "/dashboard/deliveries/1/replay",
                 "/dashboard/logout"):  # fmt: skip
        response = await api.post(path, data={"csrf": "guess"}, allow_redirects=False)
        assert response.status == 303
        assert response.headers["Location"] == "/dashboard/login?next=/dashboard"


async def test_a_forged_session_cookie_is_a_stranger(api: Client) -> None:
    response = await api.get(
        "/dashboard", headers={"Cookie": "dashboard_session=forged"}, allow_redirects=False
    )
    assert response.status == 303
    assert "ended=1" in response.headers["Location"]


async def test_every_page_renders(
    api: Client,
    token: str,
    shipengine: RunningSimulator,
    make_dispatcher: Callable[..., Dispatcher],
) -> None:
    dispatcher = make_dispatcher()
    failed = await failed_subscription(api, shipengine, dispatcher)
    await subscribe(api, "GOOD1", reference="order-77")
    await dispatcher.drain()
    await WebhookSender(api, shipengine.simulator.keys).deliver(track_body("GOOD1", "ups", 2))
    await log_in(api, token)

    summary = await (await api.get("/dashboard")).text()
    assert "Dispatching is running" in summary
    assert "<svg" in summary
    assert "Subscriptions by state" in summary
    assert 'href="/dashboard/subscriptions?state=failed"' in summary
    assert 'http-equiv="refresh"' in summary

    listed = await api.get("/dashboard/subscriptions", params={"tracking_number": "GOOD1"})
    text = await listed.text()
    assert listed.status == 200
    assert "order-77" in text
    assert "BAD1" not in text

    detail = await (await api.get(f"/dashboard/subscriptions/{failed}")).text()
    assert "start_attempt" in detail
    assert "invalid_identifier" in detail
    assert f'action="/dashboard/subscriptions/{failed}/retry"' in detail

    failures = await (await api.get("/dashboard/failures")).text()
    assert "Retry all 1 with this error code" in failures
    assert "BAD1" in failures

    stuck = await api.get("/dashboard/stuck", params={"pending_minutes": "1"})
    assert stuck.status == 200
    assert "Pending for more than 1.0 minutes (0)" in await stuck.text()

    deliveries = await (await api.get("/dashboard/deliveries")).text()
    assert "GOOD1" in deliveries
    assert "/replay" in deliveries

    missing = await api.get(PAGES[2])
    assert missing.status == 404
    assert "no such subscription" in await missing.text()
    assert (await api.get("/dashboard/subscriptions/not-a-uuid")).status == 404
    assert (await api.get("/dashboard/", allow_redirects=False)).headers["Location"] == (
        "/dashboard"
    )


async def test_pages_carry_a_strict_content_security_policy(api: Client, token: str) -> None:
    await log_in(api, token)
    response = await api.get("/dashboard")
    policy = response.headers["Content-Security-Policy"]
    nonce = re.search(r"'nonce-([^']+)'", policy)
    assert nonce is not None
    assert f'<script nonce="{nonce.group(1)}">' in await response.text()
    assert "default-src 'none'" in policy
    assert "frame-ancestors 'none'" in policy
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Cache-Control"] == "no-store"


async def test_bad_filters_are_explained_not_crashed_on(api: Client, token: str) -> None:
    await log_in(api, token)
    for path, field in [
        ("/dashboard/subscriptions?state=lost", "state"),
        ("/dashboard/subscriptions?cursor=garbage", "cursor"),
        ("/dashboard/stuck?limit=0", "limit"),
        ("/dashboard/deliveries?outcome=eaten", "outcome"),
        ("/dashboard/deliveries?before=99999999999999999999999", "before"),
        ("/dashboard/stuck?pending_minutes=inf", "pending_minutes"),
    ]:
        response = await api.get(path)
        assert response.status == 400, path
        assert field in await response.text()


async def test_the_subscription_list_pages_by_keyset(api: Client, token: str) -> None:
    for number in ("PAGED-1001", "PAGED-1002", "PAGED-1003"):
        await subscribe(api, number)
    await log_in(api, token)
    first = await (await api.get("/dashboard/subscriptions?limit=2")).text()
    assert "PAGED-1003" in first
    assert "PAGED-1002" in first
    assert "PAGED-1001" not in first
    next_url = re.search(r'href="([^"]+)" rel="next"', first)
    assert next_url is not None
    second = await (await api.get(next_url.group(1).replace("&amp;", "&"))).text()
    assert "PAGED-1001" in second
    assert "PAGED-1002" not in second
    assert 'rel="next"' not in second


async def test_retry_needs_the_sessions_csrf_token(
    api: Client,
    token: str,
    shipengine: RunningSimulator,
    make_dispatcher: Callable[..., Dispatcher],
) -> None:
    dispatcher = make_dispatcher()
    failed = await failed_subscription(api, shipengine, dispatcher)
    csrf = await log_in(api, token)
    retry = f"/dashboard/subscriptions/{failed}/retry"

    for form in ({}, {"csrf": "x" + csrf}):
        refused = await api.post(retry, data=form, allow_redirects=False)
        assert refused.status == 403
        assert "stale or not from this dashboard" in await refused.text()
    assert await state_of(api, failed) == "failed"

    done = await api.post(retry, data={"csrf": csrf}, allow_redirects=False)
    assert done.status == 303
    assert done.headers["Location"] == f"/dashboard/subscriptions/{failed}"
    assert await state_of(api, failed) == "pending"
    shown = await (await api.get(done.headers["Location"])).text()
    assert "Retried BAD1" in shown
    again = await api.post(retry, data={"csrf": csrf})
    assert "Nothing retried" in await again.text()


async def test_a_read_only_token_sees_but_cannot_act(
    api: Client,
    engine: AsyncEngine,
    shipengine: RunningSimulator,
    make_dispatcher: Callable[..., Dispatcher],
) -> None:
    failed = await failed_subscription(api, shipengine, make_dispatcher())
    await WebhookSender(api, shipengine.simulator.keys).deliver(track_body("NOBODY", "ups", 1))
    reader = await issue(engine, "dashboards", Scope.READ)
    csrf = await log_in(api, reader.plaintext)

    detail = await (await api.get(f"/dashboard/subscriptions/{failed}")).text()
    assert "Retry needs a token with the ops scope" in detail
    assert "/retry" not in detail
    assert "/replay" not in await (await api.get("/dashboard/deliveries")).text()

    for path, form in [
        (f"/dashboard/subscriptions/{failed}/retry", {}),
        ("/dashboard/failures/retry", {"error_code": "invalid_identifier"}),
        ("/dashboard/deliveries/1/replay", {}),
    ]:
        refused = await api.post(path, data={"csrf": csrf, **form})
        assert refused.status == 403, path
        assert "need a token with the ops scope" in await refused.text()
    assert await state_of(api, failed) == "failed"


async def test_revoking_the_token_ends_its_sessions(api: Client, engine: AsyncEngine) -> None:
    alice = await issue(engine, "ops-alice", Scope.OPS)
    await log_in(api, alice.plaintext)
    async with engine.begin() as conn:
        assert await revoke_token(conn, alice.token_id)

    response = await api.get("/dashboard", allow_redirects=False)
    assert response.status == 303
    assert response.headers["Location"] == "/dashboard/login?next=/dashboard&ended=1"
    assert 'dashboard_session=""' in response.headers["Set-Cookie"]
    # Logging in again with the revoked token does not work either.
    again = await api.post("/dashboard/login", data={"token": alice.plaintext})
    assert again.status == 401


async def test_logging_out_ends_the_session(api: Client, token: str) -> None:
    csrf = await log_in(api, token)
    cookie = api.session.cookie_jar.filter_cookies(api.make_url("/dashboard"))
    stolen = cookie["dashboard_session"].value
    out = await api.post("/dashboard/logout", data={"csrf": csrf}, allow_redirects=False)
    assert out.status == 303
    assert out.headers["Location"] == "/dashboard/login"
    replayed = await api.get(
        "/dashboard", headers={"Cookie": f"dashboard_session={stolen}"}, allow_redirects=False
    )
    assert replayed.status == 303


async def test_everything_shown_is_escaped(api: Client, token: str) -> None:
    script = "<script>alert('owned')</script>"
    subscription_id = await subscribe(
        api, "<b>X1</b>", reference=script, metadata={"note": '"><img src=x onerror=alert(1)>'}
    )
    await log_in(api, token)
    for path in (f"/dashboard/subscriptions/{subscription_id}", "/dashboard/subscriptions"):
        text = await (await api.get(path)).text()
        assert script not in text
        assert "<b>X1</b>" not in text
        assert "&lt;b&gt;X1&lt;/b&gt;" in text
    detail = await (await api.get(f"/dashboard/subscriptions/{subscription_id}")).text()
    assert "&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt;" in detail
    assert "<img src=x" not in detail
    searched = await api.get("/dashboard/subscriptions", params={"created_by": '"><i>q'})
    assert '"><i>q' not in await searched.text()


async def test_retry_all_of_one_error_code_and_replay(
    api: Client,
    token: str,
    shipengine: RunningSimulator,
    make_dispatcher: Callable[..., Dispatcher],
) -> None:
    dispatcher = make_dispatcher()
    first = await failed_subscription(api, shipengine, dispatcher, "BAD1")
    second = await failed_subscription(api, shipengine, dispatcher, "BAD2")
    shipengine.simulator.script("ODD", status=400, error_code="tracking_not_supported")
    odd = await subscribe(api, "ODD")
    await dispatcher.drain()
    csrf = await log_in(api, token)

    done = await api.post(
        "/dashboard/failures/retry", data={"csrf": csrf, "error_code": "invalid_identifier"}
    )
    assert "Retried 2 failed subscription(s) with error code invalid_identifier" in (
        await done.text()
    )
    assert [await state_of(api, s) for s in (first, second, odd)] == [
        "pending",
        "pending",
        "failed",
    ]
    refused = await api.post("/dashboard/failures/retry", data={"csrf": csrf, "error_code": "none"})
    assert refused.status == 400

    sent = await WebhookSender(api, shipengine.simulator.keys).deliver(track_body("LATE", "ups", 2))
    assert sent["outcome"] == "orphan"
    late = await subscribe(api, "LATE")
    replay = f"/dashboard/deliveries/{sent['delivery_id']}/replay"
    replayed = await api.post(replay, data={"csrf": csrf, "back": "/dashboard/deliveries"})
    assert replayed.url.path == "/dashboard/deliveries"
    assert f"Delivery {sent['delivery_id']} re-filed: filed" in await replayed.text()
    assert (await (await api.get(f"/v1/subscriptions/{late}")).json())["status_code"] == "IT"
    unknown = await api.post("/dashboard/deliveries/999999/replay", data={"csrf": csrf})
    assert "not replayed" in await unknown.text()
    for bad_id in ("99999999999999999999999", "-1", "1_0", "x"):
        missing = await api.post(f"/dashboard/deliveries/{bad_id}/replay", data={"csrf": csrf})
        assert missing.status == 404, bad_id


async def test_the_pause_is_shown_prominently(api: Client, token: str) -> None:
    await api.post("/v1/ops/dispatch/pause", json={"reason": "carrier <outage>"})
    await log_in(api, token)
    summary = await (await api.get("/dashboard")).text()
    assert "Dispatching is PAUSED" in summary
    assert "carrier &lt;outage&gt;" in summary


async def test_next_never_leaves_the_dashboard(api: Client, token: str) -> None:
    for wanted, expected in [
        ("/dashboard/subscriptions?state=failed", "/dashboard/subscriptions?state=failed"),
        ("//evil.example/dashboard", "/dashboard"),
        ("https://evil.example/", "/dashboard"),
        ("/dashboard\\@evil.example", "/dashboard"),
        ("/v1/subscriptions", "/dashboard"),
        ("/dashboardx", "/dashboard"),
    ]:
        response = await api.post(
            "/dashboard/login", data={"token": token, "next": wanted}, allow_redirects=False
        )
        assert response.headers["Location"] == expected, wanted


def test_local_targets() -> None:
    assert local_target("/dashboard") == "/dashboard"
    assert local_target("/dashboard/x?y=1") == "/dashboard/x?y=1"
    assert local_target("/dashboard/\tx") == "/dashboard"
    assert local_target(None, "/dashboard/deliveries") == "/dashboard/deliveries"


def test_bar_charts_scale_to_the_largest_count() -> None:
    chart = bar_chart(
        "by state", {"failed": 1, "active": 4, "pending": 2}, order=["pending", "active"]
    )
    assert [(bar.label, bar.count) for bar in chart.bars] == [
        ("pending", 2),
        ("active", 4),
        ("failed", 1),
    ]
    widths = [bar.width for bar in chart.bars]
    assert widths[1] == max(widths)
    assert widths[2] == widths[1] / 4
    assert bar_chart("empty", {}).bars == ()
    long = bar_chart("codes", {"x" * 40: 1, "": 2})
    assert long.bars[0].label == "(none)"
    assert long.bars[1].label.endswith("\u2026")
    assert long.bars[1].title.startswith("x" * 40)
