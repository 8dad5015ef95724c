"""Structured logs: one JSON object per line on stdout, with stable keys.

No line may hold a secret, a token or a payload. Three guards, each for what the others miss:
exceptions are rendered without their frames' locals (structlog's default shows them, and a
frame's locals hold settings, requests and tokens); the types that hold secrets print `***`;
and every line is scrubbed of the configured secret values before it is written.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import structlog
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


def _redactor(secrets: Iterable[str]) -> Callable[[bytes], bytes]:
    """A function that replaces each secret, as it appears in a JSON line, by `***`."""
    forms = sorted(
        {form for secret in secrets if len(secret) >= 4 for form in _json_forms(secret)},
        key=len,
        reverse=True,  # a secret that contains another is replaced whole
    )
    if not forms:
        return _unchanged

    def redact(line: bytes) -> bytes:
        for form in forms:
            if form in line:
                line = line.replace(form, REDACTED)
        return line

    return redact


def _json_forms(secret: str) -> set[bytes]:
    """The secret as JSON writes it inside a string, and as its repr would be written there."""
    return {orjson.dumps(text)[1:-1] for text in (secret, repr(secret)[1:-1])}


def _unchanged(line: bytes) -> bytes:
    return line
