"""Typed keys of the simulator app's state (a module of their own, so handlers can import them)."""

from __future__ import annotations

from aiohttp import web

from service.simulator.simulator import Simulator

SIMULATOR: web.AppKey[Simulator] = web.AppKey("simulator", Simulator)

RATE_LIMITED: web.RequestKey[bool] = web.RequestKey("simulator_rate_limited", bool)
"""Set on a /v1 request the rate limit refused, so its call record can say so."""
