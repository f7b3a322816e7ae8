"""CPU bench rows of issue 15 (``python -m engine bench --only fusion``): fused LoRA, scheduler, SQLite indexes.

Rows (each ``Ratio.case`` is the row's stable id):

- ``fused_vs_unfused``: a fast job (LCM 4 steps + a style LoRA), unfused / fused, same mix on
  consecutive jobs as in production; the note gives the largest pixel difference and what
  one mix change costs fused.
- ``scheduler_1000_vs_10``: one queue operation (push, which answers the position, a
  position query, pop) with 1,000 jobs queued / with 10, ten owners in both; bound 5.
- ``sqlite_undelivered_1m``: ``undelivered()`` at 1,000,000 finished jobs, the query as it ran
  before migration 0013 (the ``jobs_status`` index) / as it runs now (the partial index).
- ``sqlite_count_active_guild_1m``: ``count_active_in(guild)`` on the same database, through
  ``jobs_status`` / through the partial ``jobs_active_guild``. (``count_active(user)`` already
  reads the covering ``jobs_user_status`` index of migration 0011.)
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from engine.benchmarks.ratios import Ratio


def bench_fusion(env: Any, trials: int) -> list[Ratio]:
    return [bench_fused_vs_unfused(env, trials), bench_scheduler(), *bench_sqlite()]


def bench_fused_vs_unfused(env: Any, trials: int) -> Ratio:
    import numpy as np
    from PIL import Image

    registry = env.generator.registry
    style = [{"name": "style-a", "weight": 0.8}]
    run = lambda: env.generate(prompt="1girl, solo", seed=1, fast=True, adapters=style)  # noqa: E731
    times: dict[str, list[float]] = {"fused": [], "unfused": []}
    images: dict[str, Any] = {}
    for _ in range(trials):
        for execution in ("unfused", "fused"):
            registry.set_lora_execution(execution)
            out = run()  # the first job after a switch pays the fuse; later ones reuse it
            t0 = time.perf_counter()
            run()
            times[execution].append(time.perf_counter() - t0)
            with Image.open(out.images[0].path) as im:
                images[execution] = np.asarray(im.convert("RGB"), dtype=np.int16)
    registry.set_lora_execution("fused")
    mixes = [[("style-a", 0.8)], [("style-a", 0.5)]]
    t0 = time.perf_counter()
    for i in range(10):
        registry.apply_mix(mixes[i % 2])
    change_ms = (time.perf_counter() - t0) / 10 * 1000
    diff = int(np.abs(images["fused"] - images["unfused"]).max())
    t_unfused, t_fused = statistics.median(times["unfused"]), statistics.median(times["fused"])
    return Ratio("fused_vs_unfused", "fast job, 2 LoRAs: unfused / fused (same mix as the last job)", t_unfused,
                 t_fused, t_unfused / t_fused, f"max pixel diff {diff}/255; a fused mix change {change_ms:.1f} ms", id="fused_vs_unfused")


def _queue_op_seconds(size: int, owners: int = 10, ops: int = 300) -> float:
    from engine.scheduler import FairScheduler, ScheduledJob

    rng = random.Random(size)
    s = FairScheduler(size + 10)
    for i in range(size):
        s.push(ScheduledJob(f"j{i}", f"u{i % owners}", rng.choice(["interactive", "batch"])))
    t0 = time.perf_counter()
    for i in range(ops):
        job_id = f"n{i}"
        s.push(ScheduledJob(job_id, f"u{i % owners}", "batch"))  # push answers the job's position
        s.position(job_id)  # a status display asking again
        s.pop()
    return (time.perf_counter() - t0) / ops


def bench_scheduler() -> Ratio:
    t10 = statistics.median(_queue_op_seconds(10) for _ in range(3))
    t1000 = statistics.median(_queue_op_seconds(1000) for _ in range(3))
    return Ratio("scheduler_1000_vs_10", "queue op (push + position + pop): 1,000 queued / 10", t1000, t10,
                 t1000 / t10, "bound: 5; was 48 ms per position at 1,000", id="scheduler_1000_vs_10")


def _build_jobs_db(path: Path, rows: int) -> None:
    """The bot's real schema (its migrations) with ``rows`` finished, delivered jobs and 5 undelivered."""
    from bot.db import Database

    async def create() -> None:
        db = await Database.open(path)
        await db.close()

    asyncio.run(create())
    con = sqlite3.connect(path)
    now = time.time()
    statuses = ("completed",) * 5 + ("failed", "canceled")
    finished = ((f"job-{i}", i % 5000, i % 50, statuses[i % 7], now - i, now - i, None if i < 5 else now)
                for i in range(rows))
    con.executemany("INSERT INTO jobs (job_id, user_id, guild_id, channel_id, status, params_json, created_at,"
                    " finished_at, delivered_at) VALUES (?, ?, ?, 1, ?, '{}', ?, ?, ?)", finished)
    active = ((f"active-{i}", i, 7, "pending" if i % 2 else "running", now) for i in range(20))
    con.executemany("INSERT INTO jobs (job_id, user_id, guild_id, channel_id, status, params_json, created_at)"
                    " VALUES (?, ?, ?, 1, ?, '{}', ?)", active)
    con.commit()
    con.execute("ANALYZE")
    con.close()


def _median_query_seconds(con: sqlite3.Connection, sql: str, repeat: int = 5) -> float:
    def once() -> float:
        t0 = time.perf_counter()
        con.execute(sql).fetchall()
        return time.perf_counter() - t0

    return statistics.median(once() for _ in range(repeat))


def bench_sqlite(rows: int = 1_000_000, timer: Callable[..., float] = _median_query_seconds) -> list[Ratio]:
    undelivered = "WHERE status IN ('completed', 'failed') AND delivered_at IS NULL ORDER BY finished_at"
    active = "WHERE status IN ('pending', 'running') AND guild_id IS 7"
    with tempfile.TemporaryDirectory(prefix="arcae-sqlite-") as tmp:
        path = Path(tmp) / "bot.sqlite3"
        _build_jobs_db(path, rows)
        con = sqlite3.connect(path)
        try:
            u_before = timer(con, f"SELECT * FROM jobs INDEXED BY jobs_status {undelivered}")
            u_after = timer(con, f"SELECT * FROM jobs INDEXED BY jobs_undelivered {undelivered}")
            a_before = timer(con, f"SELECT COUNT(*) FROM jobs INDEXED BY jobs_status {active}")
            a_after = timer(con, f"SELECT COUNT(*) FROM jobs INDEXED BY jobs_active_guild {active}")
        finally:
            con.close()
    return [
        Ratio("sqlite_undelivered_1m", f"undelivered() at {rows:,} jobs: before 0013 / with its index", u_before,
              u_after, u_before / u_after, "issue 15 measured 129 ms at 1M jobs", id="sqlite_undelivered_1m"),
        Ratio("sqlite_count_active_guild_1m", f"count_active_in(guild) at {rows:,} jobs: before 0013 / with it",
              a_before, a_after, a_before / a_after, "20 active jobs in the guild", id="sqlite_count_active_guild_1m"),
    ]
