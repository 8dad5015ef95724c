"""The Grafana dashboard only charts metrics the service really exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

from service.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "grafana" / "tracking-service.json"
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def exposed_names() -> set[str]:
    names = set()
    for collector in Metrics().registry.collect():
        names.add(collector.name)
        names.update(sample.name for sample in collector.samples)
        names.update(collector.name + suffix for suffix in SUFFIXES)
    return names


def test_every_expression_names_an_exposed_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in expressions for name in re.findall(r"\btracking_\w+", expr)}
    assert used
    assert used <= exposed_names(), used - exposed_names()
