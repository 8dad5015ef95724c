"""Real dispatcher processes for fault tests: started, killed, signalled, read."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.waiting import eventually

REPOSITORY = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def log_events(log_path: Path, name: str) -> list[dict[str, Any]]:
    """The JSON log lines of event `name`, in order."""
    found = []
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == name:
            found.append(record)
    return found


class DispatcherProcess:
    """`python -m service dispatcher` as its own OS process, its JSON log in a file."""

    def __init__(self, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    @classmethod
    async def start(cls, log_path: Path, env: dict[str, str]) -> DispatcherProcess:
        full_env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "LOG_LEVEL": "INFO", **env}
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "service", "dispatcher",
                env=full_env, stdout=log, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        started = cls(process, log_path)
        await eventually(started._has_started, timeout_s=30)
        return started

    async def _has_started(self) -> bool | None:
        if self.process.returncode is not None:
            raise AssertionError(f"dispatcher exited early:\n{self.log_path.read_text()}")
        return True if self.events("dispatcher.started") else None

    def events(self, name: str) -> list[dict[str, Any]]:
        return log_events(self.log_path, name)

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as when a machine or the OOM killer takes it."""
        self.process.kill()

    async def terminate(self, timeout_s: float = 30) -> int:
        """SIGTERM, as an orchestrator stops it; returns the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), timeout_s)

    async def ensure_stopped(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


class ApiProcess:
    """`python -m service api` on a loopback port, its JSON log in a file."""

    def __init__(self, process: asyncio.subprocess.Process, url: str, log_path: Path) -> None:
        self.process = process
        self.url = url
        self.log_path = log_path

    @classmethod
    async def start(cls, log_path: Path, env: dict[str, str]) -> ApiProcess:
        port = free_port()
        full_env = {
            **os.environ,
            "PYTHONPATH": str(REPOSITORY),
            "HOST": "127.0.0.1",
            "PORT": str(port),
            **env,
        }
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "service", "api",
                env=full_env, stdout=log, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        started = cls(process, f"http://127.0.0.1:{port}", log_path)
        await eventually(started._answers, timeout_s=30)
        return started

    def events(self, name: str) -> list[dict[str, Any]]:
        return log_events(self.log_path, name)

    async def _answers(self) -> bool | None:
        if self.process.returncode is not None:
            raise AssertionError(f"api exited early:\n{self.log_path.read_text()}")
        try:
            async with aiohttp.ClientSession() as session, session.get(f"{self.url}/readyz") as got:
                return True if got.status == 200 else None
        except aiohttp.ClientError:
            return None

    async def terminate(self, timeout_s: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), timeout_s)

    async def ensure_stopped(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
