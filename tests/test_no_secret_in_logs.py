"""Tried as an auditor would: real API and dispatcher processes with known secrets, made to fail
on every path, and every line they logged read back. No line holds the database password, the
ShipEngine key, the webhook secret, a caller's token or a dashboard session id."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.engine import asyncpg_dsn
from service.db.tokens import create_token
from service.domain.access import Scope
from tests.conftest import RunningSimulator, bearer
from tests.payloads import track_body
from tests.processes import ApiProcess, DispatcherProcess
from tests.raw_http import exchange, request_bytes
from tests.waiting import eventually

pytestmark = pytest.mark.slow

PASSWORD = "db-Pa55-never-logged"
API_KEY = "TEST_simulator"  # the simulator's; checked below as the whole header it travels in
WEBHOOK_SECRET = "hook-secret-never-logged"
SECRET_HEADER = "X-Hook-Secret"


def with_password(database_url: str) -> str:
    """The test database's URL with a password (trust authentication ignores it)."""
    return make_url(database_url).set(password=PASSWORD).render_as_string(hide_password=False)


@pytest.fixture
def secret_env(database_url: str, shipengine: RunningSimulator) -> dict[str, str]:
    return {
        "DATABASE_URL": with_password(database_url),
        "SHIPENGINE_API_KEY": API_KEY,
        "SHIPENGINE_BASE_URL": shipengine.url,
        "WEBHOOK_SECRET_HEADER": SECRET_HEADER,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "LOG_LEVEL": "DEBUG",  # every line the code can write
        "DISPATCH_POLL_INTERVAL_S": "0.2",
        "DASHBOARD_COOKIE_SECURE": "false",
    }


@pytest.fixture
async def api_process(tmp_path: Path, secret_env: dict[str, str]) -> AsyncIterator[ApiProcess]:
    api = await ApiProcess.start(tmp_path / "api.log", secret_env)
    yield api
    await api.ensure_stopped()


async def execute(database_url: str, sql: str) -> None:
    admin = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await admin.execute(sql)
    finally:
        await admin.close()


async def raw_post(url: str, path: str, headers: list[bytes], body: bytes) -> int:
    """POST with header bytes no client library would send; the answer's status."""
    host_port = url.removeprefix("http://")
    host, port = host_port.split(":")
    pairs = [(name, value) for name, _, value in (line.partition(b": ") for line in headers)]
    request = request_bytes(b"POST", path.encode(), pairs, body, host_port.encode())
    return (await exchange(host, int(port), request)).status


