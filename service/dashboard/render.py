"""Templates (Jinja2, autoescaped), the context every page gets, redirects and error pages."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from service.dashboard.keys import NONCE, OPTIONS, VIEWER

HOME = "/dashboard"
LOGIN = "/dashboard/login"
# A path of this dashboard, with its query: where `next` and `back` may send the browser.
# Starting with /dashboard keeps it on this origin; no backslash, space or control character,
# which browsers read in surprising ways.
_LOCAL_TARGET = re.compile(r"/dashboard(?:[/?][^\x00-\x20\x7f\\]*)?")


class Refused(Exception):
    """A request the dashboard answers with an error page: `status` and a human message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def setup_templates(app: web.Application) -> None:
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("service.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        filters={
            "when": when,
            "pretty_json": pretty_json,
            "pairs": pairs,
            "error_summary": error_summary,
        },
    )


def page(
    request: web.Request,
    template: str,
    context: Mapping[str, Any],
    *,
    status: int = 200,
    refresh: bool = False,
) -> web.Response:
    """Render a page with what every page shows: who is logged in, the CSRF token, a flash."""
    viewer = request.get(VIEWER)
    common = {
        "viewer": viewer,
        "csrf": viewer.session.csrf if viewer else "",
        "flash": viewer.session.take_flash() if viewer else None,
        "nonce": request.get(NONCE, ""),
        "refresh_s": request.config_dict[OPTIONS].refresh_s if refresh else 0,
        "here": request.path_qs,
        "section": "",
    }
    return aiohttp_jinja2.render_template(template, request, common | dict(context), status=status)


def redirect(location: str) -> web.Response:
    """303: after a POST, the browser GETs the page it is sent to."""
    return web.Response(status=303, headers={"Location": location})


def local_target(value: object, default: str = HOME) -> str:
    """`value` if it is a path of this dashboard, else `default` (no open redirects)."""
    if isinstance(value, str) and _LOCAL_TARGET.fullmatch(value):
        return value
    return default


def when(value: object) -> str:
    """A timestamp in UTC to the second, as ops read them side by side; `-` for none."""
    if value is None:
        return "-"
    if isinstance(value, str):  # from JSON, as in a timeline entry's details
        try:
            return when(datetime.fromisoformat(value))
        except ValueError:
            return value
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return str(value)


def pretty_json(value: object) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def pairs(value: Mapping[str, Any] | None) -> str:
    """`key=value` for the keys that have a value: a timeline entry's details on one line."""
    return ", ".join(f"{k}={v}" for k, v in (value or {}).items() if v is not None and v != "")


def error_summary(last_error: Mapping[str, Any] | None) -> str:
    """`HTTP 400 invalid_identifier: message`: what ShipEngine said, on one line."""
    if not last_error:
        return ""
    errors = last_error.get("errors") or [{}]
    first = errors[0] if isinstance(errors[0], Mapping) else {}
    status = f"HTTP {last_error['http_status']}" if last_error.get("http_status") else ""
    code = str(first.get("error_code") or "")
    message = str(first.get("message") or last_error.get("message") or "")
    head = " ".join(part for part in (status, code) if part)
    return f"{head}: {message}" if head and message else head or message
