"""Ops from the command line, straight on the database (and ShipEngine for its webhook):

  subscriptions list|show|retry|cancel, deliveries replay, dispatch pause|resume,
  register-webhook --url.

Exit codes scripts can use: 0 done, 2 usage or configuration error, 3 nothing found to act on,
4 the action does not apply (e.g. retrying a subscription that has not failed), 5 ShipEngine
refused or could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import aiohttp
from sqlalchemy.ext.asyncio import AsyncConnection

from service.api.schemas import subscription_json
from service.db import deliveries, dispatch, partitions
from service.db import subscriptions as queries
from service.db.engine import engine_from
from service.settings import Settings
from service.shipengine.client import ShipEngineClient

EXIT_NOT_FOUND = 3
EXIT_NOT_APPLICABLE = 4
EXIT_REFUSED = 5

EVENT_FIELDS = ("occurred_at", "status_code", "description")

Command = Callable[[AsyncConnection, Settings, argparse.Namespace], Awaitable[int]]


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    subs = commands.add_parser("subscriptions", help="list, show, retry and cancel subscriptions")
    subs_actions = subs.add_subparsers(dest="action", required=True)
    listing = subs_actions.add_parser("list", help="newest first")
    for name in ("state", "status-code", "carrier-code", "tracking-number", "created-by"):
        listing.add_argument(f"--{name}")
    listing.add_argument("--limit", type=int, default=50)
    for action, text in [
        ("show", "one subscription with its events"),
        ("retry", f"a failed one is pending again (exit {EXIT_NOT_APPLICABLE}: not failed)"),
        ("cancel", "stop tracking it"),
    ]:
        subs_actions.add_parser(action, help=text).add_argument("id", type=uuid.UUID)
    for parser in subs_actions.choices.values():
        parser.add_argument("--json", action="store_true", help="print JSON")

    delivered = commands.add_parser("deliveries", help="re-file stored webhook deliveries")
    replay = delivered.add_subparsers(dest="action", required=True).add_parser(
        "replay", help="one delivery by id, or all received in a time range"
    )
    replay.add_argument("--id", type=int)
    replay.add_argument("--from", dest="received_from", type=datetime.fromisoformat)
    replay.add_argument("--to", dest="received_to", type=datetime.fromisoformat)
    replay.add_argument("--dry-run", action="store_true")
    replay.add_argument("--json", action="store_true", help="print JSON")

    dispatching = commands.add_parser("dispatch", help="pause or resume all dispatching")
    dispatch_actions = dispatching.add_subparsers(dest="action", required=True)
    dispatch_actions.add_parser("pause").add_argument("--reason", required=True)
    dispatch_actions.add_parser("resume")

    partitioned = commands.add_parser(
        "partitions", help="create time partitions ahead, drop those past retention"
    )
    maintain = partitioned.add_subparsers(dest="action", required=True).add_parser(
        "maintain", help="what the API also does at start and hourly"
    )
    maintain.add_argument("--dry-run", action="store_true", help="only say what it would do")

    register = commands.add_parser(
        "register-webhook", help="create or update ShipEngine's `track` webhook for this service"
    )
    register.add_argument(
        "--url", required=True, help="https://<this service>/v1/webhooks/shipengine"
    )
    register.add_argument(
        "--header", action="append", default=[], metavar="KEY=VALUE", help="a custom header"
    )


def run(settings: Settings, args: argparse.Namespace) -> int:
    if args.command == "register-webhook":
        return asyncio.run(_register_webhook(settings, args))
    command = _COMMANDS[(args.command, args.action)]
    return asyncio.run(_in_transaction(settings, args, command))


async def _in_transaction(settings: Settings, args: argparse.Namespace, command: Command) -> int:
    engine = engine_from(dataclasses.replace(settings, database_pool_size=1))
    try:
        async with engine.begin() as conn:
            return await command(conn, settings, args)
    finally:
        await engine.dispose()


async def _list(conn: AsyncConnection, _: Settings, args: argparse.Namespace) -> int:
    where = queries.SubscriptionFilter(
        state=args.state,
        status_code=args.status_code,
        carrier_code=args.carrier_code,
        tracking_number=args.tracking_number,
        created_by=args.created_by,
    )
    rows = await queries.list_subscriptions(conn, where, args.limit, None)
    if args.json:
        _print_json([subscription_json(row) for row in rows])
    for row in [] if args.json else rows:
        status = row["status_code"] or "-"
        print(f"{row['id']}  {row['state']:<8} {status:<3} {row['carrier_code']:<12} ", end="")
        print(row["tracking_number"])
    return 0


async def _show(conn: AsyncConnection, _: Settings, args: argparse.Namespace) -> int:
    row = await queries.get_subscription(conn, args.id)
    if row is None:
        return _not_found("subscription")
    events = await queries.list_events(conn, args.id)
    document = subscription_json(row)
    document["events"] = [
        {key: str(e[key]) if key == "occurred_at" else e[key] for key in EVENT_FIELDS}
        for e in events
    ]
    _print_document(args, document)
    return 0


async def _retry(conn: AsyncConnection, _: Settings, args: argparse.Namespace) -> int:
    row = await queries.retry_failed(conn, args.id)
    if row is None:
        current = await queries.get_subscription(conn, args.id)
        if current is None:
            return _not_found("subscription")
        print(f"not retried: the subscription is {current['state']}", file=sys.stderr)
        return EXIT_NOT_APPLICABLE
    _print_document(args, subscription_json(row))
    return 0


async def _cancel(conn: AsyncConnection, _: Settings, args: argparse.Namespace) -> int:
    row = await queries.request_stop(conn, args.id)
    if row is None:
        return _not_found("subscription")
    _print_document(args, subscription_json(row))
    return 0


async def _replay(conn: AsyncConnection, settings: Settings, args: argparse.Namespace) -> int:
    if args.id is not None:
        filed = await deliveries.replay_one(conn, args.id, settings.rearm_policy)
        if filed is None:
            return _not_found("replayable delivery")
        document = {"delivery_id": args.id, "outcome": filed.outcome}
        _print_document(args, {**document, "new_events": filed.new_events})
        return 0
    if args.received_from is None or args.received_to is None:
        print("give --id, or both --from and --to", file=sys.stderr)
        return 2
    ids = await deliveries.deliveries_to_replay(conn, args.received_from, args.received_to)
    outcomes: dict[str, int] = {}
    for filed in [] if args.dry_run else await deliveries.replay(conn, ids, settings.rearm_policy):
        outcomes[filed.outcome] = outcomes.get(filed.outcome, 0) + 1
    _print_document(args, {"dry_run": args.dry_run, "matched": len(ids), "outcomes": outcomes})
    return 0


async def _pause(conn: AsyncConnection, _: Settings, args: argparse.Namespace) -> int:
    await dispatch.pause_by_hand(conn, {"message": args.reason, "by": "cli"})
    print("dispatching paused")
    return 0


async def _resume(conn: AsyncConnection, _: Settings, __: argparse.Namespace) -> int:
    await dispatch.resume(conn)
    print("dispatching resumed")
    return 0


async def _register_webhook(settings: Settings, args: argparse.Namespace) -> int:
    headers = dict(pair.split("=", 1) for pair in args.header if "=" in pair)
    async with aiohttp.ClientSession() as session:
        client = ShipEngineClient(
            session,
            base_url=settings.shipengine_base_url,
            api_key=settings.require_api_key(),
            timeout_s=settings.shipengine_timeout_s,
        )
        try:
            how, webhook = await client.register_track_webhook(args.url, headers)
        except aiohttp.ClientResponseError as error:
            print(f"ShipEngine refused: HTTP {error.status} {error.message}", file=sys.stderr)
            return EXIT_REFUSED
        except (aiohttp.ClientError, TimeoutError) as error:
            print(f"ShipEngine unreachable: {error}", file=sys.stderr)
            return EXIT_REFUSED
    print(f"track webhook {how}: {webhook.get('url')} (id {webhook.get('webhook_id')})")
    return 0


async def _maintain_partitions(
    conn: AsyncConnection, settings: Settings, args: argparse.Namespace
) -> int:
    done = await partitions.maintain(
        conn,
        delivery_retention_days=settings.delivery_retention_days,
        event_retention_days=settings.event_retention_days,
        dry_run=args.dry_run,
    )
    _print_json({"dry_run": args.dry_run, **done.as_json()})
    return 0


_COMMANDS: dict[tuple[str, str], Command] = {
    ("subscriptions", "list"): _list,
    ("subscriptions", "show"): _show,
    ("subscriptions", "retry"): _retry,
    ("subscriptions", "cancel"): _cancel,
    ("deliveries", "replay"): _replay,
    ("dispatch", "pause"): _pause,
    ("dispatch", "resume"): _resume,
    ("partitions", "maintain"): _maintain_partitions,
}


def _print_document(args: argparse.Namespace, document: dict[str, Any]) -> None:
    if getattr(args, "json", False):
        _print_json(document)
        return
    for key, value in document.items():
        print(f"{key}: {json.dumps(value) if isinstance(value, dict | list) else value}")


def _print_json(document: object) -> None:
    print(json.dumps(document, default=str))


def _not_found(what: str) -> int:
    print(f"no such {what}", file=sys.stderr)
    return EXIT_NOT_FOUND