async def test_no_log_line_holds_a_secret_a_token_or_a_session_id(
    api_process: ApiProcess,
    tmp_path: Path,
    secret_env: dict[str, str],
    database_url: str,
    engine: AsyncEngine,
    shipengine: RunningSimulator,
) -> None:
    async with engine.begin() as conn:
        token = (await create_token(conn, "auditor", list(Scope))).plaintext
    url = api_process.url
    body = json.dumps(track_body("AUDIT1", "stamps_com", 1)).encode()
    signed = {
        "Content-Type": "application/json",
        SECRET_HEADER: WEBHOOK_SECRET,
        "Authorization": f"Bearer {token}",
        "Cookie": "dashboard_session=not-a-session",
        **shipengine.simulator.keys.headers(body),
    }
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        # The happy paths, so that their lines are read too.
        subscribed = await http.post(
            f"{url}/v1/subscriptions",
            json={"carrier_code": "stamps_com", "tracking_number": "AUDIT1"},
            headers=bearer(token),
        )
        assert subscribed.status == 202
        assert (await http.post(f"{url}/v1/webhooks/shipengine", data=body, headers=signed)).ok
        login = await http.post(
            f"{url}/dashboard/login", data={"token": token}, allow_redirects=False
        )
        assert login.status == 303, await login.text()
        session_id = login.cookies["dashboard_session"].value

        # Refusals: a wrong secret, a secret that is not UTF-8, a token that is not UTF-8.
        wrong = {**signed, SECRET_HEADER: "not-" + WEBHOOK_SECRET}
        refused = await http.post(f"{url}/v1/webhooks/shipengine", data=body, headers=wrong)
        assert refused.status == 401
        status = await raw_post(
            url,
            "/v1/webhooks/shipengine",
            [
                *(
                    f"{name}: {value}".encode()
                    for name, value in signed.items()
                    if name != SECRET_HEADER
                ),
                SECRET_HEADER.encode() + b": " + WEBHOOK_SECRET.encode() + b"\xff\xfe",
            ],
            body,
        )
        assert status == 401
        status = await raw_post(
            url, "/v1/subscriptions", [b"Authorization: Bearer " + token.encode() + b"\xff"], b"{}"
        )
        assert status == 401
        # Control bytes the HTTP parser refuses: it quotes the whole header line in its error.
        for header in (
            b"Authorization: Bearer " + token.encode() + b"\x7f",
            b"Cookie: dashboard_session=" + session_id.encode() + b"\x01",
        ):
            assert await raw_post(url, "/v1/subscriptions", [header], b"{}") == 400

        # Failures behind a valid token, a valid signature and a live session: the tables they
        # need are gone, so each is an unexpected error, logged with its traceback.
        await execute(database_url, "ALTER TABLE subscriptions RENAME TO subscriptions_gone")
        listed = await http.get(f"{url}/v1/subscriptions", headers=bearer(token))
        assert listed.status == 500
        await execute(database_url, "ALTER TABLE subscriptions_gone RENAME TO subscriptions")
        await execute(database_url, "ALTER TABLE api_tokens RENAME TO api_tokens_gone")
        page = await http.get(f"{url}/dashboard/subscriptions", allow_redirects=False)
        assert page.status == 500
        await execute(database_url, "ALTER TABLE api_tokens_gone RENAME TO api_tokens")
        await execute(database_url, "ALTER TABLE webhook_deliveries RENAME TO deliveries_gone")
        again = json.dumps(track_body("AUDIT1", "stamps_com", 2)).encode()
        resent = {**signed, **shipengine.simulator.keys.headers(again)}
        failed = await http.post(f"{url}/v1/webhooks/shipengine", data=again, headers=resent)
        assert failed.status == 500
        await execute(database_url, "ALTER TABLE deliveries_gone RENAME TO webhook_deliveries")

    # The dispatcher, on a table that is gone, and then after the database ends its sessions.
    await execute(database_url, "ALTER TABLE dispatch_attempts RENAME TO attempts_gone")
    dispatcher = await DispatcherProcess.start(tmp_path / "dispatcher.log", secret_env)
    try:
        await eventually(lambda: _logged(dispatcher.log_path, '"level":"error"'), timeout_s=20)
    finally:
        await dispatcher.ensure_stopped()
        await execute(database_url, "ALTER TABLE attempts_gone RENAME TO dispatch_attempts")
    await api_process.terminate()

    lines = [
        line
        for log in (api_process.log_path, dispatcher.log_path)
        for line in log.read_text(errors="replace").splitlines()
    ]
    assert any('"level":"error"' in line for line in lines)  # the failures were logged
    # A request the parser refused is the sender's error: a line at INFO, not a traceback.
    assert not [line for line in lines if "Error handling request" in line]
    token_secret = token.rsplit("_", 1)[1]
    for line in lines:
        for secret in (PASSWORD, WEBHOOK_SECRET, f"API-Key: {API_KEY}", session_id):
            assert secret not in line, line
        assert token_secret[:12] not in line, line
    async with engine.connect() as conn:
        stored = await conn.scalar(
            sa.text("SELECT string_agg(headers::text, ' ') FROM webhook_deliveries")
        )
    for secret in (WEBHOOK_SECRET, token_secret[:12], "not-a-session"):
        assert secret not in (stored or ""), stored


async def _logged(log_path: Path, fragment: str) -> bool | None:
    text = await asyncio.to_thread(log_path.read_text, errors="replace")
    return True if fragment in text else None
