"""Every /v1 call but ShipEngine's webhook needs a token; scopes decide what it may do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.app import create_app
from service.api.keys import SETTINGS
from service.db.tokens import create_token
from service.domain.access import Scope
from service.settings import Settings
from tests.conftest import bearer
from tests.processes import REPOSITORY

Client = TestClient[web.Request, web.Application]
PACKAGE = {"carrier_code": "ups", "tracking_number": "1Z999"}


@pytest.fixture
async def anonymous(live_settings: Settings) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(live_settings))) as client:
        yield client


@pytest.fixture
def token_with(engine: AsyncEngine) -> Callable[..., Awaitable[str]]:
    async def issue(*scopes: Scope, client: str = "checkout") -> str:
        async with engine.begin() as conn:
            return (await create_token(conn, client, scopes)).plaintext

    return issue


async def error_code(response: Any) -> str:
    code: str = (await response.json())["errors"][0]["error_code"]
    return code


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer", "Basic dXNlcjpwYXNz", "Bearer tt_nope", "Bearer tt_0123456789ab_wrong"],
)
async def test_without_a_valid_token_v1_answers_401(
    anonymous: Client, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    for method, path in [
        ("GET", "/v1/subscriptions"),
        ("POST", "/v1/subscriptions"),
        ("GET", "/v1/no-such-path"),
    ]:
        response = await anonymous.request(method, path, headers=headers)
        assert response.status == 401
        assert await error_code(response) == "unauthorized"


async def test_health_and_the_webhook_need_no_token(anonymous: Client) -> None:
    assert (await anonymous.get("/healthz")).status == 200
    # /metrics does: tests/test_metrics_access.py.
    assert (await anonymous.get("/metrics")).status == 401
    # The webhook has its own authentication: ShipEngine's signature.
    assert (await anonymous.post("/v1/webhooks/shipengine", json={})).status == 404


async def test_scopes_decide_what_a_token_may_do(
    anonymous: Client, token_with: Callable[..., Awaitable[str]]
) -> None:
    reader = bearer(await token_with(Scope.READ, client="dashboard"))
    writer = bearer(await token_with(Scope.WRITE))
    created = await anonymous.post("/v1/subscriptions", json=PACKAGE, headers=writer)
    assert created.status == 202
    path = f"/v1/subscriptions/{(await created.json())['id']}"

    assert (await anonymous.get(path, headers=reader)).status == 200
    assert (await anonymous.get(path, headers=writer)).status == 200
    denied = await anonymous.post("/v1/subscriptions", json=PACKAGE, headers=reader)
    assert denied.status == 403
    assert await error_code(denied) == "forbidden"
    assert (await anonymous.delete(path, headers=reader)).status == 403
    assert (await anonymous.post(f"{path}/retry", headers=writer)).status == 403
    assert (await anonymous.post("/v1/webhooks/deliveries/1/replay", headers=writer)).status == 403


async def test_subscriptions_record_their_creator_and_can_be_filtered_by_it(
    anonymous: Client, token_with: Callable[..., Awaitable[str]]
) -> None:
    checkout = bearer(await token_with(Scope.WRITE, client="checkout"))
    returns = bearer(await token_with(Scope.WRITE, client="returns"))
    mine = await (await anonymous.post("/v1/subscriptions", json=PACKAGE, headers=checkout)).json()
    await anonymous.post(
        "/v1/subscriptions", json={**PACKAGE, "tracking_number": "OTHER"}, headers=returns
    )
    assert mine["created_by"] == "checkout"
    listed = await (
        await anonymous.get("/v1/subscriptions?created_by=checkout", headers=checkout)
    ).json()
    assert [item["id"] for item in listed["items"]] == [mine["id"]]


def cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url, "PYTHONPATH": str(REPOSITORY)}
    return subprocess.run(
        [sys.executable, "-m", "service", "tokens", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_tokens_are_created_listed_and_revoked_with_the_cli(
    anonymous: Client, database_url: str
) -> None:
    created = cli(database_url, "create", "--client", "ops-alice", "--scope", "ops", "--json")
    assert created.returncode == 0, created.stderr
    issued = json.loads(created.stdout)
    headers = bearer(issued["token"])
    assert (await anonymous.get("/v1/subscriptions", headers=headers)).status == 200

    listed = json.loads(cli(database_url, "list", "--json").stdout)
    assert [(t["token_id"], t["client"], t["scopes"]) for t in listed] == [
        (issued["token_id"], "ops-alice", ["ops"])
    ]
    assert issued["token"] not in cli(database_url, "list").stdout

    assert cli(database_url, "revoke", issued["token_id"]).returncode == 0
    assert cli(database_url, "revoke", issued["token_id"]).returncode == 3
    # A fresh API process (no cached verdict) refuses the revoked token at once.
    fresh = TestClient(TestServer(create_app(anonymous.app[SETTINGS])))
    async with fresh:
        assert (await fresh.get("/v1/subscriptions", headers=headers)).status == 401
    assert cli(database_url, "create", "--client", "x", "--scope", "root").returncode == 2
