"""Stateless processes scale out: 2 API and 2 dispatcher processes on one database.

Every subscription is dispatched once, every delivery is filed once, however the load is
spread, even when the same request reaches both API processes at the same moment.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import RunningSimulator, bearer
from tests.payloads import track_body
from tests.processes import ApiProcess, DispatcherProcess
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(150)

PACKAGES = [f"SCALE{n:03}" for n in range(60)]


async def count(engine: AsyncEngine, sql: str) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(sa.text(sql))).scalar_one())


async def test_two_apis_and_two_dispatchers_share_the_work(
    engine: AsyncEngine,
    database_url: str,
    token: str,
    shipengine: RunningSimulator,
    tmp_path: Path,
) -> None:
    env = {
        "DATABASE_URL": database_url,
        "SHIPENGINE_API_KEY": "TEST_simulator",
        "SHIPENGINE_BASE_URL": shipengine.url,
        "SHIPENGINE_RATE_LIMIT_PER_MINUTE": "0",
        "DISPATCH_POLL_INTERVAL_S": "0.5",
        "SHIPENGINE_TIMEOUT_S": "5",
        "DISPATCH_LEASE_S": "10",
    }
    processes: list[Any] = []
    try:
        apis = [await ApiProcess.start(tmp_path / f"api-{n}.log", env) for n in range(2)]
        processes += apis
        processes += [
            await DispatcherProcess.start(tmp_path / f"dispatcher-{n}.log", env) for n in range(2)
        ]
        async with aiohttp.ClientSession(headers=bearer(token)) as session:
            # Each subscription is asked of both APIs at once: one row, one start call.
            await asyncio.gather(
                *(
                    session.post(f"{api.url}/v1/subscriptions", json=body(number))
                    for number in PACKAGES
                    for api in apis
                )
            )
            await eventually(lambda: all_active(engine), timeout_s=60)
            # Each delivery reaches both APIs at once: filed once, kept once as a duplicate.
            deliveries = [
                (api, json.dumps(track_body(number, "ups", steps)).encode())
                for number, steps in itertools.product(PACKAGES, (1, 2))
                for api in apis
            ]
            answers = await asyncio.gather(
                *(deliver(session, api.url, raw, shipengine) for api, raw in deliveries)
            )
        assert sorted(set(answers)) == ["duplicate", "filed"]
        assert answers.count("filed") == len(PACKAGES) * 2
        starts = [c for c in shipengine.simulator.calls if c.path == "/v1/tracking/start"]
        assert sorted(c.query["tracking_number"] for c in starts) == PACKAGES
        assert await count(engine, "SELECT count(*) FROM subscriptions") == len(PACKAGES)
        assert await count(engine, "SELECT count(*) FROM tracking_events") == len(PACKAGES) * 2
        dispatched_by = [len(process.events("dispatch.call")) for process in processes[2:]]
        assert all(dispatched_by), dispatched_by  # both dispatchers took a share
        for process in processes:
            assert await process.terminate() == 0
    finally:
        for process in processes:
            await process.ensure_stopped()


def body(number: str) -> dict[str, str]:
    return {"carrier_code": "ups", "tracking_number": number}


async def all_active(engine: AsyncEngine) -> bool | None:
    active = await count(engine, "SELECT count(*) FROM subscriptions WHERE state = 'active'")
    return True if active == len(PACKAGES) else None


async def deliver(
    session: aiohttp.ClientSession, url: str, raw: bytes, shipengine: RunningSimulator
) -> str:
    headers = {"Content-Type": "application/json", **shipengine.simulator.keys.headers(raw)}
    async with session.post(f"{url}/v1/webhooks/shipengine", data=raw, headers=headers) as answer:
        assert answer.status == 200, await answer.text()
        outcome: str = (await answer.json())["outcome"]
        return outcome
