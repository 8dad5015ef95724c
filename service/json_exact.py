"""JSON read and written fast, and exactly.

orjson parses several times faster than the standard library, but reads an integer outside
64 bits as a float, silently: a USPS tracking number sent as a JSON number (22 digits) would
come out as 9.405511899223197e+21. Such integers have at least 19 digits in a row, which a
regular expression finds in a microsecond; bodies with them, and what orjson refuses but is
JSON all the same (NaN, which the standard library accepts), go to the standard library.
Writing, orjson refuses those integers outright, and the standard library writes them.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def loads(raw: bytes) -> object:
    """Raises ValueError (and RecursionError, for nesting too deep) as json.loads does; also
    for text escaping a lone surrogate (`"\\ud800"`), which can be neither hashed nor stored."""
    if _LONG_DIGITS.search(raw) is None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # the standard library decides, and words the error
    value = json.loads(raw)
    if b"\\u" in raw:  # orjson refuses lone surrogates; only an escape makes one
        json.dumps(value, ensure_ascii=False).encode()  # UnicodeEncodeError: a ValueError
    return value


def dumps(value: Any, *, sort_keys: bool = False) -> bytes:
    """Compact UTF-8 JSON; the same bytes from either library (but for the rare float orjson
    writes otherwise: 1e16 against 1e+16)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else None)
    except orjson.JSONEncodeError:  # integers past 64 bits
        text = json.dumps(value, sort_keys=sort_keys, separators=(",", ":"), ensure_ascii=False)
        return text.encode("utf-8", "surrogatepass")
