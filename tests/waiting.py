"""Waiting on facts another process makes true, with a deadline instead of a guessed sleep."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

POLL_S = 0.02


async def eventually(probe: Callable[[], Awaitable[T | None]], timeout_s: float = 10.0) -> T:
    """The first non-None result of `probe`, polled until `timeout_s` runs out."""
    async with asyncio.timeout(timeout_s):
        while True:
            found = await probe()
            if found is not None:
                return found
            await asyncio.sleep(POLL_S)
