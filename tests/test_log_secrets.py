"""No secret reaches a log line: exceptions without locals, secret types print `***`, and the
configured secret values are scrubbed from every line, ours and the libraries'."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from service.db.engine import create_engine
from service.domain.access import issue_token, read_token
from service.logs import configure_logging
from service.settings import Settings

PASSWORD = "pg-pass-3141"
API_KEY = "TEST_key_2718"
WEBHOOK_SECRET = "shared-secret-1618"


def secret_settings() -> Settings:
    return Settings(
        database_url=f"postgresql://app:{PASSWORD}@db.internal:5432/tracking",
        database_read_url=f"postgresql://ro:{PASSWORD}@replica:5432/tracking",
        shipengine_api_key=API_KEY,
        webhook_secret_header="X-Hook-Secret",
        webhook_secret=WEBHOOK_SECRET,
    )


@pytest.fixture
def restore_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def log_to(capfd: pytest.CaptureFixture[str]) -> Callable[[], list[dict[str, Any]]]:
    """The service's own logging set-up, on stdout; call the result for the lines written."""
    configure_logging("DEBUG", secret_settings().secret_values())

    def lines() -> list[dict[str, Any]]:
        written = capfd.readouterr().out.splitlines()
        assert written, "nothing was logged"
        for line in written:
            for secret in (PASSWORD, API_KEY, WEBHOOK_SECRET):
                assert secret not in line, line
        return [json.loads(line) for line in written]

    return lines


def test_settings_print_their_secrets_as_stars() -> None:
    shown = repr(secret_settings())
    assert "***" in shown
    for secret in (PASSWORD, API_KEY, WEBHOOK_SECRET):
        assert secret not in shown
    assert "db.internal" in shown  # what is not secret stays, to be useful


def test_tokens_print_their_secrets_as_stars() -> None:
    issued = issue_token()
    presented = read_token(f"Bearer {issued.plaintext}")
    assert presented is not None
    secret = issued.plaintext.rsplit("_", 1)[1]
    for shown in (repr(issued), repr(presented), str(presented)):
        assert secret not in shown
        assert "***" in shown


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer tt_abc_\udcff\udcfe",  # bytes that were not UTF-8, as aiohttp hands them over
        "Bearer tt_abc_sécret",
        "Bearer tt_ABC!_secret",
        "Bearer tt_abc_" + "a" * 5000,
        "Bearer tt__secret",
    ],
)
def test_what_is_not_a_token_shaped_string_is_no_token(authorization: str) -> None:
    assert read_token(authorization) is None


@pytest.mark.usefixtures("restore_logging")
def test_an_exception_is_logged_without_its_frames_locals(
    capfd: pytest.CaptureFixture[str],
) -> None:
    logged = log_to(capfd)
    token = issue_token().plaintext

    def fail(presented: str) -> None:
        raise RuntimeError("boom")

    try:
        fail(token)
    except RuntimeError:
        structlog.get_logger("test").exception("it.failed")
        logging.getLogger("library").error("a library's error", exc_info=True)
    lines = logged()
    assert len(lines) == 2
    assert all("RuntimeError" in json.dumps(line) for line in lines)  # the trace is there...
    assert all(token not in json.dumps(line) for line in lines)  # ...but not the locals
    assert all('"locals":' not in json.dumps(line) for line in lines)


@pytest.mark.usefixtures("restore_logging")
def test_configured_secrets_are_scrubbed_from_every_line(
    capfd: pytest.CaptureFixture[str],
) -> None:
    logged = log_to(capfd)
    log = structlog.get_logger("test")
    log.warning("connect.failed", url=f"postgresql://app:{PASSWORD}@db/x", key=API_KEY)
    logging.getLogger("library").warning("sent %s", WEBHOOK_SECRET)
    ours, theirs = logged()
    assert ours["url"] == "postgresql://app:***@db/x"
    assert ours["key"] == "***"
    assert theirs["event"] == "sent ***"


def test_sqlalchemy_errors_hide_their_parameters() -> None:
    engine = create_engine("postgresql://nobody@127.0.0.1:1/none")
    assert engine.sync_engine.hide_parameters


@pytest.mark.usefixtures("restore_logging")
def test_anything_shaped_like_a_token_or_a_session_cookie_is_scrubbed(
    capfd: pytest.CaptureFixture[str],
) -> None:
    logged = log_to(capfd)
    token = issue_token()
    logging.getLogger("library").warning("header %s", f"Bearer {token.plaintext}")
    structlog.get_logger("test").info("cookie", raw="dashboard_session=AbCdEf0123456789_-xyz; x=1")
    theirs, ours = logged()
    assert theirs["event"] == f"header Bearer tt_{token.token_id}_***"
    assert ours["raw"] == "dashboard_session=***; x=1"
