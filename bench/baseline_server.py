"""The wrk suite's baselines: an aiohttp process with no service logic at all.

    python -m bench.baseline_server bare   --port P
    python -m bench.baseline_server insert --port P --database-url URL [--path /v1/subscriptions]
    python -m bench.baseline_server verify --port P --database-url URL --jwks-url URL

`bare` reads the body and answers 204; `insert` also INSERTs it into `ingest_baseline`
(`id bigserial, body bytea, received_at timestamptz default now()`, created at start) with one
asyncpg statement from a pool of `--pool-size` connections, then answers 204; `verify` first
checks the body's ShipEngine signature (RSA-SHA256 over `timestamp.body`, the key named by its
id among the RSA keys of the JWKS, fetched once at start), answers 401 if it fails, and then
does what `insert` does. Each serves
`POST --path` (default: ShipEngine's webhook path; the subscribe loads post to
/v1/subscriptions). `GET /healthz` answers 200 once the server (and its pool) is up.
"""

from __future__ import annotations

import argparse
import base64
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import uvloop
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from service.db.engine import asyncpg_dsn
from service.simulator.signing import KEY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER

TABLE = "ingest_baseline"
WEBHOOK_PATH = "/v1/webhooks/shipengine"
POOL: web.AppKey[asyncpg.Pool] = web.AppKey("pool", asyncpg.Pool)
KEYS: web.AppKey[dict[str, rsa.RSAPublicKey]] = web.AppKey("keys", dict)


async def healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


async def bare(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=204)


async def insert(request: web.Request) -> web.Response:
    body = await request.read()
    await request.app[POOL].execute(f"INSERT INTO {TABLE} (body) VALUES ($1)", body)
    return web.Response(status=204)


async def verify_and_insert(request: web.Request) -> web.Response:
    body = await request.read()
    key = request.app[KEYS].get(request.headers.get(KEY_ID_HEADER, ""))
    try:
        if key is None:
            raise InvalidSignature
        signature = base64.b64decode(request.headers[SIGNATURE_HEADER], validate=True)
        signed = request.headers[TIMESTAMP_HEADER].encode() + b"." + body
        key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, KeyError, ValueError):
        return web.Response(status=401)
    await request.app[POOL].execute(f"INSERT INTO {TABLE} (body) VALUES ($1)", body)
    return web.Response(status=204)


async def rsa_keys(jwks_url: str) -> dict[str, rsa.RSAPublicKey]:
    """The JWKS's RSA keys by key id."""
    async with aiohttp.ClientSession() as session, session.get(jwks_url) as response:
        jwks = await response.json()
    return {
        jwk["kid"]: rsa.RSAPublicNumbers(_uint(jwk["e"]), _uint(jwk["n"])).public_key()
        for jwk in jwks["keys"]
        if jwk.get("kty") == "RSA"
    }


def _uint(b64url: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(b64url + "=" * (-len(b64url) % 4)), "big")


def create_app(
    mode: str,
    database_url: str | None,
    pool_size: int,
    path: str = WEBHOOK_PATH,
    jwks_url: str | None = None,
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
        # Connections kept for the process's life, as the service's pool keeps them: asyncpg's
        # defaults replace one after 50,000 queries or 300 s idle, and a backend replaced
        # during a run took its CPU out of the run's PostgreSQL figure.
        created = await asyncpg.create_pool(
            dsn,
            min_size=pool_size,
            max_size=pool_size,
            max_queries=2**62,
            max_inactive_connection_lifetime=0,
        )
        await created.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigserial PRIMARY KEY, body bytea NOT NULL, "
            "received_at timestamptz NOT NULL DEFAULT now())"
        )
        app[POOL] = created
        yield
        await created.close()

    app.cleanup_ctx.append(pool)
    if mode == "insert":
        app.router.add_post(path, insert)
        return app
    if jwks_url is None:
        raise SystemExit("verify mode needs --jwks-url")

    async def keys(app: web.Application) -> None:
        app[KEYS] = await rsa_keys(jwks_url)

    app.on_startup.append(keys)
    app.router.add_post(path, verify_and_insert)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_server", description=__doc__)
    parser.add_argument("mode", choices=("bare", "insert", "verify"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url")
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--path", default=WEBHOOK_PATH, help="the POST route it serves")
    parser.add_argument("--jwks-url", help="verify: where the signing keys are published")
    args = parser.parse_args()
    app = create_app(args.mode, args.database_url, args.pool_size, args.path, args.jwks_url)
    # The service's event loop (`service/__main__.py`): a baseline on asyncio's own would be
    # slower than the stack it stands for, and flatter the ratios.
    loop = uvloop.new_event_loop()
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None, loop=loop)


if __name__ == "__main__":
    main()
