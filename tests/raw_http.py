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
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def header_bytes(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in headers.items()]


async def raw_post(
    client: TestClient[web.Request, web.Application],
    path: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    *,
    send_body: bool = True,
) -> RawAnswer:
    """POST `body` with exactly these header bytes (Host, Content-Length and Connection are
    added). With `send_body=False` only the head is sent: the answer shows the server did not
    wait for the body it was promised."""
    host, port = client.server.host, client.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = [
            b"POST " + path.encode() + b" HTTP/1.1",
            b"Host: " + f"{host}:{port}".encode(),
            b"Content-Length: " + str(len(body)).encode(),
            b"Connection: close",
            *(name + b": " + value for name, value in headers),
        ]
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + (body if send_body else b""))
        await writer.drain()
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            answer = await _read_answer(reader)
    finally:
        writer.close()
    return answer


async def _read_answer(reader: asyncio.StreamReader) -> RawAnswer:
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    length = None
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    body = await (reader.readexactly(length) if length is not None else reader.read())
    return RawAnswer(status, body)
