"""The bot's hot queries (undelivered jobs, a user's or server's active jobs) read a partial index."""

from __future__ import annotations

import asyncio
import sqlite3

from bot.db import Database


def _plans(db_path, statements):
    con = sqlite3.connect(db_path)
    try:
        return {sql: " | ".join(row[3] for row in con.execute("EXPLAIN QUERY PLAN " + sql, args))
                for sql, args in statements}
    finally:
        con.close()


def test_undelivered_and_active_counts_use_partial_indexes(tmp_path):
    """At a million jobs a scan costs ~0.1 s per call; the plan must name the partial index, not scan."""
    path = tmp_path / "bot.sqlite3"
    seen: list[str] = []

    async def run():
        db = await Database.open(path)
        try:
            await db._conn.set_trace_callback(seen.append)
            await db.undelivered()
            await db.count_active(42)
            await db.count_active_in(7)
        finally:
            await db.close()

    asyncio.run(run())
    queries = [sql for sql in seen if sql.lstrip().upper().startswith("SELECT")]
    assert len(queries) == 3, queries
    # The trace shows the statements with their values bound; plan them as they ran.
    plans = _plans(path, [(sql, ()) for sql in queries])
    assert "jobs_undelivered" in plans[queries[0]], plans
    assert "INDEX jobs_user_status (user_id=? AND status=?)" in plans[queries[1]], plans
    assert "jobs_active_guild" in plans[queries[2]], plans
