"""HTTP load as the field measures it: wrk, a compiled load generator, replaying requests that
were made (signed, formatted) before the run.

    wrk -t1 -c64 -d10s --latency -s bench/wrk_replay.lua URL -- FILE

A Python load generator on these 2 cores tops out near 2,000 requests a second, so against a
fast server it, not the server, sets the rate (issue 18). wrk, one thread, takes a fraction of
a core for the same. It is Debian's package (`make wrk`, best effort); without it the suites
that need it say so and measure nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import resource
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bench.infra import BenchError

SCRIPT = Path(__file__).with_name("wrk_replay.lua")
MISSING = "wrk is not installed (`make wrk` installs Debian's package): nothing measured"


@dataclasses.dataclass(frozen=True)
class RawRequest:
    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes


def executable() -> str | None:
    return shutil.which("wrk")


def encode(request: RawRequest) -> bytes:
    """The request as it goes on the wire, HTTP/1.1 with keep-alive."""
    lines = [f"{request.method} {request.path} HTTP/1.1", "Host: bench"]
    lines += [f"{name}: {value}" for name, value in request.headers.items()]
    lines.append(f"Content-Length: {len(request.body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + request.body


def write_requests(path: Path, requests: Iterable[RawRequest]) -> int:
    """Write the file `wrk_replay.lua` reads; the number of requests."""
    written = 0
    with path.open("wb") as file:
        for request in requests:
            raw = encode(request)
            file.write(f"{len(raw)}\n".encode() + raw)
            written += 1
    return written


@dataclasses.dataclass(frozen=True)
class WrkRun:
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]  # socket errors, timeouts and answers of 400 and above
    cpu_s: float = 0.0  # wrk's own, user and system

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def facts(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rate": round(self.rate, 1)}


async def run(
    url: str,
    requests_file: Path,
    *,
    connections: int,
    duration_s: float,
    timeout_s: float = 10.0,
) -> WrkRun:
    """One wrk run of `duration_s` against `url` (its base; each request carries its path)."""
    wrk = executable()
    if wrk is None:
        raise BenchError(MISSING)
    argv = [
        wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
        f"--timeout={max(1, round(timeout_s))}s", "--latency", "-s", str(SCRIPT), url,
        "--", str(requests_file),
    ]  # fmt: skip
    before = _children_cpu_s()
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        raise BenchError(f"wrk failed ({process.returncode}): {stderr.decode()[-500:]}")
    # The harness's other children run on: only wrk ended (and was waited for) meanwhile.
    return dataclasses.replace(parse(stdout.decode()), cpu_s=_children_cpu_s() - before)


def _children_cpu_s() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def parse(output: str) -> WrkRun:
    """The figures from the JSON line `wrk_replay.lua` prints last."""
    line = next((x for x in reversed(output.splitlines()) if x.startswith("{")), None)
    if line is None:
        raise BenchError(f"wrk printed no figures: {output[-500:]}")
    found = json.loads(line)
    errors = {
        name: int(found[name])
        for name in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    }
    return WrkRun(
        requests=int(found["requests"]),
        seconds=found["duration_us"] / 1e6,
        p50_ms=found["p50_us"] / 1000,
        p90_ms=found["p90_us"] / 1000,
        p99_ms=found["p99_us"] / 1000,
        max_ms=found["max_us"] / 1000,
        errors=errors,
    )
