"""Typed keys for what the dashboard shares between its middlewares and handlers."""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from service.dashboard.access import Viewer


@dataclasses.dataclass(frozen=True)
class DashboardOptions:
    secure_cookie: bool = True
    """Whether the session cookie is Secure (DASHBOARD_COOKIE_SECURE): false only for plain
    HTTP, as under `make run`."""
    allowed_origin: str | None = None
    """An origin (`https://host[:port]`) whose login posts are ours even though the Host header
    differs (DASHBOARD_ORIGIN: a proxy that rewrites Host)."""
    refresh_s: int = 10
    """How often status pages reload themselves (0: never)."""


@dataclasses.dataclass
class SummaryCache:
    document: dict[str, Any] | None = None
    expires: float = 0.0


OPTIONS = web.AppKey("dashboard_options", DashboardOptions)
SUMMARY = web.AppKey("dashboard_summary", SummaryCache)
VIEWER = web.RequestKey("dashboard_viewer", Viewer)
NONCE = web.RequestKey("dashboard_csp_nonce", str)
