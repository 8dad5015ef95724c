"""A suite's results: one table row per scenario as it finishes, a closing table of targets,
and the whole as JSON under bench/results/ (`<suite>-<UTC time>.json` and `latest-<suite>.json`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Other processes on the machine using more than this many cores make a measurement suspect.
NOISY_CORES = 0.3


@dataclasses.dataclass(frozen=True)
class Check:
    """A target: what was measured against it, and the ratio to the same run's baseline."""

    name: str
    target: str
    measured: str
    vs_target: float | None
    vs_baseline: float | None
    passed: bool | None  # None: nothing to judge (not measured)

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]


class Report:
    """What one suite measured; rows are printed as they come, JSON written at the end."""

    ROW_HEADER = ("scenario", "result", "vs baseline", "details")

    def __init__(self, suite: str, machine: dict[str, Any], options: dict[str, Any]) -> None:
        self.suite = suite
        self.started = dt.datetime.now(dt.UTC)
        self.machine = machine
        self.options = options
        self.scenarios: dict[str, dict[str, Any]] = {}
        self.rows: list[tuple[str, str, str, str]] = []
        self.checks: list[Check] = []
        self.notes: list[str] = []
        self._header_printed = False

    def scenario(
        self,
        key: str,
        title: str,
        result: str,
        vs_baseline: str,
        details: str,
        data: dict[str, Any],
    ) -> None:
        """Record a finished scenario and print its row."""
        self.scenarios[key] = {"title": title, **data}
        row = (f"{key}  {title}", result, vs_baseline, details)
        self.rows.append(row)
        if not self._header_printed:
            print(_line(self.ROW_HEADER), flush=True)
            self._header_printed = True
        print(_line(row), flush=True)

    def check(self, check: Check) -> None:
        self.checks.append(check)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    def note_if_noisy(self, key: str, cpu: dict[str, Any]) -> None:
        """A note when others on the machine took cores while `key` was measured."""
        others = cpu.get("others", 0.0)
        if others > NOISY_CORES:
            self.note(
                f"{key}: other processes on this machine used {others:.2f} cores meanwhile; "
                "its numbers are suspect (run again on a quieter machine)"
            )

    def print_summary(self) -> None:
        print()
        print(f"== {self.suite}: scenarios ==")
        print(_table(self.ROW_HEADER, self.rows))
        print()
        print(f"== {self.suite}: targets ==")
        header = ("check", "target", "measured", "vs target", "vs baseline", "verdict")
        rows = [
            (c.name, c.target, c.measured, _ratio(c.vs_target), _ratio(c.vs_baseline), c.verdict)
            for c in self.checks
        ]
        print(_table(header, rows))
        for note in self.notes:
            print(f"note: {note}")
        print(flush=True)

    def to_json(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "started_at": self.started.isoformat(),
            "finished_at": dt.datetime.now(dt.UTC).isoformat(),
            "machine": self.machine,
            "options": self.options,
            "scenarios": self.scenarios,
            "checks": [{**dataclasses.asdict(c), "verdict": c.verdict} for c in self.checks],
            "notes": self.notes,
        }

    def write(self, directory: Path = RESULTS_DIR, *, complete: bool = True) -> Path:
        """`<suite>-<UTC time>.json` and a copy as `latest-<suite>.json`; the first's path.

        An interrupted run is written as `...-partial.json` and leaves `latest-` alone.
        """
        directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps({**self.to_json(), "complete": complete}, indent=2, default=str)
        stamp = self.started.strftime("%Y%m%dT%H%M%SZ")
        path = directory / f"{self.suite}-{stamp}{'' if complete else '-partial'}.json"
        path.write_text(text + "\n")
        if complete:
            (directory / f"latest-{self.suite}.json").write_text(text + "\n")
        return path


def _ratio(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def _line(cells: Sequence[str], widths: Sequence[int] = (40, 26, 12, 0)) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def number(value: float, digits: int = 0) -> str:
    """1234.5 -> '1,234' (or with `digits` decimals); NaN -> 'n/a'."""
    if math.isnan(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def cores(cpu: dict[str, Any], names: Sequence[str]) -> str:
    """Cores used by each of `names` that was measured, as a row's details print them."""
    return " ".join(f"{name[:4]} {cpu[name]:.2f}" for name in names if name in cpu)
