"""JSON read and written fast, and exactly.

orjson parses several times faster than the standard library, but reads an integer outside
64 bits as a float, silently: a USPS tracking number sent as a JSON number (22 digits) would
come out as 9.405511899223197e+21. Such integers have at least 19 digits in a row, found in a
microsecond by mapping every digit to "0" and searching for nineteen of them (a regular
expression took five times orjson's whole parse); bodies with them, and what orjson refuses but
is JSON all the same (NaN, which the standard library accepts), go to the standard library.
Writing, orjson refuses those integers outright, and the standard library writes them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson

_DIGITS_TO_ZERO = bytes.maketrans(b"0123456789", b"0" * 10)
_LONG_DIGITS = b"0" * 19


def loads(raw: bytes) -> object:
    """Raises ValueError (and RecursionError, for nesting too deep) as json.loads does; also
    for text escaping a lone surrogate (`"\\ud800"`), which can be neither hashed nor stored."""
    if _LONG_DIGITS not in raw.translate(_DIGITS_TO_ZERO):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # the standard library decides, and words the error
    value = json.loads(raw)
    if b"\\u" in raw:  # orjson refuses lone surrogates; only an escape makes one
        json.dumps(value, ensure_ascii=False).encode()  # UnicodeEncodeError: a ValueError
    return value


def dumps(
    value: Any, *, sort_keys: bool = False, default: Callable[[Any], Any] | None = None
) -> bytes:
    """Compact UTF-8 JSON; the same bytes from either library (but for the rare float orjson
    writes otherwise: 1e16 against 1e+16). `default` serves what neither writes itself; orjson
    writes UUIDs and datetimes itself, the standard library asks `default` for them."""
    try:
        return orjson.dumps(
            value, default=default, option=orjson.OPT_SORT_KEYS if sort_keys else None
        )
    except orjson.JSONEncodeError:  # integers past 64 bits
        text = json.dumps(
            value, sort_keys=sort_keys, separators=(",", ":"), ensure_ascii=False, default=default
        )
        return text.encode("utf-8", "surrogatepass")
