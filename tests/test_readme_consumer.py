"""README's change-feed consumer is run as written, against a real API: it must work."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import changes as feed
from service.domain.changes import ChangeType
from tests.test_change_feed import changes, subscribe

Client = TestClient[web.Request, web.Application]
README = Path(__file__).resolve().parents[1] / "README.md"


class Enough(Exception):
    """Ends the consumer's endless loop once it handled what the test made."""


def readme_consumer() -> Callable[..., None]:
    section = README.read_text().split("\n## Change feed\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert found is not None, "README's Change feed section has no Python consumer"
    namespace: dict[str, Any] = {}
    exec(found[1], namespace)  # noqa: S102 - README's own code, run as a reader would
    consume: Callable[..., None] = namespace["consume"]
    return consume


async def make_changes(api: Client, engine: AsyncEngine, count: int) -> None:
    made = [await subscribe(api, f"README-{uuid.uuid4().hex[:8]}") for _ in range(count)]
    async with engine.begin() as conn:
        await feed.note(conn, [(uuid.UUID(s), ChangeType.STALE) for s in made])


async def run(
    api: Client, token: str, cursor: str | None, wanted: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """README's consumer in a thread (it blocks, as written), until `wanted` changes."""
    handled: list[dict[str, Any]] = []
    saved: list[str] = []

    def handle(change: dict[str, Any]) -> None:
        handled.append(change)

    def save_cursor(position: str) -> None:
        saved.append(position)
        if len(handled) >= wanted:
            raise Enough

    base_url = str(api.make_url("")).rstrip("/")
    with contextlib.suppress(Enough):
        await asyncio.to_thread(readme_consumer(), base_url, token, cursor, handle, save_cursor)
    return handled, saved


async def test_the_readme_consumer_reads_every_change_and_resumes_from_its_cursor(
    api: Client, engine: AsyncEngine, token: str
) -> None:
    await make_changes(api, engine, 3)
    handled, saved = await run(api, token, None, 3)
    assert handled == await changes(api)

    await make_changes(api, engine, 1)
    more, _ = await run(api, token, saved[-1], 1)
    assert more == (await changes(api))[3:]
