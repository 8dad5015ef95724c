"""Sampling a running process with py-spy, and reading the samples without other tools.

py-spy (`pip install py-spy` into the venv) attaches from outside, so the service runs exactly
as in production. The raw output is collapsed stacks, one `frame;frame;... count` per line;
`summarise` turns it into the functions where the time goes (self and inclusive shares).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from bench.infra import Processes, ServiceProcess

SAMPLES_PER_S = 200
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def py_spy() -> str | None:
    """The py-spy executable of this venv, or on PATH; None if it is not installed."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


async def record(
    procs: Processes, target: ServiceProcess, seconds: float, output: Path
) -> ServiceProcess | None:
    """Start sampling `target` for `seconds` (non-blocking: the target is never paused)."""
    executable = py_spy()
    if executable is None:
        return None
    argv = [
        executable, "record", "--pid", str(target.pid), "--duration", str(max(1, round(seconds))),
        "--rate", str(SAMPLES_PER_S), "--nonblocking", "--format", "raw", "--output", str(output),
    ]  # fmt: skip
    return await procs.start(f"py-spy-{target.name}", argv, {})


@dataclasses.dataclass(frozen=True)
class Hotspot:
    function: str
    self_share: float  # of the samples in which the process was busy
    total_share: float


@dataclasses.dataclass(frozen=True)
class Profile:
    busy_samples: int
    seconds: float
    hotspots: list[Hotspot]
    by_area: dict[str, float]  # share of busy samples whose leaf frame is in each area

    @property
    def busy_share(self) -> float:
        """Of the time sampled, how much the main thread was busy (not waiting in epoll)."""
        return self.busy_samples / (self.seconds * SAMPLES_PER_S) if self.seconds else 0.0


# A leaf frame is attributed to the first area whose package its file is in (py-spy names
# files relative to their sys.path entry: "sqlalchemy/sql/compiler.py", "service/db/...").
AREAS = (
    ("service", ("service/",)),
    ("sqlalchemy", ("sqlalchemy/",)),
    ("asyncpg", ("asyncpg/",)),
    ("aiohttp+yarl+multidict", ("aiohttp/", "yarl/", "multidict/")),
    ("logging (structlog, json)", ("structlog/", "json/", "logging/")),
    ("epoll wait", ("selectors.py",)),
    ("socket send (incl. preemption by the receiver)", ("asyncio/selector_events.py",)),
    ("asyncio", ("asyncio/",)),
)


def summarise(collapsed: Path, seconds: float, top: int = 15) -> Profile:
    self_counts: collections.Counter[str] = collections.Counter()
    total_counts: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    busy = 0
    for line in collapsed.read_text().splitlines():
        stack, _, raw_count = line.rpartition(" ")
        if not stack or not raw_count.isdigit():
            continue
        samples = int(raw_count)
        frames = [_short(frame) for frame in stack.split(";")]
        busy += samples
        self_counts[frames[-1]] += samples
        for frame in set(frames):
            total_counts[frame] += samples
        areas[_area(stack.split(";")[-1])] += samples
    hotspots = [
        Hotspot(frame, count / busy, total_counts[frame] / busy)
        for frame, count in self_counts.most_common(top)
    ]
    by_area = {area: count / busy for area, count in areas.most_common()} if busy else {}
    return Profile(busy, seconds, hotspots, by_area)


def inclusive(collapsed: Path, functions: list[str]) -> dict[str, float]:
    """For each marker, the share of busy samples with it on the stack. A marker ending in
    ` (` is a function's name and matches a frame's start (`_payload (` is not
    `parse_track_payload (`); any other, a fragment of a frame (`(structlog/`)."""
    counts: collections.Counter[str] = collections.Counter()
    busy = 0
    for line in collapsed.read_text().splitlines():
        stack, _, raw_count = line.rpartition(" ")
        if not stack or not raw_count.isdigit():
            continue
        busy += int(raw_count)
        framed = f";{stack}"
        for name in functions:
            if (f";{name}" if name.endswith(" (") else name) in framed:
                counts[name] += int(raw_count)
    return {name: counts[name] / busy if busy else 0.0 for name in functions}


def _short(frame: str) -> str:
    """`function (/long/path/to/pkg/module.py:12)` -> `function (pkg/module.py)`."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    parts = Path(match["file"]).parts
    return f"{match['function']} ({'/'.join(parts[-2:])})"


def _area(frame: str) -> str:
    for area, markers in AREAS:
        if any(f"({marker}" in frame for marker in markers):
            return area
    return "other"


async def wait(profiler: ServiceProcess | None, timeout_s: float) -> None:
    if profiler is not None:
        try:
            await profiler.wait(timeout_s)
        except TimeoutError:
            await profiler.stop(5)
        await asyncio.sleep(0)


def report(
    collapsed: Path, seconds: float, title: str, stages: dict[str, str], top: int = 15
) -> dict[str, Any] | None:
    """Print a profile's summary (areas, hot functions, `stages` by their frame markers) and
    return it for the results file; None when py-spy wrote nothing."""
    if not collapsed.exists():
        return None
    summary = summarise(collapsed, seconds, top=top)
    print(f"\nprofile of {title} ({collapsed}):")
    print(f"  busy {summary.busy_share:.0%} of the samples' time; by area of the leaf frame:")
    for area, share in summary.by_area.items():
        print(f"    {share:6.1%}  {area}")
    print("  hottest functions (self, inclusive):")
    for spot in summary.hotspots:
        print(f"    {spot.self_share:6.1%} {spot.total_share:6.1%}  {spot.function}")
    shares = inclusive(collapsed, list(stages))
    print("  inclusive share of its stages:")
    for stage, share in shares.items():
        print(f"    {share:6.1%}  {stages[stage]}")
    print(flush=True)
    return {
        "file": str(collapsed),
        "busy_share": summary.busy_share,
        "by_area": summary.by_area,
        "hotspots": [dataclasses.asdict(h) for h in summary.hotspots],
        "stages": {stages[stage]: share for stage, share in shares.items()},
    }
