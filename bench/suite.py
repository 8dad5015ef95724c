"""What a suite is handed: the PostgreSQL server, where logs go, and the options of the run.

A suite is a module with `SCENARIOS` (the keys `--only` accepts) and
`async def run(bench: Bench, report: Report) -> None`; `bench/__main__.py` lists the suites.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bench.infra import PostgresServer, Processes


@dataclasses.dataclass(frozen=True)
class Bench:
    postgres: PostgresServer
    log_dir: Path
    quick: bool = False
    only: frozenset[str] = frozenset()
    profile: bool = False
    concurrency: int | None = None  # calls in flight per dispatcher (and baseline client)

    def wants(self, scenario: str) -> bool:
        return not self.only or scenario in self.only

    def processes(self, scenario: str) -> Processes:
        """The processes of one scenario, their logs in a folder of their own."""
        return Processes(self.log_dir / scenario)
