"""What the dispatcher answers about the workers: adapters, status, the /status worker list, reloads, dead letters.

``DispatcherQueries`` is mixed into ``engine.scaleout.dispatcher.Dispatcher``, which holds the
state it reads (the Redis client, the live workers and their adapters, the queue, the jobs in flight).
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.exceptions

from engine.contract import protocol
from engine.contract.transport import EngineUnavailable
from engine.scaleout.dispatch_leases import short_error
from engine.scaleout.dispatch_policy import format_workers
from engine.scaleout.redis_keys import CONTROL_MAXLEN, WorkerInfo


class WorkerStatus(WorkerInfo):
    """A worker as /status shows it: what it advertises plus the jobs dispatched to it."""

    alive: bool = True
    assigned: list[str] = []


class DispatcherQueries:
    """The read side of the dispatcher (and the adapter reload it fans out to the workers)."""

    async def _refresh_or_unavailable(self) -> None:
        if self.client is None or not self.connected:
            raise EngineUnavailable(f"Redis at {self.where} is not reachable yet")
        try:
            await self._refresh_workers()
        except (redis.exceptions.RedisError, OSError) as exc:
            raise EngineUnavailable(f"cannot reach Redis at {self.where}: {short_error(exc)}") from None

    async def list_adapters(self) -> list[protocol.AdapterInfo]:
        """Every adapter some live worker can load (first worker's description wins)."""
        await self._refresh_or_unavailable()
        seen: dict[str, protocol.AdapterInfo] = {}
        for name in sorted(self._adapters):
            for info in self._adapters[name]:
                seen.setdefault(info.name, info)
        return [seen[n] for n in sorted(seen)]

    async def status(self) -> protocol.EngineStatus:
        """One summary over all workers (``workers()`` has the detail)."""
        workers = list(self._workers.values())
        loaded = sorted({a for w in workers for a in w.loaded_adapters})
        devices = ", ".join(f"{w.name}: {w.gpu or w.device or '?'}" for w in workers) or "no workers online"
        return protocol.EngineStatus(
            model=next((w.model for w in workers if w.model), ""),
            device=devices,
            queue_length=len(self._queue),
            running_job=next(iter(self._inflight), None),
            loaded_adapters=loaded,
            worker=f"{len(workers)} worker(s) via Redis",
            # One worker without a rater is enough for unrated outputs.
            rates_outputs=(False if any(w.rates_outputs is False for w in workers)
                           else True if workers and all(w.rates_outputs for w in workers) else None),
        )

    async def workers(self) -> list[WorkerStatus]:
        """Live workers (and dead ones still holding jobs) for the admin /status command."""
        await self._refresh_or_unavailable()
        rows: dict[str, WorkerStatus] = {}
        for name, info in self._workers.items():
            rows[name] = WorkerStatus(**info.model_dump(), alive=True)
        for job_id, d in self._inflight.items():
            row = rows.setdefault(d.worker, WorkerStatus(name=d.worker, alive=False))
            row.assigned.append(job_id)
        return [rows[n] for n in sorted(rows)]

    async def workers_text(self, limit: int = 1024) -> str:
        """One line per worker for the admin /status embed: GPU, jobs, loaded adapters."""
        return format_workers(await self.workers(), len(self._queue), limit)

    async def reload_adapters(self) -> dict[str, Any]:
        """Ask every live worker to rescan its adapters between jobs (asynchronously).

        Returns {"added", "removed", "changed"} computed from the adapters advertised before
        and after, as far as the workers answered within a few seconds, plus "workers".
        """
        before = {a.name: a.sha256 for a in await self.list_adapters()}
        request = protocol.encode(protocol.ReloadAdaptersRequest())
        names = list(self._workers)
        for name in names:
            await self.client.xadd(self.keys.control(name), {"request": request}, maxlen=CONTROL_MAXLEN)
        await asyncio.sleep(min(3.0, self.lease_ms / 3000))
        after = {a.name: a.sha256 for a in await self.list_adapters()}
        return {
            "added": sorted(set(after) - set(before)),
            "removed": sorted(set(before) - set(after)),
            "changed": sorted(n for n in set(before) & set(after) if before[n] != after[n]),
            "workers": names,
        }

    async def dead_letters(self, count: int = 50) -> list[dict[str, str]]:
        """The newest dead-lettered jobs: job_id, attempts, reason."""
        entries = await self.client.xrevrange(self.keys.deadletter, count=count)
        return [dict(fields) for _id, fields in entries]
