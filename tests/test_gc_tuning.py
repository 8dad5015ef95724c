"""Server processes keep the cyclic collector's pauses short (`process/gc_tuning.py` says why)."""

from __future__ import annotations

from pathlib import Path

from service.process.gc_tuning import YOUNG_GENERATION_THRESHOLD
from tests.conftest import RunningSimulator
from tests.processes import ApiProcess, DispatcherProcess


def assert_tuned(events: list[dict[str, object]]) -> None:
    (tuned,) = events
    assert isinstance(tuned["frozen_objects"], int)
    assert tuned["frozen_objects"] > 10_000  # the imported libraries', at the least
    assert tuned["thresholds"] == [YOUNG_GENERATION_THRESHOLD, 10, 10]


async def test_the_api_and_the_dispatcher_freeze_what_start_up_made(
    tmp_path: Path, database_url: str, shipengine: RunningSimulator
) -> None:
    env = {
        "DATABASE_URL": database_url,
        "SHIPENGINE_BASE_URL": shipengine.url,
        "SHIPENGINE_API_KEY": "TEST_gc",
    }
    api = await ApiProcess.start(tmp_path / "api.log", env)
    try:
        assert_tuned(api.events("gc.tuned_for_serving"))
    finally:
        await api.ensure_stopped()
    dispatcher = await DispatcherProcess.start(tmp_path / "dispatcher.log", env)
    try:
        assert_tuned(dispatcher.events("gc.tuned_for_serving"))
    finally:
        await dispatcher.ensure_stopped()
