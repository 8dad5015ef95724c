"""What a refused webhook may cost us: a count, or now and then a small sample.

Anyone can post to the webhook URL, so a refusal must cost next to nothing: each one is counted
(`tracking_webhook_refusals_total`), but only a sample is stored, at most
WEBHOOK_REFUSAL_SAMPLE_PER_MINUTE per process, each at most `SAMPLE_BYTES` of allow-listed
headers and body. Requests without signature headers are never stored: they are not ShipEngine's
and say nothing worth keeping. The refusals not stored are counted in memory and added to
`webhook_refusal_counts` every `FLUSH_INTERVAL_S`, for the ops summary.

Stored headers, of samples and of accepted deliveries alike, never hold a credential
(`authorization`, `cookie`, the shared-secret header), and hold only Unicode: header bytes that
are not UTF-8 are kept as U+FFFD.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping

import orjson
import structlog
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.keys import ENGINE, SETTINGS
from service.db.deliveries import count_unstored_refusals
from service.webhooks.signatures import KEY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER

log = structlog.get_logger(__name__)

# A stored sample: its headers and body together, in bytes.
SAMPLE_BYTES = 4 * 1024
# A sampled header value is cut to this; a 4096-bit signature (684 characters) fits.
SAMPLE_VALUE_CHARS = 700
# What a sample keeps of the headers, in this order: what tells why it was refused and who sent
# it. Anything else a sender adds is dropped, however much of it there is.
SAMPLED_HEADERS = (
    KEY_ID_HEADER,
    TIMESTAMP_HEADER,
    SIGNATURE_HEADER,
    "content-type",
    "content-length",
    "content-encoding",
    "user-agent",
    "x-forwarded-for",
    "x-real-ip",
    "forwarded",
    "x-request-id",
)
# Credentials a proxy or a confused sender may add; never stored, whatever is refused or kept.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
# Refusals never stored, only counted: no signature headers means not ShipEngine.
NEVER_SAMPLED = frozenset({"missing_headers"})
FLUSH_INTERVAL_S = 10.0


def readable(value: str) -> str:
    """`value` as Unicode that JSON and jsonb hold: aiohttp decodes header bytes that are not
    UTF-8 to lone surrogates ("surrogateescape"), which neither can encode; each such byte
    becomes U+FFFD. NUL, which jsonb refuses too, is dropped."""
    if value.isascii() and "\x00" not in value:  # nearly always: returned as is
        return value
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no byte decoded to: not from aiohttp's parser
        raw = value.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace").replace("\x00", "")


def stored_headers(headers: Iterable[tuple[str, str]], secret_header: str | None) -> dict[str, str]:
    """Every header as received but the credentials (names lower-cased, repeats joined), fit
    to store with an accepted delivery."""
    dropped = _credentials(secret_header)
    kept: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        if key in dropped:
            continue
        text = readable(value)
        kept[key] = f"{kept[key]}, {text}" if key in kept else text
    return kept


def sample(
    headers: Mapping[str, str], body: bytes, secret_header: str | None
) -> tuple[dict[str, str], bytes]:
    """What a stored refusal keeps: the allow-listed headers (each value cut short) and as
    much of the body as fits in SAMPLE_BYTES with them, the headers measured as the JSON text
    they are stored as."""
    dropped = _credentials(secret_header)
    kept: dict[str, str] = {}
    room = SAMPLE_BYTES - len("{}")
    for name in SAMPLED_HEADERS:
        if name in dropped or (value := headers.get(name)) is None:
            continue
        text = readable(value[:SAMPLE_VALUE_CHARS])
        # Quoted and escaped, with the `: ` and `, ` around it.
        size = len(orjson.dumps(name)) + len(orjson.dumps(text)) + len(": , ")
        if size > room:
            break
        kept[name] = text
        room -= size
    return kept, body[:room]


def _credentials(secret_header: str | None) -> frozenset[str]:
    if not secret_header:
        return CREDENTIAL_HEADERS
    return CREDENTIAL_HEADERS | {secret_header.lower()}


class SampleBudget:
    """A token bucket: at most `per_minute` samples a minute, in bursts of as many."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = float(per_minute)
        self._per_s = per_minute / 60.0
        self._clock = clock
        self._tokens = self._capacity
        self._at = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._at) * self._per_s)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class RefusalLedger:
    """Decides which refusals are stored; counts the others until they are flushed."""

    def __init__(self, budget: SampleBudget, *, keep_days: int) -> None:
        self._budget = budget
        self._keep_days = keep_days
        self._unstored: collections.Counter[str] = collections.Counter()

    def store(self, reason: str) -> bool:
        """Whether this refusal is stored as a sample; if not, it is counted."""
        if reason not in NEVER_SAMPLED and self._budget.take():
            return True
        self._unstored[reason] += 1
        return False

    async def flush(self, engine: AsyncEngine) -> None:
        """Add the counts so far to the database's; kept for the next flush if that fails."""
        if not self._unstored:
            return  # a quiet process does not touch the database
        counts, self._unstored = self._unstored, collections.Counter()
        try:
            async with engine.begin() as conn:
                await count_unstored_refusals(conn, counts, keep_days=self._keep_days)
        except Exception:
            self._unstored.update(counts)
            log.warning("webhook.refusal_counts_not_flushed", counts=dict(counts), exc_info=True)


REFUSALS = web.AppKey("webhook_refusals", RefusalLedger)


async def refusal_ledger(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx, after the engine's: flushed every FLUSH_INTERVAL_S, and a last time when
    the app stops (before the engine is disposed)."""
    settings = app[SETTINGS]
    ledger = RefusalLedger(
        SampleBudget(settings.webhook_refusal_sample_per_minute),
        keep_days=settings.delivery_retention_days,
    )
    app[REFUSALS] = ledger

    async def flush_forever() -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            await ledger.flush(app[ENGINE])

    task = asyncio.create_task(flush_forever())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await ledger.flush(app[ENGINE])
