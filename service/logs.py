"""Structured logs: one JSON object per line on stdout, with stable keys.

No line may hold a secret, a token or a payload. Four guards, each for what the others miss:
exceptions are rendered without their frames' locals (structlog's default shows them, and a
frame's locals hold settings, requests and tokens); the types that hold secrets print `***`;
aiohttp's parser errors, which quote the offending header line whole, are logged by type only;
and every line is scrubbed of the configured secret values, and of anything shaped like a
bearer token or a dashboard session cookie, before it is written.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import structlog
from aiohttp.http_exceptions import HttpProcessingError
from structlog.tracebacks import ExceptionDictTransformer

REDACTED = b"***"


def configure_logging(level: str, secrets: Iterable[str] = ()) -> None:
    """`secrets`: values no line may show (passwords, keys), replaced by `***` wherever they
    appear in a rendered line."""
    redact = _redactor(secrets)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    exceptions = structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))

    def serialize(event: Any, **kwargs: Any) -> bytes:
        # orjson: a line per webhook delivery made the standard library's encoder show up in
        # profiles. Anything orjson cannot encode is logged as its repr.
        return redact(orjson.dumps(event, default=repr))

    structlog.configure(
        processors=[*shared, exceptions, structlog.processors.JSONRenderer(serializer=serialize)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.BytesLoggerFactory(sys.stdout.buffer),
        cache_logger_on_first_use=True,
    )
    # Libraries log through the standard library; render theirs the same way.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                exceptions,
                structlog.processors.JSONRenderer(
                    serializer=lambda event, **_: serialize(event).decode()
                ),
            ],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server = logging.getLogger("aiohttp.server")
    server.filters[:] = [_ParserErrorsByType()]


class _ParserErrorsByType(logging.Filter):
    """aiohttp logs a request it cannot parse at ERROR with a traceback whose message quotes the
    bad header line, a bearer token or a session cookie included. Anyone can send one: it is
    the sender's error, logged at INFO as its type alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.msg, record.args = "http.unparsable_request %s", (type(error).__name__,)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


def _redactor(secrets: Iterable[str]) -> Callable[[bytes], bytes]:
    """A function that replaces each secret, as it appears in a JSON line, by `***`."""
    forms = sorted(
        {form for secret in secrets if len(secret) >= 4 for form in _json_forms(secret)},
        key=len,
        reverse=True,  # a secret that contains another is replaced whole
    )

    def redact(line: bytes) -> bytes:
        for form in forms:
            if form in line:
                line = line.replace(form, REDACTED)
        if b"tt_" in line or b"dashboard_session" in line:
            line = _TOKEN.sub(rb"\1***", line)
        return line

    return redact


# A bearer token's secret (`tt_<id>_<secret>`) and a session cookie's value, wherever a
# library quotes them: the id stays, to say which token it was.
_TOKEN = re.compile(rb"(tt_[0-9a-f]{1,32}_|dashboard_session=)[A-Za-z0-9_-]{4,}")


def _json_forms(secret: str) -> set[bytes]:
    """The secret as JSON writes it inside a string, and as its repr would be written there."""
    return {orjson.dumps(text)[1:-1] for text in (secret, repr(secret)[1:-1])}
