"""The service's processes (api, dispatcher, migrate, simulator, run) and its ops commands."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable

import uvloop
from aiohttp import web

from service.cli import ops as cli_ops
from service.cli import tokens as cli_tokens
from service.logs import configure_logging
from service.process.gc_tuning import tune_for_serving
from service.settings import Settings, SettingsError, markdown_table


def _api() -> None:
    from service.api.app import create_app

    settings = _settings()
    tune_for_serving()

    def serve(reuse_port: bool = False) -> None:
        web.run_app(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            print=None,
            loop=uvloop.new_event_loop(),
            reuse_port=reuse_port,
        )

    if settings.api_workers == 1:
        serve()
        return
    from service.process.workers import supervise

    raise SystemExit(supervise(settings.api_workers, lambda: serve(reuse_port=True)))


def _dispatcher() -> None:
    from service.dispatcher import runtime

    settings = _settings()
    tune_for_serving()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(runtime.serve(settings))


def _migrate() -> None:
    from service.db.migrate import upgrade

    upgrade(_settings().database_url)


def _simulator() -> None:
    from service.simulator.app import create_simulator_app
    from service.simulator.config import SimulatorConfig

    configure_logging(os.environ.get("LOG_LEVEL", "INFO").upper())
    config = SimulatorConfig.from_env(os.environ)
    web.run_app(create_simulator_app(config), host=config.host, port=config.port, print=None)


def _run() -> None:
    from service.process import devstack

    asyncio.run(devstack.run(os.environ))


COMMANDS: dict[str, tuple[Callable[[], None], str]] = {
    "api": (_api, "serve the HTTP API"),
    "dispatcher": (_dispatcher, "run a dispatcher: start and stop tracking at ShipEngine"),
    "migrate": (_migrate, "bring the database schema up to date"),
    "simulator": (_simulator, "serve the ShipEngine simulator"),
    "run": (_run, "everything in one process for local use (embedded PostgreSQL, simulator)"),
}


def _settings() -> Settings:
    settings = Settings.from_env(os.environ)
    configure_logging(settings.log_level, settings.secret_values())
    return settings


def main(argv: list[str] | None = None) -> None:
    """Exit codes: 0 done, 2 configuration or usage error, 3 nothing found to act on,
    4 the action does not apply, 5 ShipEngine refused."""
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        commands.add_parser(name, help=help_text)
    cli_tokens.add_parser(commands)
    cli_ops.add_parsers(commands)
    documented = commands.add_parser("settings", help="document every environment variable")
    documented.add_argument(
        "--markdown", action="store_true", required=True, help="as README's table"
    )
    args = parser.parse_args(argv)
    if args.command == "settings":
        from service.simulator.config import SimulatorConfig

        print(markdown_table(Settings, SimulatorConfig))
        return
    try:
        if args.command == "tokens":
            raise SystemExit(cli_tokens.run(Settings.from_env(os.environ), args))
        if args.command not in COMMANDS:
            raise SystemExit(cli_ops.run(Settings.from_env(os.environ), args))
        COMMANDS[args.command][0]()
    except SettingsError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
