"""`python -m service ...` ops commands as real processes: output, --json, exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.dispatch import current_pause
from service.db.subscriptions import NewSubscription, create_subscription
from service.dispatcher.worker import Dispatcher
from tests.conftest import RunningSimulator
from tests.processes import REPOSITORY

Run = Callable[..., subprocess.CompletedProcess[str]]


def command(database_url: str, shipengine_url: str = "http://127.0.0.1:9") -> Run:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "SHIPENGINE_API_KEY": "TEST_simulator",
        "SHIPENGINE_BASE_URL": shipengine_url,
        "PYTHONPATH": str(REPOSITORY),
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return run


async def subscribe(engine: AsyncEngine, number: str) -> uuid.UUID:
    async with engine.begin() as conn:
        row, _ = await create_subscription(conn, NewSubscription("ups", number))
    subscription_id: uuid.UUID = row["id"]
    return subscription_id


async def in_thread(run: Run, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run, *args)


async def test_subscriptions_list_show_retry_cancel(
    engine: AsyncEngine,
    database_url: str,
    shipengine: RunningSimulator,
    make_dispatcher: Callable[..., Dispatcher],
) -> None:
    run = command(database_url)
    shipengine.simulator.script("BAD", status=400, error_code="invalid_identifier", times=1)
    bad = await subscribe(engine, "BAD")
    good = await subscribe(engine, "GOOD")
    await make_dispatcher().drain()

    listed = await in_thread(run, "subscriptions", "list", "--state", "failed", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [item["id"] for item in json.loads(listed.stdout)] == [str(bad)]
    shown_run = await in_thread(run, "subscriptions", "show", str(bad), "--json")
    assert shown_run.returncode == 0, shown_run.stderr
    shown = json.loads(shown_run.stdout)
    assert shown["last_error"]["errors"][0]["error_code"] == "invalid_identifier"
    assert "BAD" in (await in_thread(run, "subscriptions", "list")).stdout

    assert (await in_thread(run, "subscriptions", "retry", str(bad))).returncode == 0
    assert (await in_thread(run, "subscriptions", "retry", str(good))).returncode == 4
    assert (await in_thread(run, "subscriptions", "retry", str(uuid.uuid4()))).returncode == 3
    cancelled = await in_thread(run, "subscriptions", "cancel", str(good), "--json")
    assert json.loads(cancelled.stdout)["state"] == "stopping"
    assert (await in_thread(run, "subscriptions", "show", "not-a-uuid")).returncode == 2


async def test_dispatch_pause_resume_and_replay(engine: AsyncEngine, database_url: str) -> None:
    run = command(database_url)
    assert (await in_thread(run, "dispatch", "pause", "--reason", "carrier down")).returncode == 0
    async with engine.connect() as conn:
        pause = await current_pause(conn)
    assert pause is not None
    assert pause.kind == "manual"
    assert (await in_thread(run, "dispatch", "resume")).returncode == 0
    async with engine.connect() as conn:
        assert await current_pause(conn) is None

    assert (await in_thread(run, "deliveries", "replay", "--id", "12345")).returncode == 3
    dry = await in_thread(
        run, "deliveries", "replay", "--from", "2026-01-01T00:00:00+00:00",
        "--to", "2030-01-01T00:00:00+00:00", "--dry-run", "--json",
    )  # fmt: skip
    assert json.loads(dry.stdout) == {"dry_run": True, "matched": 0, "outcomes": {}}


async def test_register_webhook_creates_then_updates_the_track_webhook(
    database_url: str, shipengine: RunningSimulator
) -> None:
    run = command(database_url, shipengine.url)
    first = await in_thread(
        run, "register-webhook", "--url", "https://a.example/v1/webhooks/shipengine"
    )
    assert first.returncode == 0, first.stderr
    assert "created" in first.stdout
    second = await in_thread(
        run, "register-webhook", "--url", "https://b.example/hook", "--header", "X-Secret=s3"
    )
    assert "updated" in second.stdout
    (webhook,) = shipengine.simulator.webhooks
    assert webhook.url == "https://b.example/hook"
    unreachable = command(database_url, "http://127.0.0.1:9")
    assert (
        await in_thread(unreachable, "register-webhook", "--url", "https://x/y")
    ).returncode == 5
