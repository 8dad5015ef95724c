"""Small horizontal bar charts, laid out here and drawn as inline SVG by a template macro."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

ROW_HEIGHT = 22
LABEL_WIDTH = 170
BAR_SPACE = 240
COUNT_WIDTH = 60
LABEL_MAX_CHARS = 24
DEFAULT_COLOR = "#4a6fa5"

STATE_COLORS = {
    "pending": "#d9a406",
    "active": "#2e8b57",
    "failed": "#c0392b",
    "stopping": "#7f8c8d",
    "stopped": "#95a5a6",
}


@dataclasses.dataclass(frozen=True)
class Bar:
    label: str  # as shown, possibly shortened
    title: str  # the whole label, shown on hover
    count: int
    y: int
    width: float
    color: str
    href: str | None


@dataclasses.dataclass(frozen=True)
class BarChart:
    title: str
    bars: tuple[Bar, ...]
    width: int
    height: int
    label_width: int = LABEL_WIDTH
    row_height: int = ROW_HEIGHT


def bar_chart(
    title: str,
    counts: Mapping[str, int],
    *,
    order: Sequence[str] = (),
    link: Callable[[str], str | None] | None = None,
    colors: Mapping[str, str] | None = None,
) -> BarChart:
    """One bar per key, longest first (or in `order`), scaled to the largest count."""
    keys = _ordered(counts, order)
    top = max(counts.values(), default=0)
    bars = tuple(
        Bar(
            label=_short(_shown(key)),
            title=f"{_shown(key)}: {counts[key]}",
            count=counts[key],
            y=index * ROW_HEIGHT,
            width=round(BAR_SPACE * counts[key] / top, 1) if top else 0.0,
            color=(colors or {}).get(key, DEFAULT_COLOR),
            href=link(key) if link else None,
        )
        for index, key in enumerate(keys)
    )
    width = LABEL_WIDTH + BAR_SPACE + COUNT_WIDTH
    return BarChart(title, bars, width, max(len(bars), 1) * ROW_HEIGHT)


def _ordered(counts: Mapping[str, int], order: Sequence[str]) -> list[str]:
    known = [key for key in order if key in counts]
    rest = sorted((key for key in counts if key not in order), key=lambda k: (-counts[k], k))
    return known + rest


def _shown(key: str) -> str:
    return key or "(none)"


def _short(label: str) -> str:
    if len(label) <= LABEL_MAX_CHARS:
        return label
    return label[: LABEL_MAX_CHARS - 1] + "\u2026"
