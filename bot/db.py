"""The bot's memory: one SQLite file (WAL) through aiosqlite, with numbered migrations.

Migrations are the files ``bot/migrations/NNNN_name.sql``; the ones not yet applied run
in one transaction, so a failed migration leaves the database as it was. Jobs are the
durable record of every request: a completed result is written here before it is
delivered, so a crash between the two delivers it on the next start.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

import aiosqlite

from engine.contract import protocol

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
ACTIVE = ("pending", "running")


@dataclass(frozen=True)
class Job:
    """One row of ``jobs``."""

    job_id: str
    user_id: int
    guild_id: int | None
    channel_id: int
    kind: str
    status: str
    params: protocol.GenerationParams
    source_image: str | None
    parent_job_id: str | None
    resolved: protocol.ResolvedParams | None
    nsfw_channel: bool
    attempt: int
    last_seq: int
    error: str | None
    interaction_id: int | None
    interaction_token: str | None
    application_id: int | None
    attachment_limit: int | None
    message_id: int | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    delivered_at: float | None
    elapsed_s: float | None
    strength: float | None = None  # img2img: None = the engine's strength for the mode
    locale: str | None = None  # the requester's catalog (bot.i18n), None: English
    source_url: str | None = None  # a user's picture not fetched yet: its attachment's address

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        data = dict(row)
        data["params"] = protocol.GenerationParams.model_validate_json(data.pop("params_json"))
        resolved = data.pop("resolved_json")
        data["resolved"] = protocol.ResolvedParams.model_validate_json(resolved) if resolved else None
        data["nsfw_channel"] = bool(data["nsfw_channel"])
        return cls(**data)


@dataclass(frozen=True)
class Image:
    """One row of ``images``."""

    job_id: str
    idx: int
    path: str
    seed: int
    width: int
    height: int
    sha256: str
    rating: str | None
    gallery_channel_id: int | None
    gallery_message_id: int | None
    stars: int


@dataclass(frozen=True)
class UserSettings:
    """Per-user defaults for /imagine; None means the configured default."""

    fast: bool | None = None
    aspect: str | None = None
    negative: str | None = None
    style: str | None = None


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements (sqlite3.complete_statement knows about quotes)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    if current.strip() and not all(l.strip().startswith("--") or not l.strip() for l in current.splitlines()):
        raise ValueError("migration ends with an incomplete statement")
    return statements


class Database:
    """Async access to the bot's SQLite file. Build with ``await Database.open(path)``."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        # One connection is shared by every coroutine: two transactions must not interleave
        # ("cannot start a transaction within a transaction"), so BEGIN..COMMIT is serialized.
        self._tx_lock = asyncio.Lock()
        # The task inside BEGIN..COMMIT: its writes belong to the transaction; any other task's
        # write waits for the COMMIT, so a ROLLBACK never takes another coroutine's write with it.
        self._tx_owner: asyncio.Task[Any] | None = None

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        """BEGIN IMMEDIATE .. COMMIT, or ROLLBACK on any exception; one transaction at a time."""
        async with self._tx_lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            self._tx_owner = asyncio.current_task()
            try:
                try:
                    yield
                except BaseException:
                    await self._conn.execute("ROLLBACK")
                    raise
                await self._conn.execute("COMMIT")
            finally:
                self._tx_owner = None

    @classmethod
    async def open(cls, path: Path) -> "Database":
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN ourselves, so a migration is one transaction.
        conn = await aiosqlite.connect(path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA foreign_keys=ON")
        await conn.execute("PRAGMA busy_timeout=5000")
        db = cls(conn)
        try:
            await db.migrate()
        except BaseException:
            await conn.close()  # else aiosqlite's thread keeps the process alive after the error
            raise
        return db

    async def close(self) -> None:
        await self._conn.close()

    async def migrate(self) -> list[int]:
        """Apply the migrations not yet applied, all in one transaction; return their numbers."""
        await self._conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " applied_at REAL NOT NULL)")
        async with self._conn.execute("SELECT version FROM schema_migrations") as cur:
            done = {row[0] for row in await cur.fetchall()}
        pending = []
        for file in sorted(MIGRATIONS_DIR.glob("*.sql")):
            version = int(file.name.split("_", 1)[0])
            if version not in done:
                pending.append((version, file))
        if not pending:
            return []
        async with self._transaction():
            for version, file in pending:
                for statement in _split_sql(file.read_text(encoding="utf-8")):
                    await self._conn.execute(statement)
                await self._conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)",
                                         (version, file.name, time.time()))
        return [v for v, _ in pending]

    async def _one(self, sql: str, args: Iterable[Any] = ()) -> sqlite3.Row | None:
        async with self._conn.execute(sql, tuple(args)) as cur:
            return await cur.fetchone()

    async def _all(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        async with self._conn.execute(sql, tuple(args)) as cur:
            return list(await cur.fetchall())

    async def _write(self, sql: str, args: Iterable[Any] = ()) -> int:
        if self._tx_owner is not None and self._tx_owner is asyncio.current_task():
            cur = await self._conn.execute(sql, tuple(args))
            return cur.rowcount
        async with self._tx_lock:  # not inside another task's open transaction
            cur = await self._conn.execute(sql, tuple(args))
            return cur.rowcount

    # ------------------------------------------------------------------ jobs

    async def insert_job(self, *, job_id: str, user_id: int, guild_id: int | None, channel_id: int, kind: str,
                         params: protocol.GenerationParams, nsfw_channel: bool, source_image: str | None = None,
                         parent_job_id: str | None = None, interaction_id: int | None = None,
                         interaction_token: str | None = None, application_id: int | None = None,
                         attachment_limit: int | None = None, message_id: int | None = None,
                         admit: Callable[[], Awaitable[None]] | None = None, strength: float | None = None,
                         locale: str | None = None, source_url: str | None = None) -> None:
        """Insert a pending job; ``admit`` (the limits check) runs in the same transaction.

        Checking and inserting in one BEGIN IMMEDIATE..COMMIT means simultaneous requests see
        each other's jobs: N at once against a limit L admit exactly min(N, L). When ``admit``
        raises, nothing is written.
        """
        async with self._transaction():
            if admit is not None:
                await admit()
            await self._insert_job_row(job_id, user_id, guild_id, channel_id, kind, params, nsfw_channel, source_image,
                                       parent_job_id, interaction_id, interaction_token, application_id,
                                       attachment_limit, message_id, strength)
            if locale is not None:
                await self._write("UPDATE jobs SET locale = ? WHERE job_id = ?", (locale, job_id))
            if source_url is not None:
                await self._write("UPDATE jobs SET source_url = ? WHERE job_id = ?", (source_url, job_id))

    async def forget_job(self, job_id: str) -> None:
        """Remove a job that never reached the engine (its picture was refused): as if never asked."""
        await self._write("DELETE FROM jobs WHERE job_id = ? AND status = 'pending'"
                          " AND NOT EXISTS (SELECT 1 FROM images WHERE images.job_id = jobs.job_id)", (job_id,))

    async def _insert_job_row(self, job_id: str, user_id: int, guild_id: int | None, channel_id: int, kind: str,
                              params: protocol.GenerationParams, nsfw_channel: bool, source_image: str | None,
                              parent_job_id: str | None, interaction_id: int | None, interaction_token: str | None,
                              application_id: int | None, attachment_limit: int | None,
                              message_id: int | None, strength: float | None = None) -> None:
        await self._write(
            "INSERT INTO jobs (job_id, user_id, guild_id, channel_id, kind, status, params_json, source_image,"
            " parent_job_id, nsfw_channel, interaction_id, interaction_token, application_id, attachment_limit,"
            " message_id, created_at, strength) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, user_id, guild_id, channel_id, kind, params.model_dump_json(), source_image, parent_job_id,
             int(nsfw_channel), interaction_id, interaction_token, application_id, attachment_limit, message_id,
             time.time(), strength))

    async def set_message_id(self, job_id: str, message_id: int) -> None:
        """The message the acknowledgement created (known only after the job row exists)."""
        await self._write("UPDATE jobs SET message_id = ? WHERE job_id = ?", (message_id, job_id))

    async def get_job(self, job_id: str) -> Job | None:
        row = await self._one("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        return Job.from_row(row) if row else None

    async def jobs_with_status(self, *statuses: str) -> list[Job]:
        marks = ",".join("?" * len(statuses))
        rows = await self._all(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY created_at", statuses)
        return [Job.from_row(r) for r in rows]

    async def user_jobs(self, user_id: int, statuses: tuple[str, ...] = ACTIVE, *,
                        guild_id: int | None = None) -> list[Job]:
        """A user's jobs (in one server when ``guild_id`` is given), oldest first."""
        marks = ",".join("?" * len(statuses))
        where = "" if guild_id is None else " AND guild_id = ?"
        rows = await self._all(f"SELECT * FROM jobs WHERE user_id = ? AND status IN ({marks}){where}"
                               " ORDER BY created_at", (user_id, *statuses, *(() if guild_id is None else (guild_id,))))
        return [Job.from_row(r) for r in rows]

    async def finished_job_ids(self, user_id: int, guild_id: int | None, *, limit: int) -> list[str]:
        """A user's completed jobs started in one server, newest first (/history)."""
        rows = await self._all("SELECT job_id FROM jobs WHERE user_id = ? AND guild_id IS ? AND status = 'completed'"
                               " ORDER BY created_at DESC, rowid DESC LIMIT ?", (user_id, guild_id, limit))
        return [r["job_id"] for r in rows]

    async def count_active_in(self, guild_id: int | None) -> int:
        """Jobs waiting or running that were started in one server."""
        row = await self._one("SELECT COUNT(*) FROM jobs WHERE status IN ('pending', 'running') AND guild_id IS ?",
                              (guild_id,))
        return int(row[0]) if row else 0

    async def count_active(self, user_id: int | None = None) -> int:
        if user_id is None:
            row = await self._one("SELECT COUNT(*) FROM jobs WHERE status IN ('pending', 'running')")
        else:
            row = await self._one("SELECT COUNT(*) FROM jobs WHERE status IN ('pending', 'running') AND user_id = ?",
                                  (user_id,))
        return int(row[0]) if row else 0

    async def last_job_time(self, user_id: int) -> float | None:
        row = await self._one("SELECT MAX(created_at) FROM jobs WHERE user_id = ?", (user_id,))
        return row[0] if row else None

    async def mark_running(self, job_id: str, attempt: int, seq: int) -> None:
        await self._write("UPDATE jobs SET status = 'running', started_at = COALESCE(started_at, ?), last_seq = ?"
                          " WHERE job_id = ? AND attempt = ? AND status IN ('pending', 'running')",
                          (time.time(), seq, job_id, attempt))

    async def set_attempt(self, job_id: str, attempt: int) -> None:
        """A new attempt starts from scratch: pending, sequence reset."""
        await self._write("UPDATE jobs SET attempt = ?, status = 'pending', last_seq = -1 WHERE job_id = ?",
                          (attempt, job_id))

    async def adopt_attempt(self, job_id: str, attempt: int) -> None:
        """A newer attempt started elsewhere (a transport retry): follow it without resetting the status."""
        await self._write("UPDATE jobs SET attempt = ?, last_seq = -1 WHERE job_id = ? AND attempt < ?",
                          (attempt, job_id, attempt))

    async def finish(self, job_id: str, status: str, *, error: str | None = None) -> bool:
        """Mark a job failed or canceled; False when it had already finished."""
        n = await self._write("UPDATE jobs SET status = ?, error = ?, finished_at = ? WHERE job_id = ?"
                              " AND status IN ('pending', 'running')", (status, error, time.time(), job_id))
        return n > 0

    async def record_completion(self, job_id: str, completed: protocol.Completed) -> bool:
        """Store a result (status + images) in one transaction; False when it was already stored."""
        async with self._transaction():
            row = await self._one("SELECT status, created_at FROM jobs WHERE job_id = ?", (job_id,))
            if row is None or row["status"] == "completed":
                return False  # nothing written: the COMMIT ends an empty transaction
            now = time.time()
            resolved = completed.params.model_dump_json() if completed.params else None
            await self._write("UPDATE jobs SET status = 'completed', resolved_json = ?, finished_at = ?,"
                              " elapsed_s = ?, error = NULL, last_seq = ? WHERE job_id = ?",
                              (resolved, now, now - row["created_at"], completed.seq, job_id))
            for idx, img in enumerate(completed.images):
                await self._write("INSERT OR REPLACE INTO images (job_id, idx, path, seed, width, height, sha256, rating)"
                                  " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                  (job_id, idx, img.path, img.seed, img.width, img.height, img.sha256, img.rating))
        return True

    async def undelivered(self) -> list[Job]:
        """Finished jobs whose result or failure was not yet shown to the user."""
        # Without statistics SQLite prefers jobs_status, which walks every finished job (129 ms at
        # 1M jobs); the partial index (migration 0013) holds only the undelivered few.
        rows = await self._all("SELECT * FROM jobs INDEXED BY jobs_undelivered"
                               " WHERE status IN ('completed', 'failed') AND delivered_at IS NULL ORDER BY finished_at")
        return [Job.from_row(r) for r in rows]

    async def mark_delivered(self, job_id: str, message_id: int | None) -> None:
        await self._write("UPDATE jobs SET delivered_at = ?, message_id = COALESCE(?, message_id) WHERE job_id = ?",
                          (time.time(), message_id, job_id))

    # ------------------------------------------------------------------ images and gallery

    async def images(self, job_id: str) -> list[Image]:
        rows = await self._all("SELECT * FROM images WHERE job_id = ? ORDER BY idx", (job_id,))
        return [Image(**dict(r)) for r in rows]

    async def jobs_by_seed(self, seed: int, limit: int = 5, *, user_id: int | None = None,
                           guild_id: int | None = None) -> list[Job]:
        """Jobs with an image of this seed, newest first: of one user, or of one server (``guild_id``)."""
        owner = "jobs.user_id = ?" if user_id is not None else "jobs.guild_id IS ?"
        rows = await self._all("SELECT DISTINCT jobs.* FROM jobs JOIN images USING (job_id) WHERE images.seed = ?"
                               f" AND {owner} ORDER BY jobs.created_at DESC LIMIT ?",
                               (seed, user_id if user_id is not None else guild_id, limit))
        return [Job.from_row(r) for r in rows]

    async def set_gallery_message(self, job_id: str, channel_id: int | None, message_id: int | None) -> None:
        await self._write("UPDATE images SET gallery_channel_id = ?, gallery_message_id = ? WHERE job_id = ?",
                          (channel_id, message_id, job_id))

    async def job_for_gallery_message(self, message_id: int) -> str | None:
        row = await self._one("SELECT job_id FROM images WHERE gallery_message_id = ? LIMIT 1", (message_id,))
        return row[0] if row else None

    async def add_star(self, message_id: int, user_id: int) -> int | None:
        """Count one star per user on a gallery post; return the post's stars (None: not a post).

        The author's own star is not counted: a post rises by other people's stars only.
        """
        row = await self._one("SELECT jobs.user_id FROM images JOIN jobs USING (job_id)"
                              " WHERE images.gallery_message_id = ? LIMIT 1", (message_id,))
        if row is None:
            return None
        if row[0] != user_id:
            await self._write("INSERT OR IGNORE INTO stars VALUES (?, ?)", (message_id, user_id))
        return await self._recount_stars(message_id)

    async def remove_star(self, message_id: int, user_id: int | None = None) -> int | None:
        """Take back one user's star (every star when ``user_id`` is None); return the post's stars."""
        if await self.job_for_gallery_message(message_id) is None:
            return None
        if user_id is None:
            await self._write("DELETE FROM stars WHERE gallery_message_id = ?", (message_id,))
        else:
            await self._write("DELETE FROM stars WHERE gallery_message_id = ? AND user_id = ?", (message_id, user_id))
        return await self._recount_stars(message_id)

    async def _recount_stars(self, message_id: int) -> int:
        row = await self._one("SELECT COUNT(*) FROM stars WHERE gallery_message_id = ?", (message_id,))
        stars = int(row[0]) if row else 0
        await self._write("UPDATE images SET stars = ? WHERE gallery_message_id = ?", (stars, message_id))
        return stars

    async def top_gallery(self, limit: int, guild_id: int | None) -> list[sqlite3.Row]:
        """The most starred gallery posts of images made in one server."""
        return await self._all(
            "SELECT images.job_id, images.gallery_channel_id, images.gallery_message_id, MAX(images.stars) AS stars,"
            " jobs.user_id, jobs.params_json, jobs.guild_id FROM images JOIN jobs USING (job_id)"
            " WHERE images.gallery_message_id IS NOT NULL AND jobs.guild_id IS ? GROUP BY images.gallery_message_id"
            " ORDER BY stars DESC, jobs.created_at DESC LIMIT ?", (guild_id, limit))

    # ------------------------------------------------------------------ settings, adapters, audit

    async def settings(self, user_id: int) -> UserSettings:
        row = await self._one("SELECT fast, aspect, negative, style FROM users WHERE user_id = ?", (user_id,))
        if row is None:
            return UserSettings()
        fast = None if row["fast"] is None else bool(row["fast"])
        return UserSettings(fast=fast, aspect=row["aspect"], negative=row["negative"], style=row["style"])

    async def save_settings(self, user_id: int, settings: UserSettings) -> None:
        fast = None if settings.fast is None else int(settings.fast)
        await self._write(
            "INSERT INTO users (user_id, fast, aspect, negative, style, updated_at) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (user_id) DO UPDATE SET fast = excluded.fast, aspect = excluded.aspect,"
            " negative = excluded.negative, style = excluded.style, updated_at = excluded.updated_at",
            (user_id, fast, settings.aspect, settings.negative, settings.style, time.time()))

    async def save_adapters(self, adapters: list[protocol.AdapterInfo]) -> None:
        now = time.time()
        async with self._transaction():
            await self._write("DELETE FROM adapters")
            for a in adapters:
                await self._write("INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?)",
                                  (a.name, a.kind, json.dumps(a.triggers), a.default_weight, a.description,
                                   a.sha256, now))

    async def load_adapters(self) -> list[protocol.AdapterInfo]:
        rows = await self._all("SELECT * FROM adapters ORDER BY kind, name")
        return [protocol.AdapterInfo(name=r["name"], kind=r["kind"], triggers=json.loads(r["triggers_json"]),
                                     default_weight=r["default_weight"], description=r["description"],
                                     sha256=r["sha256"]) for r in rows]

    async def audit(self, *, user_id: int, guild_id: int | None, action: str, target: str = "",
                    detail: dict[str, Any] | None = None) -> None:
        """Record an admin action (who, what, on what)."""
        await self._write("INSERT INTO audit_log (at, user_id, guild_id, action, target, detail_json)"
                          " VALUES (?, ?, ?, ?, ?, ?)",
                          (time.time(), user_id, guild_id, action, target, json.dumps(detail or {})))

    async def audit_entries(self, guild_id: int | None, limit: int = 50) -> list[sqlite3.Row]:
        """The newest admin actions taken in one server."""
        return await self._all("SELECT * FROM audit_log WHERE guild_id IS ? ORDER BY id DESC LIMIT ?",
                               (guild_id, limit))
