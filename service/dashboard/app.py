"""The dashboard's sub-application, mounted by the API's factory at /dashboard."""

from __future__ import annotations

from aiohttp import web

from service.dashboard import actions, changes, login, pages
from service.dashboard.guard import (
    error_pages,
    forget_shown_flash,
    require_session,
    security_headers,
)
from service.dashboard.keys import OPTIONS, SUMMARY, DashboardOptions, SummaryCache
from service.dashboard.render import setup_templates


def create_dashboard(options: DashboardOptions | None = None) -> web.Application:
    """Pages for ops: mount with `app.add_subapp("/dashboard", create_dashboard(...))`.

    It uses the parent app's ENGINE and SETTINGS; its sessions are rows in that database, so
    any API process serves any session.
    """
    dashboard = web.Application(
        middlewares=[security_headers, forget_shown_flash, error_pages, require_session]
    )
    dashboard[OPTIONS] = options or DashboardOptions()
    dashboard[SUMMARY] = SummaryCache()
    setup_templates(dashboard)
    dashboard.add_routes(login.routes)
    dashboard.add_routes(pages.routes)
    dashboard.add_routes(actions.routes)
    dashboard.add_routes(changes.routes)
    return dashboard
