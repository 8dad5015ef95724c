"""Several API processes on one port (API_WORKERS): one Python process uses one core.

The parent forks the workers before anything else runs (no event loop, no threads, no
connections yet), each binds the port with SO_REUSEPORT and the kernel spreads connections
among them. Workers share nothing but the database, as separate API instances do. SIGTERM or
SIGINT to the parent is passed on to every worker, which finishes its requests and exits; if a
worker dies on its own, the others are stopped too and the parent exits non-zero, so whatever
supervises the service restarts it whole rather than running it short of a worker.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


def supervise(workers: int, serve: Callable[[], None]) -> int:
    """Run `serve` in `workers` forked processes; returns the exit code for the parent."""
    children = [_fork(serve) for _ in range(workers)]
    stopping = False

    def stop(signum: int, _: object) -> None:
        nonlocal stopping
        stopping = True
        _signal_all(children, signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("api.workers_started", workers=workers, pids=children)
    worst = 0
    while children:
        pid, status = os.wait()
        if pid not in children:
            continue
        children.remove(pid)
        code = os.waitstatus_to_exitcode(status)
        died = not stopping
        if died:
            log.error("api.worker_died", pid=pid, exit_code=code)
            stopping = True
            _signal_all(children, signal.SIGTERM)
        if died or code not in (0, -signal.SIGTERM):
            worst = 1
    return worst


def _fork(serve: Callable[[], None]) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        serve()
    except BaseException:  # a worker must never return into the parent's loop
        log.exception("api.worker_failed")
        code = 1
    finally:
        sys.stdout.flush()
        os._exit(code)


def _signal_all(children: list[int], signum: int) -> None:
    for pid in children:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            continue
