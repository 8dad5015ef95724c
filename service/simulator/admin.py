"""/_sim: the simulator's own controls for demos and out-of-process tests; no API key."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from service.simulator import errors, parsing
from service.simulator.appkeys import SIMULATOR
from service.simulator.config import SimulatorConfig
from service.simulator.records import OPERATIONS, Operation


def _config_json(config: SimulatorConfig) -> dict[str, Any]:
    # The API key stays out: settings are shown, secrets are not.
    return {
        "pace_s": config.pace_s,
        "latency_s": config.latency_s,
        "delivery_retry_s": config.delivery_retry_s,
        "delivery_attempts": config.delivery_attempts,
        "delivery_timeout_s": config.delivery_timeout_s,
        "public_url": config.public_url,
        "rate_limit_per_minute": config.rate_limit_per_minute,
        "rate_limit_window_s": config.rate_limit_window_s,
    }


async def list_calls(request: web.Request) -> web.Response:
    return web.json_response([call.to_json() for call in request.app[SIMULATOR].calls])


async def list_deliveries(request: web.Request) -> web.Response:
    deliveries = request.app[SIMULATOR].deliveries
    return web.json_response([delivery.to_json() for delivery in deliveries])


async def list_packages(request: web.Request) -> web.Response:
    packages = request.app[SIMULATOR].packages
    return web.json_response([package.to_json() for package in packages])


async def list_scripts(request: web.Request) -> web.Response:
    return web.json_response([script.to_json() for script in request.app[SIMULATOR].scripts])


def _operation(data: parsing.JsonObject) -> Operation:
    operation = parsing.optional_str(data, "operation") or "start"
    if operation not in OPERATIONS:
        raise errors.invalid_field("operation", f"operation must be one of {list(OPERATIONS)}.")
    return operation


async def add_script(request: web.Request) -> web.Response:
    data = await parsing.json_object(request)
    status = parsing.optional_int(data, "status")
    try:
        script = request.app[SIMULATOR].script(
            parsing.required_str(data, "tracking_number"),
            operation=_operation(data),
            status=400 if status is None else status,
            error_code=parsing.optional_str(data, "error_code"),
            error_type=parsing.optional_str(data, "error_type"),
            error_source=parsing.optional_str(data, "error_source"),
            message=parsing.optional_str(data, "message"),
            retry_after_s=parsing.optional_int(data, "retry_after_s"),
            delay_s=parsing.optional_number(data, "delay_s") or 0.0,
            times=parsing.optional_int(data, "times"),
        )
    except ValueError as error:
        raise errors.invalid_field("body", str(error)) from None
    return web.json_response(script.to_json(), status=201)


async def add_lifecycle(request: web.Request) -> web.Response:
    data = await parsing.json_object(request)
    tracking_number = parsing.required_str(data, "tracking_number")
    options = request.app[SIMULATOR].script_lifecycle(
        tracking_number,
        duplicate_each=parsing.optional_bool(data, "duplicate_each"),
        replay_older=parsing.optional_bool(data, "replay_older"),
    )
    body = {
        "tracking_number": tracking_number,
        "duplicate_each": options.duplicate_each,
        "replay_older": options.replay_older,
    }
    return web.json_response(body, status=201)


async def reset(request: web.Request) -> web.Response:
    await request.app[SIMULATOR].reset()
    return web.Response(status=204)


async def get_config(request: web.Request) -> web.Response:
    return web.json_response(_config_json(request.app[SIMULATOR].config))


async def set_config(request: web.Request) -> web.Response:
    data = await parsing.json_object(request)
    try:
        config = request.app[SIMULATOR].configure(
            pace_s=parsing.optional_number(data, "pace_s"),
            latency_s=parsing.optional_number(data, "latency_s"),
            delivery_retry_s=parsing.optional_number(data, "delivery_retry_s"),
            delivery_attempts=parsing.optional_int(data, "delivery_attempts"),
            rate_limit_per_minute=parsing.optional_int(data, "rate_limit_per_minute"),
            rate_limit_window_s=parsing.optional_number(data, "rate_limit_window_s"),
        )
    except ValueError as error:
        raise errors.invalid_field("body", str(error)) from None
    return web.json_response(_config_json(config))


async def get_stats(request: web.Request) -> web.Response:
    """Live counters, for out-of-process tests that cannot await the Python API."""
    simulator = request.app[SIMULATOR]
    peaks = simulator.max_concurrent_per_package()
    return web.json_response(
        {
            "in_flight": simulator.in_flight,
            "calls": len(simulator.calls),
            "rate_limited": simulator.rate_limited_calls,
            "max_concurrent_per_package": [
                {"carrier_code": carrier, "tracking_number": number, "max_concurrent": peak}
                for (carrier, number), peak in peaks.items()
            ],
        }
    )


async def rotate_key(request: web.Request) -> web.Response:
    kid = request.app[SIMULATOR].keys.rotate()
    return web.json_response({"kid": kid})


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_get("/_sim/calls", list_calls)
    router.add_get("/_sim/deliveries", list_deliveries)
    router.add_get("/_sim/packages", list_packages)
    router.add_get("/_sim/scripts", list_scripts)
    router.add_post("/_sim/scripts", add_script)
    router.add_post("/_sim/lifecycles", add_lifecycle)
    router.add_post("/_sim/reset", reset)
    router.add_get("/_sim/config", get_config)
    router.add_post("/_sim/config", set_config)
    router.add_get("/_sim/stats", get_stats)
    router.add_post("/_sim/rotate-key", rotate_key)
