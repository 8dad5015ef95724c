"""The benchmarks' wrk driver (`bench/wrk.py`, `bench/wrk_replay.lua`): what wrk sends is the
prepared requests, byte for byte and in order, and its figures are read back."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench import wrk

pytestmark = pytest.mark.skipif(wrk.executable() is None, reason="no wrk (`make wrk`)")


async def test_wrk_replays_the_prepared_requests_in_order_and_reports_its_figures(
    tmp_path: Path,
) -> None:
    received: list[tuple[str, str, bytes]] = []

    async def record(request: web.Request) -> web.Response:
        body = await request.read()
        received.append((request.path, request.headers.get("X-Signed", ""), body))
        return web.Response(status=404 if request.path == "/refused" else 204)

    app = web.Application()
    app.router.add_post("/{name}", record)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    prepared = [
        wrk.RawRequest("POST", "/one", {"X-Signed": "first"}, b'{"n": 1}'),
        wrk.RawRequest("POST", "/two", {"X-Signed": "second"}, b""),
        wrk.RawRequest("POST", "/three", {"X-Signed": "third"}, "é\n".encode() * 3000),
    ]
    requests_file = tmp_path / "list.requests"
    try:
        assert wrk.write_requests(requests_file, prepared) == 3
        run = await wrk.run(str(server.make_url("")), requests_file, connections=1, duration_s=1)
    finally:
        await server.close()

    assert run.requests >= 3
    assert run.failed == 0
    assert run.rate > 0
    assert run.p50_ms <= run.p99_ms <= run.max_ms
    expected = [(r.path, r.headers["X-Signed"], r.body) for r in prepared]
    assert received[:3] == expected
    assert received[3:6] == expected[: len(received[3:6])]  # then round again


async def test_answers_of_400_and_above_are_counted_as_errors(tmp_path: Path) -> None:
    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=401)

    app = web.Application()
    app.router.add_post("/hook", refuse)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    requests_file = tmp_path / "list.requests"
    wrk.write_requests(requests_file, [wrk.RawRequest("POST", "/hook", {}, b"{}")])
    try:
        run = await wrk.run(str(server.make_url("")), requests_file, connections=1, duration_s=1)
    finally:
        await server.close()
    assert run.errors["status_errors"] == run.requests > 0
