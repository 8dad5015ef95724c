"""The ingest and subscribe suites' baselines: an aiohttp process with no service logic at all.

    python -m bench.baseline_server bare   --port P
    python -m bench.baseline_server insert --port P --database-url URL [--path /v1/subscriptions]

`bare` reads the body and answers 204; `insert` also INSERTs it into `ingest_baseline`
(`id bigserial, body bytea, received_at timestamptz default now()`, created at start) with one
asyncpg statement from a pool of `--pool-size` connections, then answers 204. Either serves
`POST --path` (default: ShipEngine's webhook path, for the ingest suite; the subscribe suite
posts to /v1/subscriptions). `GET /healthz` answers 200 once the server (and its pool) is up.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import asyncpg
from aiohttp import web

from service.db.engine import asyncpg_dsn

TABLE = "ingest_baseline"
WEBHOOK_PATH = "/v1/webhooks/shipengine"
POOL: web.AppKey[asyncpg.Pool] = web.AppKey("pool", asyncpg.Pool)


async def healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


async def bare(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=204)


async def insert(request: web.Request) -> web.Response:
    body = await request.read()
    await request.app[POOL].execute(f"INSERT INTO {TABLE} (body) VALUES ($1)", body)
    return web.Response(status=204)


def create_app(
    mode: str, database_url: str | None, pool_size: int, path: str = WEBHOOK_PATH
) -> web.Application:
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    if mode == "bare":
        app.router.add_post(path, bare)
        return app
    if database_url is None:
        raise SystemExit("insert mode needs --database-url")
    dsn = asyncpg_dsn(database_url)

    async def pool(app: web.Application) -> AsyncIterator[None]:
        created = await asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size)
        await created.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigserial PRIMARY KEY, body bytea NOT NULL, "
            "received_at timestamptz NOT NULL DEFAULT now())"
        )
        app[POOL] = created
        yield
        await created.close()

    app.cleanup_ctx.append(pool)
    app.router.add_post(path, insert)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_server", description=__doc__)
    parser.add_argument("mode", choices=("bare", "insert"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url")
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--path", default=WEBHOOK_PATH, help="the POST route it serves")
    args = parser.parse_args()
    app = create_app(args.mode, args.database_url, args.pool_size, args.path)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
