"""HTTP/1.1 requests written byte for byte: header values no client library would send.

aiohttp's client (like any) refuses to put non-UTF-8 bytes in a header; a sender on the
internet has no such scruples. This writes the request on a plain TCP connection and reads the
answer until the server closes it (`Connection: close`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

# A safety stop for a server that never answers, not a guess at how long anything takes.
ANSWER_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True)
class RawAnswer:
    """`status` 0: the server hung up without answering (a request it could not parse)."""

    status: int
    head: bytes
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def header_bytes(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in headers.items()]


def request_bytes(
    method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes, host: bytes
) -> bytes:
    """The request's head (Host, Content-Length and Connection added) and `body`."""
    head = [
        method + b" " + path + b" HTTP/1.1",
        b"Host: " + host,
        b"Content-Length: " + str(len(body)).encode(),
        b"Connection: close",
        *(name + b": " + value for name, value in headers),
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


async def exchange(host: str, port: int, request: bytes) -> RawAnswer:
    """Write `request` as is on a new connection; the answer, read to the end."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            return await _read_answer(reader)
    except ConnectionResetError:
        return RawAnswer(0, b"", b"")
    finally:
        writer.close()


async def raw_post(
    client: TestClient[web.Request, web.Application],
    path: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    *,
    send_body: bool = True,
) -> RawAnswer:
    """POST `body` with exactly these header bytes. With `send_body=False` only the head is
    sent: the answer shows the server did not wait for the body it was promised."""
    host, port = client.server.host, client.server.port
    assert port is not None
    request = request_bytes(b"POST", path.encode(), headers, body, f"{host}:{port}".encode())
    return await exchange(host, port, request if send_body else request[: -len(body) or None])


async def _read_answer(reader: asyncio.StreamReader) -> RawAnswer:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return RawAnswer(0, b"", b"")  # closed without an answer
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    # By its length where it gives one: a server still owed a body need not close first.
    body = await (reader.readexactly(length) if length is not None else reader.read())
    return RawAnswer(int(head.split(b" ", 2)[1]), head, body)
