"""The dispatcher's worker tracking: who is alive, whose leases expired, what to reclaim.

A mixin of ``engine.scaleout.dispatcher.Dispatcher`` (it uses the dispatcher's client, keys, queue and
in-flight table), kept apart so each file reads in one sitting. Leases: a worker refreshes the
idle time of each job entry it holds every lease_ttl_s / 3 (``XCLAIM ... JUSTID``); an entry idle
longer than lease_ttl_s, or any entry of a worker whose heartbeat key is gone, is taken with
XAUTOCLAIM, acknowledged, deleted, and its job dispatched again with attempt + 1.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis.exceptions

from engine.contract import protocol
from engine.scaleout.redis_keys import JOBS_GROUP, WorkerInfo
from engine.scheduler import ScheduledJob

log = logging.getLogger("engine.scaleout.dispatcher")


@dataclass
class DispatchedJob:
    """A job that is on a worker (mirrored in ``P:job:J`` and ``P:inflight``)."""

    request: Any
    worker: str
    attempt: int
    last_seq: int = 0
    canceled: bool = False
    reasons: str = ""
    # The attempt number the bot knows this job by: a restarted bot resubmits a running job
    # as attempt + 1 while the worker goes on with the old one; events go out under this one.
    shown_attempt: int = 0
    entry_id: str = ""  # its entry in the worker's job stream
    missing_since: float | None = None  # when its entry was first seen gone



def short_error(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


@dataclass
class PendingJob:
    """A job waiting in the dispatcher's queue."""

    request: Any
    since: float
    avoid: str | None = None
    reasons: str = ""


class LeaseKeeper:
    """Worker discovery, lease expiry and reclaim (mixed into ``Dispatcher``)."""

    client: Any
    keys: Any
    consumer: str
    lease_ms: int
    _queue: Any
    _inflight: dict[str, DispatchedJob]
    _workers: dict[str, WorkerInfo]
    _adapters: dict[str, list[protocol.AdapterInfo]]
    _known_workers: list[str]

    async def _refresh_workers(self) -> None:
        names = sorted(await self.client.smembers(self.keys.workers))
        if not names:
            self._workers, self._adapters, self._known_workers = {}, {}, []
            return
        values = await self.client.mget([self.keys.worker(n) for n in names] +
                                        [self.keys.worker_adapters(n) for n in names])
        workers: dict[str, WorkerInfo] = {}
        adapters: dict[str, list[protocol.AdapterInfo]] = {}
        for i, name in enumerate(names):
            info, adapter_json = values[i], values[len(names) + i]
            if not info:
                continue
            try:
                parsed = WorkerInfo.model_validate_json(info)
                if parsed.protocol_version != protocol.PROTOCOL_VERSION:
                    log.warning("ignoring worker %s: protocol version %s, this bot speaks %s (update Arcae there)",
                                name, parsed.protocol_version, protocol.PROTOCOL_VERSION)
                    continue
                workers[name] = parsed
                adapters[name] = [protocol.AdapterInfo.model_validate(a) for a in json.loads(adapter_json or "[]")]
            except ValueError as exc:
                log.warning("ignoring worker %s with an unreadable record: %s", name, exc)
        self._workers, self._adapters = workers, adapters
        self._known_workers = names

    async def _reap(self) -> None:
        """Reclaim job entries whose lease expired (or whose worker is gone) and retry them."""
        for name in self._known_workers:
            alive = name in self._workers
            stream = self.keys.jobs(name)
            # A live worker refreshes its entries every ttl/3; a gone one refreshes nothing.
            min_idle = self.lease_ms if alive else 0
            start = "0-0"
            while True:
                try:
                    reply = await self.client.xautoclaim(stream, JOBS_GROUP, self.consumer, min_idle,
                                                         start_id=start, count=100)
                except redis.exceptions.ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    if not alive:  # registered but never created its stream: forget it
                        await self.client.srem(self.keys.workers, name)
                    break
                next_start, claimed = reply[0], reply[1]
                for entry_id, fields in claimed:
                    await self._reclaim(name, entry_id, fields or {}, started=True)
                if not next_start or next_start == "0-0":
                    break
                start = next_start
            if not alive:
                await self._take_undelivered(name)
        await self._find_vanished()

    async def _find_vanished(self) -> None:
        """Retry jobs whose entry vanished without a result (Redis restarted without its data).

        An entry also disappears when its worker finishes (the terminal event and the XDEL go
        together), so only an entry still gone a full lease later, with no result applied
        meanwhile, counts as lost.
        """
        now = time.monotonic()
        for d in list(self._inflight.values()):
            if not d.entry_id:
                continue
            if await self.client.xrange(self.keys.jobs(d.worker), d.entry_id, d.entry_id):
                d.missing_since = None
            elif d.missing_since is None:
                d.missing_since = now
            elif now - d.missing_since > self.lease_ms / 1000 and self._inflight.get(d.request.job_id) is d:
                log.warning("job %s: its entry on %s vanished from Redis", d.request.job_id, d.worker)
                await self._retry(d, "its job entry vanished from Redis (restarted without appendonly?)", lost=True)

    async def _take_undelivered(self, name: str) -> None:
        """Entries a gone worker never read: take them back (same attempt), forget the worker."""
        stream = self.keys.jobs(name)
        if not await self.client.exists(stream):
            await self.client.srem(self.keys.workers, name)
            return
        reply = await self.client.xreadgroup(JOBS_GROUP, self.consumer, {stream: ">"}, count=100)
        for _s, entries in reply or []:
            for entry_id, fields in entries:
                await self._reclaim(name, entry_id, fields or {}, started=False)
        if not await self.client.xlen(stream) and not (await self.client.xpending(stream, JOBS_GROUP))["pending"]:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(stream, self.keys.control(name))
                pipe.srem(self.keys.workers, name)
                await pipe.execute()

    async def _reclaim(self, worker: str, entry_id: str, fields: dict[str, str], *, started: bool) -> None:
        stream = self.keys.jobs(worker)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xack(stream, JOBS_GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()
        try:
            request = protocol.decode_request(fields.get("request", ""))
        except protocol.ProtocolError:
            return
        d = self._inflight.get(request.job_id)
        if d is None or d.attempt != request.attempt or d.worker != worker:
            return  # finished meanwhile, or an entry of an older attempt
        if not started:
            await self._finish(d)
            self._queue.push(ScheduledJob(job_id=request.job_id, owner=request.owner,
                                          priority=getattr(request, "priority", "batch"),
                                          payload=PendingJob(request, time.monotonic(), worker, d.reasons)))
            return
        log.warning("worker %s lost the lease of job %s attempt %d", worker, request.job_id, d.attempt)
        await self._retry(d, f"worker {worker} stopped responding (lease expired)", lost=True)

    async def _load_inflight(self) -> None:
        """Rebuild the jobs-on-workers table after a restart of the bot."""
        for job_id in await self.client.smembers(self.keys.inflight):
            h = await self.client.hgetall(self.keys.job(job_id))
            try:
                request = protocol.decode_request(h["request"])
                self._inflight[job_id] = DispatchedJob(
                    request=request, worker=h["worker"], attempt=int(h["attempt"]),
                    last_seq=int(h.get("last_seq", 0)), canceled=h.get("canceled") == "1",
                    reasons=h.get("reasons", ""), shown_attempt=int(h.get("shown_attempt", 0)),
                    entry_id=h.get("entry_id", ""))
            except (KeyError, ValueError, protocol.ProtocolError) as exc:
                log.warning("dropping unreadable in-flight record of job %s: %s", job_id, exc)
                await self.client.srem(self.keys.inflight, job_id)
