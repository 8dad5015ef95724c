"""`make run`'s promise: one command brings the whole product up, and Ctrl-C brings it down.

Runs `python -m service run` as a real process, with no DATABASE_URL (so with the embedded
PostgreSQL) and no SHIPENGINE_API_KEY (so with the simulator), as a newcomer would.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.processes import free_port
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(120)

REPOSITORY = Path(__file__).resolve().parents[1]


async def read_until(stream: asyncio.StreamReader, marker: str, seen: list[str]) -> None:
    while True:
        line = await stream.readline()
        if not line:
            raise AssertionError("the process ended before it was up:\n" + "".join(seen))
        seen.append(line.decode())
        if marker in seen[-1]:
            return


async def fetch_when(session: aiohttp.ClientSession, url: str, done: Any) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        async with session.get(url) as response:
            document: dict[str, Any] = await response.json()
        return document if done(document) else None

    return await eventually(probe, timeout_s=30)


async def test_run_brings_up_the_whole_product_and_stops_cleanly(tmp_path: Path) -> None:
    api_port, simulator_port, consumer_port = free_port(), free_port(), free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "SHIPENGINE_API_KEY", "SHIPENGINE_BASE_URL")
    }
    env |= {
        "PORT": str(api_port),
        "SIMULATOR_PORT": str(simulator_port),
        "SIMULATOR_PACE_S": "0.05",
        "LOCAL_CONSUMER_PORT": str(consumer_port),
        "PYTHONPATH": str(REPOSITORY),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "run",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    output: list[str] = []
    try:
        await asyncio.wait_for(read_until(process.stdout, "Ctrl-C stops", output), 60)
        printed = "".join(output)
        assert f"curl -s -X POST http://127.0.0.1:{api_port}/v1/subscriptions" in printed
        token = re.search(r"export TOKEN=(\S+)", printed)
        assert token is not None
        auth = {"Authorization": f"Bearer {token.group(1)}"}

        base = f"http://127.0.0.1:{api_port}"
        async with aiohttp.ClientSession(headers=auth) as session:
            body = {"carrier_code": "stamps_com", "tracking_number": "9405511899223197428490"}
            async with session.post(f"{base}/v1/subscriptions", json=body) as response:
                assert response.status == 202
                subscription_id = (await response.json())["id"]
            url = f"{base}/v1/subscriptions/{subscription_id}"
            delivered = await fetch_when(session, url, lambda s: s["status_code"] == "DE")
            assert delivered["state"] == "active"
            # The local consumer is told, its signature checked, and prints it.
            assert f"http://127.0.0.1:{consumer_port}/notifications" in printed
            told = "local consumer: tracking.status_changed 9405511899223197428490 DE (chg_"
            await asyncio.wait_for(read_until(process.stdout, told, output), 30)
            assert "bad signature" not in "".join(output)
            async with session.get(f"{url}/events") as response:
                assert len((await response.json())["items"]) >= 4
            # The printed token scrapes /metrics, as printed.
            assert f'curl -s {base}/metrics -H "Authorization: Bearer $TOKEN"' in printed
            async with session.get(f"{base}/metrics") as response:
                assert response.status == 200
            # Plain HTTP: the dashboard's cookie is not Secure, or no browser would send it back.
            login = {"token": token.group(1)}
            async with session.post(
                f"{base}/dashboard/login", data=login, allow_redirects=False
            ) as response:
                assert response.status == 303
                cookie = response.headers["Set-Cookie"]
                assert "dashboard_session=" in cookie
                assert "Secure" not in cookie
        assert (tmp_path / ".data" / "postgres").is_dir()
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
        drained = asyncio.create_task(process.stdout.read())
        returncode = await asyncio.wait_for(process.wait(), 30)
        output.append((await drained).decode())
    assert returncode == 0, "".join(output)
