"""/metrics only to a bearer token with the `metrics` scope, and that scope opens nothing else."""

from __future__ import annotations

import argparse
import dataclasses
import enum
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.app import create_app
from service.api.metrics_access import DatabaseAway, ScrapeAccess
from service.cli.tokens import add_parser
from service.db.engine import create_engine
from service.db.tokens import create_token, revoke_token
from service.domain.access import IssuedToken, Scope, read_token
from service.settings import Settings
from tests.conftest import bearer
from tests.processes import free_port
from tests.raw_http import exchange

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def anonymous(live_settings: Settings) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(live_settings))) as client:
        yield client


@pytest.fixture
def issue(engine: AsyncEngine) -> Callable[..., Awaitable[IssuedToken]]:
    async def issue(*scopes: Scope, client: str = "prometheus") -> IssuedToken:
        async with engine.begin() as conn:
            return await create_token(conn, client, scopes)

    return issue


async def error_code(response: object) -> str:
    code: str = (await response.json())["errors"][0]["error_code"]  # type: ignore[attr-defined]
    return code


async def test_metrics_need_a_token_with_the_metrics_scope(
    anonymous: Client, issue: Callable[..., Awaitable[IssuedToken]]
) -> None:
    nobody = await anonymous.get("/metrics")
    assert nobody.status == 401
    assert await error_code(nobody) == "unauthorized"
    unknown = await anonymous.get("/metrics", headers=bearer("tt_0123456789ab_wrong"))
    assert unknown.status == 401
    ops = await issue(Scope.OPS, Scope.READ, Scope.WRITE, client="ops")
    refused = await anonymous.get("/metrics", headers=bearer(ops.plaintext))
    assert refused.status == 403
    assert await error_code(refused) == "forbidden"

    prometheus = await issue(Scope.METRICS)
    scraped = await anonymous.get("/metrics", headers=bearer(prometheus.plaintext))
    assert scraped.status == 200
    assert scraped.headers["Content-Type"].startswith("text/plain")
    assert "tracking_http_requests_total" in await scraped.text()


async def test_a_revoked_metrics_token_is_refused_at_once(
    anonymous: Client, engine: AsyncEngine, issue: Callable[..., Awaitable[IssuedToken]]
) -> None:
    prometheus = await issue(Scope.METRICS)
    assert (await anonymous.get("/metrics", headers=bearer(prometheus.plaintext))).status == 200
    async with engine.begin() as conn:
        assert await revoke_token(conn, prometheus.token_id)
    assert (await anonymous.get("/metrics", headers=bearer(prometheus.plaintext))).status == 401


async def test_the_metrics_scope_opens_nothing_else(
    anonymous: Client, issue: Callable[..., Awaitable[IssuedToken]]
) -> None:
    prometheus = bearer((await issue(Scope.METRICS)).plaintext)
    for method, path in [
        ("GET", "/v1/subscriptions"),
        ("GET", "/v1/ops/summary"),
        ("GET", "/v1/openapi.json"),
        ("POST", "/v1/subscriptions"),
    ]:
        response = await anonymous.request(method, path, headers=prometheus)
        assert response.status == 403, path
    token = prometheus["Authorization"].removeprefix("Bearer ")
    login = await anonymous.post("/dashboard/login", data={"token": token})
    assert login.status == 401
    assert "has no scope" in await login.text()


async def test_a_non_utf8_authorization_header_is_no_token(anonymous: Client) -> None:
    assert anonymous.server.port is not None
    sent = await exchange(
        anonymous.server.host,
        anonymous.server.port,
        b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer tt_\xff\xfe_\xc3\x28\r\nConnection: close\r\n\r\n",
    )
    answer = sent.head + sent.body
    assert answer.startswith(b"HTTP/1.1 401 "), answer


class Verdict(enum.Enum):
    GRANTED = enum.auto()
    UNKNOWN = enum.auto()
    UNAVAILABLE = enum.auto()


async def verdict(access: ScrapeAccess, engine: AsyncEngine, authorization: str) -> Verdict:
    """What /metrics makes of a token through `access`, with `engine` as its database."""
    presented = read_token(authorization)
    assert presented is not None
    try:
        found = await access.lookup(engine, presented)
    except DatabaseAway:
        return Verdict.UNAVAILABLE
    if found is None or not presented.matches(found.secret_sha256):
        return Verdict.UNKNOWN
    return Verdict.GRANTED


async def test_while_the_database_is_away_a_token_seen_good_still_scrapes(
    engine: AsyncEngine, issue: Callable[..., Awaitable[IssuedToken]]
) -> None:
    """The counters are what tells of the outage; anything not known good waits for it."""
    prometheus = await issue(Scope.METRICS)
    stranger = await issue(Scope.METRICS, client="never-scraped")
    access = ScrapeAccess()
    assert await verdict(access, engine, f"Bearer {prometheus.plaintext}") is Verdict.GRANTED

    away = create_engine(f"postgresql://nobody@127.0.0.1:{free_port()}/gone", pool_size=1)
    try:
        assert await verdict(access, away, f"Bearer {prometheus.plaintext}") is Verdict.GRANTED
        wrong_secret = f"Bearer tt_{prometheus.token_id}_wrong"
        assert await verdict(access, away, wrong_secret) is Verdict.UNAVAILABLE
        assert await verdict(access, away, f"Bearer {stranger.plaintext}") is Verdict.UNAVAILABLE

        # Once the database has said the token is revoked, the outage does not bring it back.
        async with engine.begin() as conn:
            await revoke_token(conn, prometheus.token_id)
        assert await verdict(access, engine, f"Bearer {prometheus.plaintext}") is Verdict.UNKNOWN
        assert await verdict(access, away, f"Bearer {prometheus.plaintext}") is Verdict.UNAVAILABLE
    finally:
        await away.dispose()


async def test_while_the_database_is_away_an_unknown_scraper_gets_503(
    live_settings: Settings, issue: Callable[..., Awaitable[IssuedToken]]
) -> None:
    prometheus = await issue(Scope.METRICS)
    away = dataclasses.replace(
        live_settings, database_url=f"postgresql://nobody@127.0.0.1:{free_port()}/gone"
    )
    async with TestClient(TestServer(create_app(away))) as client:
        response = await client.get("/metrics", headers=bearer(prometheus.plaintext))
        assert response.status == 503
        assert await error_code(response) == "database_unavailable"
        assert "Retry-After" in response.headers


def test_the_metrics_scope_can_be_issued_with_the_cli() -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tokens", "create", "--client", "prometheus", "--scope", "metrics"])
    assert args.scopes == ["metrics"]
