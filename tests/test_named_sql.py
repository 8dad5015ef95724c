"""Named SQL (`service/db/sql/*.sql`): how a file is read, and that the literals its statements
spell agree with the Python constants they stand for. No database needed."""

from __future__ import annotations

import importlib.resources
import re

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from service.db import changes, deliveries
from service.db.driver import named_sql, named_statements
from service.db.tables import (
    LIVE,
    LIVE_SQL,
    ORIGINAL,
    ORIGINAL_SQL,
    RECEIVED_WEEK,
    WATCHED,
    WATCHED_SQL,
    tracking_events,
)
from service.domain.changes import ChangeType
from service.domain.deliveries import DeliveryOutcome
from service.domain.subscriptions import SubscriptionState
from service.domain.tracking import TrackEvent


def _file(name: str) -> str:
    return importlib.resources.files("service.db").joinpath("sql", name).read_text("utf-8")


def _one_line(sql: str) -> str:
    return re.sub(r"\s+", " ", sql)


# The file's SQL, its comments left out.
DELIVERIES = _one_line(re.sub(r"--[^\n]*", "", _file("deliveries.sql")))
CHANGES = _one_line(re.sub(r"--[^\n]*", "", _file("changes.sql")))


def test_statements_are_named_and_parts_included_at_their_indentation() -> None:
    text = """-- What the file is.

-- name: both
-- Its documentation, left out.
SELECT x FROM (
    {inner}
) AS t WHERE y = :y

-- part: inner
-- A part.
SELECT 1 AS x,
       :y AS y  -- a comment of the text stays
-- name: other
SELECT :a, :b, :a, '{a,b}'::text[], x::int
"""
    assert named_sql(text) == {
        "both": "SELECT x FROM (\n    SELECT 1 AS x,\n           :y AS y  -- a comment of the text"
        " stays\n) AS t WHERE y = :y",
        "other": "SELECT :a, :b, :a, '{a,b}'::text[], x::int",
    }


