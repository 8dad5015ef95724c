"""API_WORKERS: several API processes on one port, started, stopped and failed as one."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.processes import ApiProcess


def workers_of(api: ApiProcess) -> list[int]:
    pid = api.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
async def api(tmp_path: Path, database_url: str) -> AsyncIterator[ApiProcess]:
    env = {"DATABASE_URL": database_url, "API_WORKERS": "2"}
    api = await ApiProcess.start(tmp_path / "api.log", env)
    yield api
    await api.ensure_stopped()


async def test_two_workers_serve_one_port_and_stop_together(api: ApiProcess) -> None:
    workers = workers_of(api)
    assert len(workers) == 2
    async with aiohttp.ClientSession() as session:
        for _ in range(20):  # a new connection each time: the kernel picks a worker
            async with session.get(f"{api.url}/healthz", headers={"Connection": "close"}) as got:
                assert got.status == 200
    assert await api.terminate() == 0
    assert not any(alive(pid) for pid in workers)


async def test_a_worker_that_dies_takes_the_others_down_with_a_failure(api: ApiProcess) -> None:
    first, second = workers_of(api)
    os.kill(first, signal.SIGKILL)
    assert await api.process.wait() != 0
    assert not alive(second)  # the parent stopped and reaped it before exiting
