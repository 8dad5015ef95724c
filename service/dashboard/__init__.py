"""/dashboard: server-rendered pages for ops, behind the API's tokens."""

from service.dashboard.app import create_dashboard

__all__ = ["create_dashboard"]
