"""Waiting on an event with a timeout, as every background loop here does."""

from __future__ import annotations

import asyncio


async def wait_set(event: asyncio.Event, timeout_s: float) -> bool:
    """Whether `event` was set within `timeout_s` (a negative timeout: look once)."""
    try:
        await asyncio.wait_for(event.wait(), max(timeout_s, 0.0))
    except TimeoutError:
        return False
    return True
