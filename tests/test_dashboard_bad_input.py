"""/dashboard given what no browser sends: undecodable forms, odd cookies, raw header bytes.

The forms answered 500 once: every dashboard POST now reads its form through one reader that
turns an undecodable body into a 400 page. A cookie that cannot be a session id is no session,
and is never hashed nor looked up (its undecodable bytes could not be hashed).
"""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.raw_http import exchange
from tests.test_dashboard import log_in

Client = TestClient[web.Request, web.Application]

FORM = "application/x-www-form-urlencoded"
# A multipart body cut off in its first part: no closing boundary ever comes.
TRUNCATED_MULTIPART = b'--zz\r\nContent-Disposition: form-data; name="csrf"\r\n\r\nabc'
UNDECODABLE = [
    pytest.param(f"{FORM}; charset=x-unknown", b"token=abc", id="unknown-charset"),
    pytest.param(FORM, b"token=\xff\xfe", id="bad-utf-8"),
    # Codecs that decode to text no page or row can hold: a lone surrogate, a NUL.
    pytest.param(
        f"{FORM}; charset=unicode_escape", b"token=x&next=/dashboard?\\ud800", id="surrogate"
    ),
    pytest.param(FORM, b"token=x&error_code=%00x", id="nul"),
    pytest.param(f"{FORM}; charset=utf-8", b"csrf=\xc3\x28&token=x", id="bad-utf-8-declared"),
    pytest.param("multipart/form-data; boundary=zz", TRUNCATED_MULTIPART, id="truncated-multipart"),
    pytest.param(
        "multipart/form-data; boundary=zz",
        b'--zz\r\nContent-Disposition: form-data; name="token"\r\n'
        b"Content-Type: text/plain; charset=x-unknown\r\n\r\nabc\r\n--zz--\r\n",
        id="multipart-part-unknown-charset",
    ),
    pytest.param(
        "multipart/form-data; boundary=zz",
        b"--zz\r\nContent-Disposition: form-data\r\n\r\nabc\r\n--zz--\r\n",
        id="multipart-part-without-name",
    ),
    pytest.param("multipart/form-data", b"--zz\r\n\r\n", id="multipart-without-boundary"),
    pytest.param(
        "multipart/form-data; boundary=zz",
        b'--zz\r\nContent-Disposition: form-data; name="token"\r\n'
        b"Content-Type: multipart/mixed; boundary=yy\r\n\r\n--yy--\r\n--zz--\r\n",
        id="multipart-nested",
    ),
    pytest.param(
        "multipart/form-data; boundary=zz",
        b'--zz\r\nContent-Disposition: form-data; name="token"\r\n'
        b"Content-Transfer-Encoding: x-bogus\r\n\r\nabc\r\n--zz--\r\n",
        id="multipart-unknown-transfer-encoding",
    ),
    pytest.param(
        "multipart/form-data; boundary=zz",
        b'--zz\r\nContent-Disposition: form-data; name="_charset_"\r\n\r\n'
        + b"x" * 40
        + b'\r\n--zz\r\nContent-Disposition: form-data; name="token"\r\n\r\nabc\r\n--zz--\r\n',
        id="multipart-charset-field-too-long",
    ),
    pytest.param(
        "multipart/form-data; boundary=zz",
        b'--zz\r\nContent-Disposition: form-data; name="_charset_"\r\n\r\nx-unknown'
        b'\r\n--zz\r\nContent-Disposition: form-data; name="token"\r\n\r\nabc\r\n--zz--\r\n',
        id="multipart-charset-field-unknown",
    ),
]
ACTIONS = [
    "/dashboard/logout",
    "/dashboard/subscriptions/6a1c2e64-6d5e-4bd4-9d56-3b1b1ad2a1b0/retry",
    "/dashboard/failures/retry",
    "/dashboard/deliveries/1/replay",
]


async def assert_unreadable(response: object) -> None:
    assert response.status == 400, await response.text()  # type: ignore[attr-defined]
    assert "could not be read" in await response.text()  # type: ignore[attr-defined]
    assert response.content_type == "text/html"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("content_type", "body"), UNDECODABLE)
async def test_an_undecodable_login_form_is_a_400_page(
    api: Client, content_type: str, body: bytes
) -> None:
    response = await api.post("/dashboard/login", data=body, headers={"Content-Type": content_type})
    await assert_unreadable(response)


@pytest.mark.parametrize(("content_type", "body"), UNDECODABLE)
async def test_an_undecodable_action_form_is_a_400_page(
    api: Client, token: str, content_type: str, body: bytes
) -> None:
    await log_in(api, token)
    for path in ACTIONS:
        response = await api.post(
            path, data=body, headers={"Content-Type": content_type}, allow_redirects=False
        )
        await assert_unreadable(response)
    # Nothing was done with them: the session is still open.
    assert (await api.get("/dashboard", allow_redirects=False)).status == 200


async def test_a_session_cookie_of_absurd_length_is_no_session(api: Client) -> None:
    response = await api.get(
        "/dashboard", headers={"Cookie": "dashboard_session=" + "A" * 6000}, allow_redirects=False
    )
    assert response.status == 303
    assert "ended=1" in response.headers["Location"]


async def raw_request(api: Client, request: bytes) -> bytes:
    """Write `request` as is on a new connection; the whole answer, head and body."""
    assert api.server.port is not None
    answer = await exchange(api.server.host, api.server.port, request)
    return answer.head + answer.body


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize(
    "cookie",
    [b"dashboard_session=\xff\xfe\xfd", b"dashboard_session=ok; other=\xc3\x28", b"\xff=\xfe"],
    ids=["session", "another-cookie", "name"],
)
async def test_cookies_with_non_utf8_bytes_are_no_session(api: Client, cookie: bytes) -> None:
    for request in (
        b"GET /dashboard HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: " + cookie + b"\r\n"
        b"Connection: close\r\n\r\n",
        b"POST /dashboard/logout HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: " + cookie + b"\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 6\r\n"
        b"Connection: close\r\n\r\ncsrf=x",
    ):
        answer = await raw_request(api, request)
        assert status_of(answer) == 303, answer
        assert b"Location: /dashboard/login?next=" in answer


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (b"Origin: http://\xff\xfe", 403),  # not this site
        (b"Sec-Fetch-Site: \xff", 401),  # not cross-site: on to the (bad) token
        (b"Host: \xff\xfe", 401),
    ],
    ids=["origin", "sec-fetch-site", "host"],
)
async def test_non_utf8_origin_and_fetch_headers_on_login_are_judged_not_crashed_on(
    api: Client, header: bytes, status: int
) -> None:
    body = b"token=tt_x_y"
    request = (
        b"POST /dashboard/login HTTP/1.1\r\n"
        + (b"" if header.startswith(b"Host") else b"Host: 127.0.0.1\r\n")
        + header
        + b"\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )
    answer = await raw_request(api, request)
    assert status_of(answer) == status, answer


@pytest.mark.parametrize("csrf", ["é" * 43, "x" * 5000], ids=["non-ascii", "long"])
async def test_an_odd_csrf_field_is_a_stale_form(api: Client, token: str, csrf: str) -> None:
    await log_in(api, token)
    response = await api.post("/dashboard/logout", data={"csrf": csrf}, allow_redirects=False)
    assert response.status == 403
    assert "stale or not from this dashboard" in await response.text()


async def test_a_csrf_field_holding_a_nul_is_an_unreadable_form(api: Client, token: str) -> None:
    await log_in(api, token)
    response = await api.post("/dashboard/logout", data={"csrf": "\u0000"}, allow_redirects=False)
    assert response.status == 400
    assert "could not be read" in await response.text()
