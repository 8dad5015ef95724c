"""Typed reading of JSON request bodies; a bad field is a 400 in ShipEngine's error shape."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from service.simulator import errors

JsonObject = Mapping[str, Any]


async def json_object(request: web.Request) -> JsonObject:
    raw = await request.read()
    if not raw.strip():
        raise errors.request_body_required()
    try:
        data = json.loads(raw)
    except ValueError:
        raise errors.invalid_field("body", "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise errors.invalid_field("body", "The request body must be a JSON object.")
    return data


def optional_str(data: JsonObject, name: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise errors.invalid_field(name, f"{name} must be a string.")
    return value


def required_str(data: JsonObject, name: str) -> str:
    value = optional_str(data, name)
    if not value:
        raise errors.field_required(name)
    return value


def optional_number(data: JsonObject, name: str) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    # bool is an int in Python, but `true` is no number in JSON.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise errors.invalid_field(name, f"{name} must be a number.")
    return float(value)


def optional_int(data: JsonObject, name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.invalid_field(name, f"{name} must be an integer.")
    return value


def optional_bool(data: JsonObject, name: str) -> bool:
    value = data.get(name, False)
    if not isinstance(value, bool):
        raise errors.invalid_field(name, f"{name} must be true or false.")
    return value


def http_url(data: JsonObject, name: str) -> str | None:
    value = optional_str(data, name)
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise errors.invalid_field(name, f"{name} must be an http(s) URL.")
    return value


def headers(data: JsonObject, name: str = "headers") -> list[tuple[str, str]] | None:
    """`[{"key": ..., "value": ...}]`, ShipEngine's shape of custom webhook headers."""
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, list):
        raise errors.invalid_field(name, f"{name} must be a list of {{key, value}} objects.")
    pairs: list[tuple[str, str]] = []
    for item in value:
        if not isinstance(item, dict):
            raise errors.invalid_field(name, f"{name} must be a list of {{key, value}} objects.")
        key, header_value = item.get("key"), item.get("value")
        if not isinstance(key, str) or not key or not isinstance(header_value, str):
            raise errors.invalid_field(name, f"each of {name} needs a non-empty key and a value.")
        pairs.append((key, header_value))
    return pairs