def test_comments_around_a_block_are_neither_sent_nor_spliced() -> None:
    text = """-- name: a
SELECT x, {columns}, z
-- Said of the next statement, not sent with this one.

-- name: b
SELECT 2
-- part: columns
y
-- A note on the part: spliced mid-line, it would comment out the rest of the line.
"""
    assert named_sql(text) == {"a": "SELECT x, y, z", "b": "SELECT 2"}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("SELECT 1\n-- name: a\nSELECT 2\n", "before the first"),
        ("-- name: a\nSELECT 1\n-- part: a\nSELECT 2\n", "a twice"),
        ("-- name: a\nSELECT {b}\n", "no part b for a"),
        ("-- name: a\nSELECT {b}\n-- part: b\n({b})\n", "part b includes itself"),
        ("-- name: a\nSELECT 1\n-- part: b\nSELECT 2\n", "parts ['b'] are not used"),
        ("-- name: a\nSELECT 1 -- see {b}\n-- part: b\nSELECT 2\n", "named in a comment of a"),
    ],
)
def test_a_file_that_says_something_else_is_refused(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        named_sql(text)


def test_the_statements_of_deliveries_are_those_it_runs() -> None:
    statements = named_statements("deliveries.sql")
    assert statements == {
        "insert_originals_and_lock": deliveries._INSERT_ORIGINALS_AND_LOCK,
        "lock_live": deliveries._LOCK_LIVE,
        "orphans_of": deliveries._ORPHANS_OF,
        "mark": deliveries._MARK,
        "write_filings": deliveries._WRITE_FILINGS,
    }
    assert statements["write_filings"].names == (
        "statuses",
        "events",
        "candidates",
        "rearm_delay_s",
        "history",
        "deliveries",
        "bodies",
    )
    assert all(":" not in re.sub(r"::|--.*", "", s.sql) for s in statements.values())


def _literal(predicate: sa.ColumnElement[bool]) -> str:
    compiled = predicate.compile(
        dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
    )
    return re.sub(r"\bsubscriptions\.|\bwebhook_deliveries\.", "", str(compiled))


def test_each_shared_predicate_says_as_text_what_it_says_in_core() -> None:
    assert _literal(LIVE) == LIVE_SQL.replace("<>", "!=")
    assert _literal(WATCHED) == WATCHED_SQL
    assert _literal(ORIGINAL) == ORIGINAL_SQL


def test_the_shared_predicates_are_spelled_as_defined() -> None:
    # Every mention, with or without a table alias, is the predicate whole.
    lives = re.findall(r"\b(?:\w+\.)?state <> '\w+'", DELIVERIES)
    assert len(lives) == 3
    assert {re.sub(r"^\w+\.", "", found) for found in lives} == {LIVE_SQL}
    originals = re.findall(r"\b(?:\w+\.)?outcome IN \([^)]*\)", DELIVERIES)
    assert len(originals) == 2
    assert {re.sub(r"^\w+\.", "", found) for found in originals} == {ORIGINAL_SQL}
    assert re.findall(r"state = '\w+' AND done_at IS NULL", DELIVERIES) == [WATCHED_SQL]
    assert f"received_week = {RECEIVED_WEEK}" in DELIVERIES


def test_every_literal_is_an_outcome_a_state_or_a_kind_of_row() -> None:
    kinds = {"original", "live", "event", "copy"}  # `kind`, as deliveries.py reads it
    received_week = set(re.findall(r"'(\w+)'", RECEIVED_WEEK))
    allowed = {*DeliveryOutcome, *SubscriptionState, *kinds, *received_week}
    assert set(re.findall(r"'(\w+)'", DELIVERIES)) <= allowed
    orphan, filed = DeliveryOutcome.ORPHAN, DeliveryOutcome.FILED
    assert f"CASE WHEN live.id IS NULL THEN '{orphan}' ELSE '{filed}' END" in DELIVERIES
    assert f"'{DeliveryOutcome.DUPLICATE}', (SELECT o.subscription_id" in DELIVERIES


def test_events_are_written_with_every_field_of_an_event_as_its_column_type() -> None:
    def pg_type(column: sa.Column[object]) -> str:
        if isinstance(column.type, sa.DateTime):
            return "timestamptz"
        if isinstance(column.type, sa.Float):
            return "float8"
        assert isinstance(column.type, sa.Text)
        return "text"

    fields = TrackEvent._fields
    columns = ", ".join(f"{field} {pg_type(tracking_events.c[field])}" for field in fields)
    assert f"event_key, delivery_id, {', '.join(fields)})" in DELIVERIES
    assert f"delivery_id bigint, {columns})" in DELIVERIES


def test_the_statements_of_changes_are_those_it_runs() -> None:
    assert named_statements("changes.sql") == {"note": changes._NOTE}


@pytest.mark.parametrize("text", [DELIVERIES, CHANGES], ids=["deliveries", "changes"])
def test_every_change_type_spelled_is_one(text: str) -> None:
    spelled = set(re.findall(r"'(\w+\.\w+)'", text))
    assert spelled
    assert spelled <= set(ChangeType)


def test_a_noted_change_shows_an_event_as_filing_does_every_field_of_it() -> None:
    left_out = re.search(r"to_jsonb\(e\) - ARRAY\[([^]]*)\]", CHANGES)
    assert left_out is not None
    not_event = {name.strip(" '") for name in left_out[1].split(",")}
    assert {c.name for c in tracking_events.c} - not_event == set(TrackEvent._fields)


def test_the_shared_locks_statement_holds_integers_only_whatever_the_numbers_hold() -> None:
    numbers = ["1Z999", "x'); DROP TABLE subscriptions; --", "\\u0000$$", "1Z999", None, ""]
    sql = deliveries.shared_locks_sql(numbers)
    keys = re.fullmatch(
        r"SELECT count\(pg_advisory_xact_lock_shared\(k\)\) "
        r"FROM unnest\(ARRAY\[([0-9,]*)\]::bigint\[\]\) k",
        sql,
    )
    assert keys is not None, sql
    # The same keys subscribe's exclusive locks take, distinct and in order.
    expected = deliveries.package_lock_keys(
        ["1Z999", "x'); DROP TABLE subscriptions; --", "\\u0000$$"]
    )
    assert [int(key) for key in keys[1].split(",")] == expected == sorted(set(expected))
    assert deliveries.shared_locks_sql([None]).endswith("ARRAY[]::bigint[]) k")
