"""`python -m service tokens create|list|revoke`: manage the API's client tokens."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys

from sqlalchemy.engine import RowMapping

from service.db.engine import engine_from
from service.db.tokens import create_token, list_tokens, revoke_token
from service.domain.access import Scope
from service.settings import Settings

EXIT_NOT_FOUND = 3


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tokens = commands.add_parser("tokens", help="create, list and revoke API tokens")
    actions = tokens.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="issue a token; it is printed once, never stored")
    create.add_argument("--client", required=True, help="who the token is for, e.g. checkout")
    create.add_argument(
        "--scope",
        dest="scopes",
        action="append",
        choices=[scope.value for scope in Scope],
        required=True,
        help="repeat for several scopes",
    )
    create.add_argument("--json", action="store_true", help="print JSON")
    listing = actions.add_parser("list", help="every token, revoked ones included (no secrets)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    revoke = actions.add_parser(
        "revoke", help=f"revoke a token by id (exit {EXIT_NOT_FOUND}: none)"
    )
    revoke.add_argument("token_id")


def run(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_run(settings, args))


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    engine = engine_from(dataclasses.replace(settings, database_pool_size=1))
    try:
        async with engine.begin() as conn:
            if args.action == "create":
                issued = await create_token(conn, args.client, [Scope(s) for s in args.scopes])
                _print_created(args, issued.token_id, issued.plaintext)
                return 0
            if args.action == "list":
                _print_list(args, await list_tokens(conn))
                return 0
            return 0 if await revoke_token(conn, args.token_id) else EXIT_NOT_FOUND
    finally:
        await engine.dispose()


def _print_created(args: argparse.Namespace, token_id: str, plaintext: str) -> None:
    if args.json:
        print(json.dumps({"token_id": token_id, "client": args.client, "token": plaintext}))
    else:
        print(plaintext)
        print(f"(token id {token_id}; the token is not shown again)", file=sys.stderr)


def _print_list(args: argparse.Namespace, rows: list[RowMapping]) -> None:
    documents = [
        {
            "token_id": row["token_id"],
            "client": row["client"],
            "scopes": row["scopes"],
            "created_at": row["created_at"].isoformat(),
            "revoked_at": row["revoked_at"].isoformat() if row["revoked_at"] else None,
        }
        for row in rows
    ]
    if args.json:
        print(json.dumps(documents))
        return
    for doc in documents:
        state = f"revoked {doc['revoked_at']}" if doc["revoked_at"] else "live"
        print(f"{doc['token_id']}  {doc['client']:<20} {' '.join(doc['scopes'])}  {state}")
