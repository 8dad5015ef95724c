"""Dashboard sessions in PostgreSQL: shared by API processes, hashed, expiring, bounded, and
ended with their token."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.app import create_app
from service.dashboard.access import Holder, Viewer
from service.dashboard.sessions import Session
from service.db import dashboard_sessions as store
from service.db.tables import api_tokens, dashboard_sessions
from service.db.tokens import create_token, revoke_token
from service.domain.access import IssuedToken, Scope
from service.settings import Settings
from tests.test_dashboard import log_in

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def other_process(live_settings: Settings) -> AsyncIterator[Client]:
    """A second API process on the same database, as behind a load balancer (or a restart)."""
    async with TestClient(TestServer(create_app(live_settings))) as client:
        yield client


async def issue(engine: AsyncEngine, *scopes: Scope) -> IssuedToken:
    async with engine.begin() as conn:
        return await create_token(conn, "ops-alice", scopes or (Scope.OPS,))


def session_cookie(api: Client) -> str:
    cookies = api.session.cookie_jar.filter_cookies(api.make_url("/dashboard"))
    return cookies["dashboard_session"].value


async def rows(engine: AsyncEngine) -> list[sa.RowMapping]:
    async with engine.connect() as conn:
        return list((await conn.execute(sa.select(dashboard_sessions))).mappings())


async def test_a_session_opened_on_one_process_is_known_to_another(
    api: Client, other_process: Client, token: str
) -> None:
    await log_in(api, token)
    cookie = {"Cookie": f"dashboard_session={session_cookie(api)}"}
    response = await other_process.get("/dashboard", headers=cookie, allow_redirects=False)
    assert response.status == 200
    assert "tests" in await response.text()


async def test_the_table_holds_the_ids_hash_never_the_id(
    api: Client, engine: AsyncEngine, token: str
) -> None:
    await log_in(api, token)
    session_id = session_cookie(api)
    [row] = await rows(engine)
    assert bytes(row["id_sha256"]) == hashlib.sha256(session_id.encode()).digest()
    assert session_id not in repr(dict(row))
    assert row["token_id"] == token.split("_")[1]


async def test_logging_out_deletes_the_row(api: Client, engine: AsyncEngine, token: str) -> None:
    csrf = await log_in(api, token)
    assert len(await rows(engine)) == 1
    await api.post("/dashboard/logout", data={"csrf": csrf}, allow_redirects=False)
    assert await rows(engine) == []


async def test_logging_in_again_replaces_the_browsers_session(
    api: Client, engine: AsyncEngine, token: str
) -> None:
    await log_in(api, token)
    first = session_cookie(api)
    await log_in(api, token)
    assert session_cookie(api) != first
    assert len(await rows(engine)) == 1


async def test_an_expired_session_is_no_session(
    api: Client, engine: AsyncEngine, token: str
) -> None:
    await log_in(api, token)
    async with engine.begin() as conn:
        await conn.execute(
            sa.update(dashboard_sessions).values(
                expires_at=sa.func.now() - sa.text("'1s'::interval")
            )
        )
    response = await api.get("/dashboard", allow_redirects=False)
    assert response.status == 303
    assert response.headers["Location"] == "/dashboard/login?next=/dashboard&ended=1"


async def test_an_unknown_id_of_the_right_shape_is_a_stranger(api: Client) -> None:
    response = await api.get(
        "/dashboard", headers={"Cookie": "dashboard_session=" + "A" * 43}, allow_redirects=False
    )
    assert response.status == 303
    assert "ended=1" in response.headers["Location"]


async def test_deleting_a_token_deletes_its_sessions(engine: AsyncEngine) -> None:
    alice = await issue(engine)
    async with engine.begin() as conn:
        await store.open_session(conn, alice.token_id)
        await conn.execute(sa.delete(api_tokens).where(api_tokens.c.token_id == alice.token_id))
    assert await rows(engine) == []


async def test_a_lookup_sees_neither_expired_nor_revoked_sessions(engine: AsyncEngine) -> None:
    alice = await issue(engine, Scope.READ)
    async with engine.begin() as conn:
        live = await store.open_session(conn, alice.token_id)
        found = await store.find_session(conn, live.session_id)
        assert found is not None
        assert (found["client"], found["scopes"], found["csrf_token"]) == (
            "ops-alice",
            ["subscriptions:read"],
            live.csrf,
        )
        assert found["expires_at"] > datetime.now(UTC)
        assert await store.find_session(conn, live.session_id + "x") is None
        await revoke_token(conn, alice.token_id)
        assert await store.find_session(conn, live.session_id) is None


async def test_opening_a_session_sweeps_a_bounded_batch_of_dead_ones(engine: AsyncEngine) -> None:
    alice, bob = await issue(engine), await issue(engine)
    async with engine.begin() as conn:
        for _ in range(3):  # expired (and not swept as they are made)
            await store.open_session(conn, alice.token_id, ttl=-store.SESSION_TTL, sweep_batch=0)
        revoked = await store.open_session(conn, bob.token_id, sweep_batch=0)
        await revoke_token(conn, bob.token_id)
    async with engine.begin() as conn:
        await store.open_session(conn, alice.token_id, sweep_batch=2)
    assert len(await rows(engine)) == 4 - 2 + 1
    async with engine.begin() as conn:
        assert await store.sweep(conn) == 2
        assert await store.find_session(conn, revoked.session_id) is None
    assert len(await rows(engine)) == 1


async def test_a_token_keeps_only_its_newest_sessions(engine: AsyncEngine) -> None:
    alice = await issue(engine)
    opened = []
    for _ in range(4):
        async with engine.begin() as conn:
            opened.append(await store.open_session(conn, alice.token_id, max_per_token=2))
    async with engine.connect() as conn:
        kept = [await store.find_session(conn, o.session_id) is not None for o in opened]
    assert kept == [False, False, True, True]


async def test_a_flash_is_shown_once_even_by_another_process(
    api: Client, other_process: Client, engine: AsyncEngine, token: str
) -> None:
    csrf = await log_in(api, token)
    done = await api.post(
        "/dashboard/failures/retry",
        data={"csrf": csrf, "error_code": "invalid_identifier"},
        allow_redirects=False,
    )
    assert done.status == 303
    cookie = {"Cookie": f"dashboard_session={session_cookie(api)}"}
    shown = await other_process.get("/dashboard/failures", headers=cookie)
    assert "Retried 0 failed subscription(s)" in await shown.text()
    again = await api.get("/dashboard/failures")
    assert "Retried 0 failed subscription(s)" not in await again.text()
    [row] = await rows(engine)
    assert row["flash"] is None


async def test_a_flash_set_while_another_is_shown_is_kept(engine: AsyncEngine) -> None:
    alice = await issue(engine)
    async with engine.begin() as conn:
        opened = await store.open_session(conn, alice.token_id)
        await store.set_flash(conn, opened.session_id, "second")
        await store.clear_flash(conn, opened.session_id, "first")  # a page showed "first"
        found = await store.find_session(conn, opened.session_id)
    assert found is not None
    assert found["flash"] == "second"


def test_a_session_never_shows_its_id_or_csrf_token() -> None:
    session = Session("the-session-id", "abc123", "the-csrf-token", datetime.now(UTC), "hi")
    viewer = Viewer(session, Holder("abc123", "alice", frozenset({Scope.OPS})))
    opened = store.OpenedSession("the-session-id", "the-csrf-token")
    for shown in (repr(session), str(session), repr(viewer), f"{viewer}", repr(opened)):
        assert "the-session-id" not in shown
        assert "the-csrf-token" not in shown
        assert "***" in shown
    assert "abc123" in repr(session)  # the token's id is no secret: logs name it
