"""/v1/endpoints: the registry of notification endpoints (issue 17, its first part)."""

from __future__ import annotations

import base64
import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api import endpoints as endpoints_api
from service.api.endpoints import EndpointOut, EndpointWithSecret
from service.db.tables import notify_endpoints
from service.db.tokens import create_token
from service.domain.access import Scope
from service.domain.changes import ChangeType
from service.domain.endpoints import UrlRefused, new_secret, parse_url
from service.settings import Settings
from tests.conftest import AppWith, bearer

Client = TestClient[web.Request, web.Application]
URL = "https://consumer.example.test/hooks"
# What the fake resolver answers: every other name resolves to a private address, as an
# internal consumer's would.
RESOLVES = {"metadata.example.test": ["10.0.0.9", "169.254.169.254"]}
REAL_RESOLVE = endpoints_api.resolve


@pytest.fixture(autouse=True)
def resolver(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No DNS in these tests: names resolve as RESOLVES says; returns the names looked up."""
    looked_up: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        looked_up.append(host)
        return RESOLVES.get(host, ["10.0.0.7"])

    monkeypatch.setattr(endpoints_api, "resolve", resolve)
    return looked_up


async def token_of(engine: AsyncEngine, client: str, *scopes: Scope) -> dict[str, str]:
    async with engine.begin() as conn:
        issued = await create_token(conn, client, scopes)
    return bearer(issued.plaintext)


async def create(
    api: Client, status: int = 201, headers: dict[str, str] | None = None, **body: Any
) -> dict[str, Any]:
    answer = await api.post("/v1/endpoints", json={"url": URL, **body}, headers=headers)
    assert answer.status == status, await answer.text()
    assert answer.content_type == "application/json"
    found: dict[str, Any] = await answer.json()
    return found


def assert_a_secret(secret: str) -> None:
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) >= 24


async def test_creating_an_endpoint_shows_its_secret_once_and_never_again(api: Client) -> None:
    made = await create(api, description="orders", rate_limit_per_s=5)
    EndpointWithSecret.model_validate(made)
    assert_a_secret(made["secret"])
    assert made["url"] == URL
    assert made["state"] == "enabled"
    assert made["created_by"] == "tests"
    assert made["all_clients"] is False
    assert made["types"] is None  # every type, those added later too
    assert (made["description"], made["rate_limit_per_s"]) == ("orders", 5)

    path = f"/v1/endpoints/{made['id']}"
    shown = await (await api.get(path)).json()
    listed = (await (await api.get("/v1/endpoints")).json())["items"]
    patched = await (await api.patch(path, json={"description": "parcels"})).json()
    for answer in (shown, *listed, patched):
        assert "secret" not in answer
        assert "previous_secret" not in answer
        assert made["secret"] not in str(answer)
        EndpointOut.model_validate(answer)
    assert [item["id"] for item in listed] == [made["id"]]
    assert patched["description"] == "parcels"


async def test_another_clients_endpoint_is_invisible_and_an_ops_token_sees_every_one(
    api: Client, engine: AsyncEngine
) -> None:
    alice = await token_of(engine, "alice", Scope.WRITE)
    bob = await token_of(engine, "bob", Scope.WRITE)
    ops = await token_of(engine, "oncall", Scope.OPS)
    mine = await create(api, headers=alice)
    path = f"/v1/endpoints/{mine['id']}"

    assert (await api.get(path, headers=bob)).status == 404
    assert (await (await api.get("/v1/endpoints", headers=bob)).json())["items"] == []
    for method, suffix, body in (
        ("PATCH", "", {"description": "mine now"}),
        ("POST", "/rotate-secret", None),
        ("POST", "/enable", None),
        ("DELETE", "", None),
    ):
        answer = await api.request(method, path + suffix, json=body, headers=bob)
        assert answer.status == 404, (method, suffix)
    assert (await api.get(path, headers=alice)).status == 200  # untouched by bob

    theirs = await create(api, headers=bob)
    seen = (await (await api.get("/v1/endpoints", headers=ops)).json())["items"]
    assert {item["id"] for item in seen} == {mine["id"], theirs["id"]}
    assert (await api.get(path, headers=ops)).status == 200


async def test_all_clients_needs_an_ops_token(api: Client, engine: AsyncEngine) -> None:
    writer = await token_of(engine, "alice", Scope.WRITE)
    refused = await create(api, 403, headers=writer, all_clients=True)
    assert refused["errors"][0]["error_code"] == "forbidden"
    assert (await (await api.get("/v1/endpoints", headers=writer)).json())["items"] == []
    assert (await create(api, all_clients=True))["all_clients"] is True  # `api`: every scope
    await create(api, 422, all_clients="yes")  # a boolean, not something like one


async def test_types_are_change_types_and_absent_means_every_one(api: Client) -> None:
    wanted = [ChangeType.STATUS_CHANGED.value, ChangeType.ACTIVE.value, ChangeType.ACTIVE.value]
    made = await create(api, types=wanted)
    assert made["types"] == ["subscription.active", "tracking.status_changed"]
    unknown = await create(api, 422, types=["tracking.teleported"])
    assert unknown["errors"][0]["field_name"].startswith("types")
    await create(api, 422, types=[])  # nothing at all: null means every type
    path = f"/v1/endpoints/{made['id']}"
    assert (await (await api.patch(path, json={"types": None})).json())["types"] is None
    assert (await api.patch(path, json={"types": ["nope"]})).status == 422


@pytest.mark.parametrize(
    "url",
    [
        "ftp://consumer.example.test/hooks",
        "consumer.example.test/hooks",
        "https:///hooks",
        "https://user:pass@consumer.example.test/hooks",
        "https://user@consumer.example.test/hooks",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/hooks",
        "http://[::ffff:169.254.169.254]/",
        "http://2852039166/",  # 169.254.169.254, as inet_aton reads it
        "http://[64:ff9b::a9fe:a9fe]/",  # the same through NAT64
        "http://[2002:a9fe:a9fe::1]/",  # through 6to4
        "http://[::a9fe:a9fe]/",  # IPv4-compatible
        "https://consumer.example.test:99999/",
        "https://consumer.example.test:0/",
        "https://metadata.example.test/hooks",  # resolves to 169.254.169.254
    ],
)
async def test_urls_are_refused_with_422_unless_plain_http_to_a_safe_host(
    api: Client, url: str
) -> None:
    refused = await create(api, 422, url=url)
    assert refused["errors"][0]["field_name"] == "url"
    assert (await (await api.get("/v1/endpoints")).json())["items"] == []


async def test_a_changed_url_is_checked_as_a_new_one_is(api: Client, resolver: list[str]) -> None:
    made = await create(api)
    path = f"/v1/endpoints/{made['id']}"
    for url in ("https://metadata.example.test/", "http://169.254.169.254/", None):
        assert (await api.patch(path, json={"url": url})).status == 422, url
    assert "metadata.example.test" in resolver
    changed = await api.patch(path, json={"url": "https://other.example.test/in"})
    assert (await changed.json())["url"] == "https://other.example.test/in"


async def test_with_allowed_hosts_set_any_other_host_is_refused(
    live_settings: Settings, app_with: AppWith, token: str
) -> None:
    settings = dataclasses.replace(live_settings, notify_allowed_hosts=("hooks.example.test",))
    api = await app_with(settings)
    headers = bearer(token)
    await create(api, 422, headers=headers, url="https://elsewhere.example.test/")
    await create(api, 422, headers=headers, url="https://10.0.0.7/")
    made = await create(api, headers=headers, url="https://HOOKS.example.test./in")
    assert made["url"] == "https://HOOKS.example.test./in"
    path = f"/v1/endpoints/{made['id']}"
    patched = await api.patch(path, json={"url": "https://x.example.test/"}, headers=headers)
    assert patched.status == 422


async def test_rotating_the_secret_keeps_the_previous_one_for_a_day(
    api: Client, engine: AsyncEngine
) -> None:
    made = await create(api)
    answer = await api.post(f"/v1/endpoints/{made['id']}/rotate-secret")
    assert answer.status == 201
    rotated = await answer.json()
    assert_a_secret(rotated["secret"])
    assert rotated["secret"] != made["secret"]

    async with engine.connect() as conn:
        query = sa.select(notify_endpoints).where(notify_endpoints.c.id == uuid.UUID(made["id"]))
        row = (await conn.execute(query)).mappings().one()
    assert (row["secret"], row["previous_secret"]) == (rotated["secret"], made["secret"])
    ahead = row["previous_secret_expires_at"] - datetime.now(UTC)
    assert timedelta(hours=23, minutes=59) < ahead <= timedelta(hours=24)
    shown = await (await api.get(f"/v1/endpoints/{made['id']}")).json()
    assert shown["previous_secret_expires_at"] is not None
    assert made["secret"] not in str(shown)
    assert rotated["secret"] not in str(shown)


async def test_enable_re_enables_a_disabled_endpoint(api: Client, engine: AsyncEngine) -> None:
    made = await create(api)
    async with engine.begin() as conn:
        await conn.execute(
            sa.update(notify_endpoints).values(state="disabled", disabled_reason="410 Gone")
        )
    shown = await (await api.get(f"/v1/endpoints/{made['id']}")).json()
    assert (shown["state"], shown["disabled_reason"]) == ("disabled", "410 Gone")
    answer = await api.post(f"/v1/endpoints/{made['id']}/enable")
    assert answer.status == 200
    enabled = await answer.json()
    assert (enabled["state"], enabled["disabled_reason"]) == ("enabled", None)


async def test_a_deleted_endpoint_is_gone(api: Client) -> None:
    made = await create(api)
    path = f"/v1/endpoints/{made['id']}"
    deleted = await api.delete(path)
    assert deleted.status == 204
    assert await deleted.read() == b""
    assert (await api.get(path)).status == 404
    assert (await api.delete(path)).status == 404
    assert (await api.get("/v1/endpoints/not-a-uuid")).status == 404


@pytest.mark.parametrize(
    ("data", "content_type", "status"),
    [
        (b"not json", "application/json", 400),
        (b'{"url": "https://\xff\xfe.example.test/"}', "application/json", 400),
        (b"\xff\xfe\xfd", "application/json", 400),
        (b"", "application/json", 400),
        (b"[]", "application/json", 422),
        (b'{"url": "https://consumer.example.test/", "extra": 1}', "application/json", 422),
        (b'{"url": "https://consumer.example.test/\\u0000"}', "application/json", 422),
        (b'{"url": "https://x.example.test/", "rate_limit_per_s": 0}', "application/json", 422),
        # Slower than one in 100 s: its spacing once overflowed a datetime and stopped every send.
        (b'{"url": "https://x.example.test/", "rate_limit_per_s": 1e-12}', "application/json", 422),
        (b'{"url": "https://x.example.test/", "rate_limit_per_s": 1e400}', "application/json", 422),
        (b'{"url": "https://x.example.test/", "description": 5}', "application/json", 422),
        (b'{"url": "https://consumer.example.test/"}', "text/plain", 415),
        (('{"url": "https://consumer.example.test/' + "a" * 2048 + '"}').encode(), None, 422),
        ('{"url": "https://bücher.example.test/"}'.encode(), "application/json", 422),
    ],
)
async def test_bad_bodies_are_answered_4xx_in_json_never_500(
    api: Client, data: bytes, content_type: str | None, status: int
) -> None:
    headers = {"Content-Type": content_type or "application/json"}
    answer = await api.post("/v1/endpoints", data=data, headers=headers)
    assert answer.status == status, await answer.text()
    assert answer.content_type == "application/json"
    assert (await answer.json())["errors"]


@pytest.mark.parametrize(
    "body",
    [b"not json", b"\xff\xfe", b'{"secret": "whsec_mine"}', b'{"url": 5}', b'{"url": "x"}'],
)
async def test_bad_changes_are_answered_4xx_in_json_and_change_nothing(
    api: Client, body: bytes
) -> None:
    made = await create(api)
    path = f"/v1/endpoints/{made['id']}"
    answer = await api.patch(path, data=body, headers={"Content-Type": "application/json"})
    assert 400 <= answer.status < 500
    assert (await answer.json())["errors"]
    assert (await (await api.get(path)).json())["url"] == URL


def test_secrets_are_standard_webhooks_secrets_and_never_repeat() -> None:
    secrets = {new_secret() for _ in range(100)}
    assert len(secrets) == 100
    for secret in secrets:
        assert_a_secret(secret)


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("https://Consumer.Example.test./in", "consumer.example.test", 443),
        ("http://10.1.2.3:8080/in", "10.1.2.3", 8080),
        ("http://[2001:db8::1]/in", "2001:db8::1", 80),
        ("http://127.0.0.1:9000/", "127.0.0.1", 9000),  # `make run`'s local consumer
    ],
)
def test_urls_an_endpoint_may_have(url: str, host: str, port: int) -> None:
    parsed = parse_url(url)
    assert (parsed.url, parsed.host, parsed.port) == (url, host, port)


def test_allowed_hosts_are_compared_without_case_or_trailing_dot() -> None:
    assert parse_url("https://Hooks.example.test/", ["hooks.example.test."]).host
    with pytest.raises(UrlRefused, match="NOTIFY_ALLOWED_HOSTS"):
        parse_url("https://hooks.example.test.evil.test/", ["hooks.example.test"])


async def test_the_real_resolver_answers_addresses_and_never_raises() -> None:
    resolve = REAL_RESOLVE  # the autouse fixture replaced the module's
    assert await resolve("127.0.0.1", 80) == ["127.0.0.1"]
    assert await resolve("a" * 64 + ".invalid", 80) == []  # a label too long for IDNA
    assert await resolve("nothing.invalid", 80) == []
