"""JSON bodies parsed fast, and exactly.

orjson parses several times faster than the standard library, but reads an integer outside
64 bits as a float, silently: a USPS tracking number sent as a JSON number (22 digits) would
come out as 9.405511899223197e+21. Such integers have at least 19 digits in a row, which a
regular expression finds in a microsecond; bodies with them, and what orjson refuses but is
JSON all the same (NaN, which the standard library accepts), go to the standard library.
"""

from __future__ import annotations

import json
import re

import orjson

_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def loads(raw: bytes) -> object:
    """Raises ValueError (and RecursionError, for nesting too deep) as json.loads does."""
    if _LONG_DIGITS.search(raw) is None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # the standard library decides, and words the error
    return json.loads(raw)
