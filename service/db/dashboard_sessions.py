"""Dashboard sessions: opened at login, looked up on every request, closed at logout.

A session is named by 256 random bits that only the browser's cookie holds; the row keeps their
SHA-256 (a fast hash is enough for 256 random bits: nothing to brute-force), so reading the
table opens no session. A lookup finds a session only before it expires and while its token is
not revoked; deleting the token deletes its sessions. Opening a session first deletes a bounded
batch of expired or revoked ones, and a token keeps only its newest MAX_PER_TOKEN sessions, so
logins cannot grow the table without end. Callers own the transactions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from service.db.tables import api_tokens, dashboard_sessions

SESSION_TTL = timedelta(hours=8)
MAX_PER_TOKEN = 20
SWEEP_BATCH = 100

_sessions = dashboard_sessions


@dataclasses.dataclass(frozen=True, repr=False)
class OpenedSession:
    session_id: str  # for the cookie; never stored
    csrf: str

    def __repr__(self) -> str:
        return "OpenedSession(session_id='***', csrf='***')"


def digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


async def open_session(
    conn: AsyncConnection,
    token_id: str,
    *,
    ttl: timedelta = SESSION_TTL,
    max_per_token: int = MAX_PER_TOKEN,
    sweep_batch: int = SWEEP_BATCH,
) -> OpenedSession:
    await sweep(conn, sweep_batch)
    opened = OpenedSession(secrets.token_urlsafe(32), secrets.token_urlsafe(32))
    await conn.execute(
        sa.insert(_sessions).values(
            id_sha256=digest(opened.session_id),
            token_id=token_id,
            csrf_token=opened.csrf,
            expires_at=sa.func.now() + ttl,
        )
    )
    await _keep_newest(conn, token_id, max_per_token)
    return opened


async def find_session(conn: AsyncConnection, session_id: str) -> RowMapping | None:
    """A live session with its token's client and scopes: unexpired, its token unrevoked."""
    query = (
        sa.select(
            _sessions.c.token_id,
            _sessions.c.csrf_token,
            _sessions.c.flash,
            _sessions.c.expires_at,
            api_tokens.c.client,
            api_tokens.c.scopes,
        )
        .join(api_tokens, api_tokens.c.token_id == _sessions.c.token_id)
        .where(
            _sessions.c.id_sha256 == digest(session_id),
            _sessions.c.expires_at > sa.func.now(),
            api_tokens.c.revoked_at.is_(None),
        )
    )
    return (await conn.execute(query)).mappings().first()


async def close_session(conn: AsyncConnection, session_id: str) -> None:
    await conn.execute(sa.delete(_sessions).where(_sessions.c.id_sha256 == digest(session_id)))


async def set_flash(conn: AsyncConnection, session_id: str, message: str) -> None:
    """The message the session's next page shows."""
    await conn.execute(
        sa.update(_sessions)
        .where(_sessions.c.id_sha256 == digest(session_id))
        .values(flash=message)
    )


async def clear_flash(conn: AsyncConnection, session_id: str, shown: str) -> None:
    """The message was shown: it goes, unless another has replaced it meanwhile."""
    await conn.execute(
        sa.update(_sessions)
        .where(_sessions.c.id_sha256 == digest(session_id), _sessions.c.flash == shown)
        .values(flash=None)
    )


async def sweep(conn: AsyncConnection, limit: int = SWEEP_BATCH) -> int:
    """Delete at most `limit` sessions that no lookup can find any more; how many went."""
    revoked = sa.select(api_tokens.c.token_id).where(api_tokens.c.revoked_at.is_not(None))
    dead = (
        sa.select(_sessions.c.id_sha256)
        .where(sa.or_(_sessions.c.expires_at <= sa.func.now(), _sessions.c.token_id.in_(revoked)))
        .limit(limit)
        .with_for_update(skip_locked=True)  # two logins at once sweep different rows
    )
    result = await conn.execute(sa.delete(_sessions).where(_sessions.c.id_sha256.in_(dead)))
    return int(result.rowcount)


async def _keep_newest(conn: AsyncConnection, token_id: str, keep: int) -> None:
    newest = (
        sa.select(_sessions.c.id_sha256)
        .where(_sessions.c.token_id == token_id)
        .order_by(_sessions.c.created_at.desc(), _sessions.c.expires_at.desc())
        .limit(keep)
    )
    await conn.execute(
        sa.delete(_sessions).where(
            _sessions.c.token_id == token_id, _sessions.c.id_sha256.not_in(newest)
        )
    )
