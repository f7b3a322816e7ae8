"""The bot's record of training runs (table ``training_runs``, migrations 0001, 0006, 0011 and 0014).

A run row is written before anything reaches the engine, so a run is never lost between the
Discord command and the engine. Engine events are applied idempotently: a progress event
counts only when its (attempt, seq) is newer than the last one applied, and a terminal status
is written only over an active one (pending or running), so a repeated ``Completed`` or a late
``Progress`` changes nothing. Admin actions go to ``audit_log`` through ``Database.audit``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from bot.db import Database

ACTIVE = ("pending", "running")
TERMINAL = ("completed", "failed", "canceled")


@dataclass(frozen=True)
class RunRow:
    """One row of ``training_runs``."""

    run_id: str
    adapter_name: str
    kind: str
    status: str
    options: dict[str, Any]
    created_by: int
    attempt: int
    progress_step: int
    progress_total: int
    result: dict[str, Any]
    error: str | None
    channel_id: int | None
    guild_id: int | None
    trigger: str
    dataset: str
    run_dir: str
    loss: float | None
    last_seq: int
    recommended_step: int | None
    chosen_step: int | None
    promoted_as: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    # The run's live status message (bot.training_live) and when its final edit was made.
    status_channel_id: int | None = None
    status_message_id: int | None = None
    status_final_at: float | None = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "RunRow":
        data = dict(row)
        return cls(
            run_id=data["run_id"], adapter_name=data["adapter_name"], kind=data["kind"], status=data["status"],
            options=json.loads(data["options_json"] or "{}"), created_by=data["created_by"],
            attempt=data["attempt"], progress_step=data["progress_step"], progress_total=data["progress_total"],
            result=json.loads(data["result_json"] or "{}"), error=data["error"], channel_id=data["channel_id"],
            guild_id=data["guild_id"], trigger=data["trigger_word"], dataset=data["dataset"],
            run_dir=data["run_dir"], loss=data["loss"], last_seq=data["last_seq"],
            recommended_step=data["recommended_step"], chosen_step=data["chosen_step"],
            promoted_as=data["promoted_as"], created_at=data["created_at"], started_at=data["started_at"],
            finished_at=data["finished_at"], status_channel_id=data.get("status_channel_id"),
            status_message_id=data.get("status_message_id"), status_final_at=data.get("status_final_at"),
        )


class TrainingStore:
    """Queries on ``training_runs`` through the bot's one SQLite connection (``bot.db``)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # ------------------------------------------------------------------ writes

    async def insert(self, *, run_id: str, adapter_name: str, kind: str, trigger: str, dataset: str,
                     run_dir: str, options: dict[str, Any], created_by: int, channel_id: int | None,
                     guild_id: int | None) -> None:
        await self.db._write(
            "INSERT INTO training_runs (run_id, adapter_name, kind, status, options_json, created_by, channel_id,"
            " guild_id, trigger_word, dataset, run_dir, progress_total, created_at)"
            " VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (run_id, adapter_name, kind, json.dumps(options, default=str), created_by, channel_id, guild_id,
             trigger, dataset, run_dir, int(options.get("steps") or 0), time.time()))

    async def mark_started(self, run_id: str, attempt: int, seq: int) -> None:
        await self.db._write(
            "UPDATE training_runs SET status = 'running', started_at = COALESCE(started_at, ?),"
            " last_seq = MAX(last_seq, ?) WHERE run_id = ? AND attempt = ? AND status IN ('pending', 'running')",
            (time.time(), seq, run_id, attempt))

    async def count_start(self, run_id: str, attempt: int, seq: int) -> int:
        """Count an engine starting the run (a duplicate Started is not counted); return the count."""
        await self.db._write("UPDATE training_runs SET starts = starts + 1 WHERE run_id = ? AND attempt = ?"
                             " AND last_seq < ? AND status IN ('pending', 'running')", (run_id, attempt, seq))
        row = await self.db._one("SELECT starts FROM training_runs WHERE run_id = ?", (run_id,))
        return int(row[0]) if row else 0

    async def record_progress(self, run_id: str, attempt: int, seq: int, step: int, total: int,
                              loss: float | None) -> bool:
        """Apply a progress event unless it is older than the last one applied; True if applied."""
        n = await self.db._write(
            "UPDATE training_runs SET status = 'running', started_at = COALESCE(started_at, ?), last_seq = ?,"
            " progress_step = ?, progress_total = ?, loss = COALESCE(?, loss)"
            " WHERE run_id = ? AND attempt = ? AND last_seq < ? AND status IN ('pending', 'running')",
            (time.time(), seq, step, total, loss, run_id, attempt, seq))
        return n > 0

    async def finish(self, run_id: str, status: str, *, error: str | None = None,
                     result: dict[str, Any] | None = None) -> bool:
        """Mark an active run completed, failed or canceled; False when it had already finished."""
        assert status in TERMINAL, status
        n = await self.db._write(
            "UPDATE training_runs SET status = ?, error = ?, result_json = COALESCE(?, result_json),"
            " finished_at = ? WHERE run_id = ? AND status IN ('pending', 'running')",
            (status, error, json.dumps(result, default=str) if result is not None else None, time.time(), run_id))
        return n > 0

    async def set_final_progress(self, run_id: str, step: int, total: int, loss: float | None) -> None:
        await self.db._write(
            "UPDATE training_runs SET progress_step = ?, progress_total = ?, loss = COALESCE(?, loss)"
            " WHERE run_id = ?", (step, total, loss, run_id))

    async def set_attempt(self, run_id: str, attempt: int) -> None:
        """A resubmitted run (the engine restarted): new attempt, sequence reset."""
        await self.db._write("UPDATE training_runs SET attempt = ?, last_seq = -1 WHERE run_id = ?",
                             (attempt, run_id))

    async def set_recommended(self, run_id: str, step: int | None) -> None:
        await self.db._write("UPDATE training_runs SET recommended_step = ? WHERE run_id = ?", (step, run_id))

    async def set_chosen(self, run_id: str, step: int) -> None:
        await self.db._write("UPDATE training_runs SET chosen_step = ? WHERE run_id = ?", (step, run_id))

    async def set_promoted(self, run_id: str, adapter: str) -> None:
        await self.db._write("UPDATE training_runs SET promoted_as = ? WHERE run_id = ?", (adapter, run_id))

    async def set_status_message(self, run_id: str, channel_id: int, message_id: int) -> None:
        await self.db._write("UPDATE training_runs SET status_channel_id = ?, status_message_id = ?,"
                             " status_final_at = NULL WHERE run_id = ?", (channel_id, message_id, run_id))

    async def set_status_final(self, run_id: str) -> None:
        await self.db._write("UPDATE training_runs SET status_final_at = ? WHERE run_id = ?", (time.time(), run_id))

    # ------------------------------------------------------------------ reads

    async def followed(self) -> list[RunRow]:
        """Runs whose live status message has not had its final edit yet (active, or ended meanwhile)."""
        rows = await self.db._all("SELECT * FROM training_runs WHERE status_message_id IS NOT NULL"
                                  " AND status_final_at IS NULL ORDER BY created_at")
        return [RunRow.from_row(r) for r in rows]

    async def get(self, run_id: str) -> RunRow | None:
        row = await self.db._one("SELECT * FROM training_runs WHERE run_id = ?", (run_id,))
        return RunRow.from_row(row) if row else None

    async def active(self) -> list[RunRow]:
        rows = await self.db._all("SELECT * FROM training_runs WHERE status IN ('pending', 'running')"
                                  " ORDER BY created_at")
        return [RunRow.from_row(r) for r in rows]

    async def latest(self, statuses: tuple[str, ...] | None = None, *, guild_id: int | None) -> RunRow | None:
        """The newest run started in server ``guild_id`` (with one of ``statuses`` when given)."""
        statuses = statuses or TERMINAL + ("pending", "running")
        marks = ",".join("?" * len(statuses))
        row = await self.db._one(f"SELECT * FROM training_runs WHERE status IN ({marks}) AND guild_id IS ?"
                                 " ORDER BY created_at DESC, rowid DESC LIMIT 1", (*statuses, guild_id))
        return RunRow.from_row(row) if row else None

    async def recent(self, limit: int = 25, *, guild_id: int | None) -> list[RunRow]:
        """The newest runs started in server ``guild_id``."""
        rows = await self.db._all("SELECT * FROM training_runs WHERE guild_id IS ?"
                                  " ORDER BY created_at DESC, rowid DESC LIMIT ?", (guild_id, limit))
        return [RunRow.from_row(r) for r in rows]

    async def audit(self, *, user_id: int, guild_id: int | None, action: str, target: str = "",
                    detail: dict[str, Any] | None = None) -> None:
        """Record an admin action in ``audit_log``."""
        await self.db.audit(user_id=user_id, guild_id=guild_id, action=action, target=target, detail=detail)
