"""Typed keys for what the dashboard shares between its middlewares and handlers."""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from service.dashboard.access import Viewer
from service.dashboard.sessions import SessionStore


@dataclasses.dataclass(frozen=True)
class DashboardOptions:
    secure_cookie: bool | None = None
    """Whether the session cookie is Secure; None: unless plain HTTP to a loopback host."""
    refresh_s: int = 10
    """How often status pages reload themselves (0: never)."""


@dataclasses.dataclass
class SummaryCache:
    document: dict[str, Any] | None = None
    expires: float = 0.0


OPTIONS = web.AppKey("dashboard_options", DashboardOptions)
SESSIONS = web.AppKey("dashboard_sessions", SessionStore)
SUMMARY = web.AppKey("dashboard_summary", SummaryCache)
VIEWER = web.RequestKey("dashboard_viewer", Viewer)
NONCE = web.RequestKey("dashboard_csp_nonce", str)
