"""Scale-out: the bot's one dispatcher in front of engine workers that meet in Redis Streams.

Implements ``engine.contract.transport.EngineTransport``, as ``bot.engine_link.EngineLink`` does,
plus ``workers()`` for /status.

Policy lives here and only here: jobs wait in a ``FairScheduler`` (round-robin between users,
interactive before batch, bounded) and go to a worker only when it has a free slot (1-2 jobs
each), preferring one that already holds the job's adapters (``engine.scaleout.dispatch_policy``). The
bot's SQLite stays the source of truth: jobs still queued here are resubmitted by the bot from
its database after a restart (``on_connect``); jobs already on a worker are found again in
Redis (``P:inflight``). Delivery is at-least-once; events are applied idempotently by
(job_id, attempt, seq) and events from an older attempt are dropped. A worker that stops
renewing its lease loses its jobs: they are reclaimed with XAUTOCLAIM and dispatched again
with attempt + 1; after ``engine.max_attempts`` attempts a job goes to the dead-letter stream
and the bot gets a ``Failed`` event that says what happened. Layout: ``engine.scaleout.redis_keys``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from typing import Any

import redis.exceptions

from engine.scaleout.dispatch_leases import DispatchedJob, LeaseKeeper, PendingJob, short_error
from engine.scaleout.dispatch_policy import NoWorkerCanRun, WorkerSlot, choose_worker
from engine.scaleout.dispatch_queries import DispatcherQueries
from engine.contract import protocol
from engine.contract.config import ArcaeConfig, Secrets
from engine.contract.errors import QueueFull
from engine.contract.transport import ConnectCallback, EngineRejected, EngineUnavailable, EventCallback, JobRequest
from engine.scaleout.redis_files import FILE_TTL_S, discard_outputs, encode_file, receive_outputs, source_key
from engine.scaleout.redis_keys import (
    CONTROL_MAXLEN,
    DONE_TTL_S,
    EVENTS_GROUP,
    RedisKeys,
    WorkerInfo,
    cancel_tasks,
    check_redis_url,
    ensure_group,
    make_client,
)
from engine.scheduler import FairScheduler, ScheduledJob

log = logging.getLogger(__name__)

BLOCK_MS = 1000


class Dispatcher(DispatcherQueries, LeaseKeeper):
    """Submit jobs to Redis-connected workers; deliver their events to ``on_event``."""

    def __init__(
        self,
        config: ArcaeConfig,
        secrets: Secrets | None = None,
        *,
        on_event: EventCallback,
        on_connect: ConnectCallback | None = None,
        url: str | None = None,
        keys: RedisKeys | None = None,
        consumer: str = "dispatcher",
        affinity_wait_s: float = 2.0,
        tick_s: float = 0.2,
    ) -> None:
        self.config = config
        self.url = url or config.engine.redis_url
        password = secrets.redis_password.get_secret_value() if secrets and secrets.redis_password else None
        self.where = check_redis_url(self.url, password, config.engine.redis_password_env)
        self._password = password
        self.keys = keys or RedisKeys()
        self.on_event = on_event
        self.on_connect = on_connect
        self.consumer = consumer
        self.affinity_wait_s = affinity_wait_s
        self.tick_s = tick_s
        self.lease_ms = int(config.engine.lease_ttl_s * 1000)
        self.max_attempts = config.engine.max_attempts
        self.client: Any = None
        self.outputs_dir = config.path(config.storage.outputs_dir)
        self._queue = FairScheduler(config.engine.queue_limit)
        self._inflight: dict[str, DispatchedJob] = {}
        self._workers: dict[str, WorkerInfo] = {}
        self._adapters: dict[str, list[protocol.AdapterInfo]] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._known_workers: list[str] = []
        self._refresh_due = False
        self._closing = False
        self._last_reap = 0.0
        self.connected = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect, pick up jobs still on workers, call ``on_connect``, start the loops.

        When Redis cannot be reached yet, this logs it and keeps trying in the background
        (submitted jobs wait in the dispatcher's queue meanwhile).
        """
        self._closing = False
        self.client = make_client(self.url, self._password, block_ms=BLOCK_MS)
        try:
            await self._connect()
        except Exception as exc:
            log.warning("cannot reach Redis at %s (%s); retrying in the background", self.where, short_error(exc))
            self._tasks = [asyncio.create_task(self._connect_until_up(), name="dispatcher-connect")]
            return
        await self._run_after_connect()

    async def _connect(self) -> None:
        await self.client.ping()
        await ensure_group(self.client, self.keys.events, EVENTS_GROUP)
        await self._load_inflight()
        await self._refresh_workers()

    async def _connect_until_up(self) -> None:
        backoff = list(self.config.engine.restart_backoff_s) or [5.0]
        for attempt in itertools.count():
            await asyncio.sleep(backoff[min(attempt, len(backoff) - 1)])
            try:
                await self._connect()
            except Exception as exc:
                log.info("Redis at %s still unreachable (%s)", self.where, short_error(exc))
                continue
            await self._run_after_connect()
            return

    async def _run_after_connect(self) -> None:
        self.connected = True
        log.info("dispatcher connected to %s: %d worker(s), %d job(s) in flight",
                 self.where, len(self._workers), len(self._inflight))
        if self.on_connect is not None:
            try:
                await self.on_connect()
            except Exception:
                log.exception("on_connect failed")
        self._tasks += [
            asyncio.create_task(self._event_loop(), name="dispatcher-events"),
            asyncio.create_task(self._tick_loop(), name="dispatcher-tick"),
        ]

    async def close(self) -> None:
        """Stop the loops; jobs on workers keep running and are found again by the next start."""
        self._closing = True
        current = asyncio.current_task()
        await cancel_tasks([t for t in self._tasks if t is not current])
        self._tasks = []
        if self.client is not None:
            await self.client.aclose()
        self.connected = False

    # ------------------------------------------------------------------ the EngineLink interface

    async def submit(self, request: JobRequest) -> protocol.Queued:
        """Queue a job; resubmitting a job that is queued or on a worker changes nothing."""
        if isinstance(request, protocol.DriftRequest):  # Redis workers accept generate, img2img and train only
            raise EngineRejected("bad_request", "drift measurements run on one engine (local or remote mode), not "
                                 "through Redis scale-out; run `python -m training drift` on a GPU host instead")
        if isinstance(request, protocol.DistillRequest):  # its result must be installed on every worker's disk
            raise EngineRejected("bad_request", "distillation runs on one engine (local or remote mode), not "
                                 "through Redis scale-out; run `python -m training distill-fast` on a GPU host "
                                 "instead and copy the adapter to every worker's adapters folder")
        job_id = request.job_id
        if job_id in self._inflight:
            d = self._inflight[job_id]
            if request.attempt > max(d.attempt, d.shown_attempt):
                d.shown_attempt = request.attempt
                await self.client.hset(self.keys.job(job_id), "shown_attempt", request.attempt)
            return protocol.Queued(job_id=job_id, attempt=max(d.attempt, d.shown_attempt), position=0)
        queued = self._queue.get(job_id)
        if queued is None:
            priority = getattr(request, "priority", "batch")
            job = ScheduledJob(job_id=job_id, owner=request.owner, priority=priority, payload=PendingJob(request, time.monotonic()))
            try:
                self._queue.push(job)
            except QueueFull as exc:
                raise EngineRejected("queue_full", exc.message) from None
            self._wake.set()
        position = self._queue.position(job_id) or 0
        return protocol.Queued(job_id=job_id, attempt=request.attempt, position=position)

    async def cancel(self, job_id: str) -> bool:
        """Cancel a queued job at once, or a running one on whichever worker holds it."""
        job = self._queue.remove(job_id)
        if job is not None:
            await self._emit(protocol.Canceled(job_id=job_id, attempt=job.payload.request.attempt))
            return True
        d = self._inflight.get(job_id)
        if d is None or d.canceled:
            return False
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(self.keys.cancel(job_id), "1", ex=DONE_TTL_S)
                pipe.hset(self.keys.job(job_id), "canceled", "1")
                pipe.xadd(self.keys.control(d.worker),
                          {"request": protocol.encode(protocol.CancelRequest(job_id=job_id))}, maxlen=CONTROL_MAXLEN)
                await pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise EngineUnavailable(f"cannot reach Redis to cancel job {job_id}: {short_error(exc)}") from None
        d.canceled = True
        return True

    # ------------------------------------------------------------------ loops

    async def _tick_loop(self) -> None:
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.tick_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                now = time.monotonic()
                if now - self._last_reap >= min(1.0, self.lease_ms / 4000):
                    self._last_reap = now
                    await self._refresh_workers()
                    await self._reap()
                elif self._refresh_due:
                    await self._refresh_workers()
                self._refresh_due = False
                await self._dispatch_ready()
                if not self.connected:  # Redis is back: let the bot resubmit what it holds
                    self.connected = True
                    log.info("Redis at %s reachable again", self.where)
                    if self.on_connect is not None:
                        self._tasks.append(asyncio.create_task(self.on_connect()))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected = False
                log.warning("dispatch round failed (%s); retrying", exc)
                await asyncio.sleep(1.0)

    async def _event_loop(self) -> None:
        # First what an earlier run of this consumer read but never acknowledged.
        pending = "0"
        while not self._closing:
            try:
                reply = await self.client.xreadgroup(
                    EVENTS_GROUP, self.consumer, {self.keys.events: pending}, count=100,
                    block=None if pending == "0" else BLOCK_MS,
                )
                entries = [e for _s, es in reply or [] for e in es]
                if pending == "0" and not entries:
                    pending = ">"
                    continue
                for entry_id, fields in entries:
                    if self._closing:  # left pending: the next start reads them first
                        return
                    await self._apply_entry(entry_id, fields or {})  # None: deleted meanwhile
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected = False
                log.warning("reading events failed (%s); retrying", exc)
                pending = "0"  # read again what was read but not acknowledged (e.g. its commit failed)
                await asyncio.sleep(1.0)
                if "NOGROUP" in str(exc):  # Redis restarted without its data
                    with contextlib.suppress(Exception):
                        await ensure_group(self.client, self.keys.events, EVENTS_GROUP)

    # ------------------------------------------------------------------ events in

    async def _apply_entry(self, entry_id: str, fields: dict[str, str]) -> None:
        try:
            event = protocol.decode_event(fields.get("event", ""))
        except protocol.ProtocolError as exc:
            log.warning("dropping malformed event %s: %s", entry_id, exc.message)
            event = None
        if event is not None:
            await self._apply(event, fields.get("worker", "?"))
        async with self.client.pipeline(transaction=True) as pipe:
            d = self._inflight.get(getattr(event, "job_id", ""))
            if d is not None:
                pipe.hset(self.keys.job(d.request.job_id), "last_seq", d.last_seq)
            pipe.xack(self.keys.events, EVENTS_GROUP, entry_id)
            pipe.xdel(self.keys.events, entry_id)
            await pipe.execute()

    async def _apply(self, event: Any, worker: str) -> None:
        """Apply one worker event exactly once per (job_id, attempt, seq)."""
        d = self._inflight.get(getattr(event, "job_id", ""))
        if d is not None and (worker != d.worker or event.attempt != d.attempt):
            # Only the lease owner's current attempt speaks for a job: a stale or foreign worker's
            # result (Redis entries are untrusted) must not become the user's image.
            log.warning("ignoring %s of job %s attempt %s from worker %.64r: the job's attempt %s is held by %.64r",
                        event.type, d.request.job_id, event.attempt, worker, d.attempt, d.worker)
            return
        if d is None or event.seq <= d.last_seq:
            log.debug("ignoring %s of job %s attempt %s seq %s from %.64r (stale or duplicate)",
                      event.type, getattr(event, "job_id", "?"), getattr(event, "attempt", "?"),
                      getattr(event, "seq", "?"), worker)
            return
        if isinstance(event, protocol.Failed) and d.canceled:
            # Stopped by the cancel, whatever the worker calls it: the user asked for this.
            event = protocol.Canceled(job_id=event.job_id, attempt=event.attempt, seq=event.seq)
        elif isinstance(event, protocol.Failed) and event.retryable:
            d.last_seq = event.seq
            await self._retry(d, f"worker {worker}: {event.message}")
            return
        terminal = isinstance(event, protocol.TERMINAL_EVENT_TYPES)
        if terminal:
            self._refresh_due = True  # the worker's record now shows what it has loaded
            if isinstance(event, protocol.Completed):
                event = await receive_outputs(self.client, self.keys.prefix, event)
        if d.shown_attempt > event.attempt:
            event = event.model_copy(update={"attempt": d.shown_attempt})
        await self._emit(event)
        # Only after the bot stored it: an event whose commit failed is read again, not skipped as seen
        # (so its output bytes stay in Redis until now, too).
        d.last_seq = event.seq
        if isinstance(event, protocol.Completed):
            await discard_outputs(self.client, self.keys.prefix, event)
        if terminal:
            await self._finish(d)

    async def _emit(self, event: Any) -> None:
        """Hand the event to the bot; if its commit fails this raises, and the entry stays unacknowledged."""
        try:
            await self.on_event(event)
        except Exception:
            log.exception("on_event failed for %s of job %s; it stays unacknowledged and is read again",
                          event.type, getattr(event, "job_id", "?"))
            raise

    async def _finish(self, d: DispatchedJob) -> None:
        job_id = d.request.job_id
        self._inflight.pop(job_id, None)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.srem(self.keys.inflight, job_id)
            pipe.hset(self.keys.job(job_id), "state", "done")
            pipe.expire(self.keys.job(job_id), DONE_TTL_S)
            await pipe.execute()
        self._wake.set()

    async def _retry(self, d: DispatchedJob, reason: str, *, lost: bool = False) -> None:
        """Dispatch again with attempt + 1, or dead-letter after ``max_attempts``.

        ``lost``: the worker stopped under the job (not a failure it reported), which the bot tells its user.
        """
        job_id = d.request.job_id
        attempt = max(d.attempt, d.shown_attempt)  # as the bot counts
        reasons = (d.reasons + "; " if d.reasons else "") + f"attempt {attempt}: {reason}"
        await self._finish(d)
        if d.canceled:
            await self._emit(protocol.Canceled(job_id=job_id, attempt=attempt, seq=d.last_seq + 1))
            return
        if attempt >= self.max_attempts:
            shown = reasons if len(reasons) <= 600 else reasons[:599] + "…"
            message = f"This job failed {attempt} times on the image workers and will not be retried ({shown})."
            await self.client.xadd(self.keys.deadletter, {"job_id": job_id, "attempts": str(attempt), "reason": reasons})
            log.error("job %s dead-lettered: %s", job_id, reasons)
            await self._emit(protocol.Failed(job_id=job_id, attempt=attempt, seq=d.last_seq + 1,
                                             error="engine_error", message=message, retryable=False))
            return
        log.warning("job %s: %s; dispatching attempt %d", job_id, reason, attempt + 1)
        request = d.request.model_copy(update={"attempt": attempt + 1})
        job = ScheduledJob(job_id=job_id, owner=request.owner, priority=getattr(request, "priority", "batch"),
                           payload=PendingJob(request, time.monotonic(), d.worker, reasons))
        try:
            self._queue.push(job)
        except QueueFull:  # a retry is never refused: the job already waited its turn
            self._queue.limit += 1
            self._queue.push(job)
            self._queue.limit -= 1
        position = self._queue.position(job_id) or 0
        await self._emit(protocol.Queued(job_id=job_id, attempt=request.attempt, position=position, restarted=lost))

    # ------------------------------------------------------------------ jobs out

    async def _dispatch_ready(self) -> None:
        """Send queued jobs, in fair order, to workers with a free slot."""
        if not len(self._queue):
            return
        slots = self._slots()
        if not any(s.free > 0 for s in slots):
            return
        now = time.monotonic()
        for job in self._queue.order():
            pending: PendingJob = job.payload
            try:
                slot = choose_worker(pending.request, slots, waited_s=now - pending.since,
                                     affinity_wait_s=self.affinity_wait_s,
                                     lcm_adapter=self.config.adapters.lcm_adapter, avoid=pending.avoid)
            except NoWorkerCanRun as exc:
                self._queue.remove(job.job_id)
                await self._emit(protocol.Failed(job_id=job.job_id, attempt=pending.request.attempt,
                                                 error="unknown_adapter", message=str(exc)))
                continue
            if slot is None:
                continue
            # pop() (not remove) when it is the head, so the owner's turn is recorded.
            head = self._queue.order()[0]
            taken = self._queue.pop() if head.job_id == job.job_id else self._queue.remove(job.job_id)
            assert taken is not None
            await self._send(pending, slot.name)
            slot.assigned += 1
            if not any(s.free > 0 for s in slots):
                return

    def _slots(self) -> list[WorkerSlot]:
        assigned: dict[str, int] = {}
        training: set[str] = set()
        for d in self._inflight.values():
            assigned[d.worker] = assigned.get(d.worker, 0) + 1
            if isinstance(d.request, protocol.TrainRequest):
                training.add(d.worker)
        return [
            WorkerSlot(
                name=name,
                capacity=info.capacity,
                assigned=assigned.get(name, 0),
                accepts_training=info.accepts_training,
                loaded=frozenset(info.loaded_adapters),
                available=frozenset(a.name for a in self._adapters.get(name, [])),
                training=name in training,
            )
            for name, info in self._workers.items()
        ]

    async def _send(self, pending: PendingJob, worker: str) -> None:
        request = pending.request
        job_id = request.job_id
        d = DispatchedJob(request=request, worker=worker, attempt=request.attempt, reasons=pending.reasons)
        self._inflight[job_id] = d
        source = None
        if isinstance(request, protocol.Img2ImgRequest):  # the worker may be on another host
            try:
                source = await asyncio.to_thread(encode_file, self.outputs_dir / request.source)
            except (OSError, ValueError) as exc:
                log.warning("job %s: cannot attach source %s (%s)", job_id, request.source, exc)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.job(job_id))
            pipe.hset(self.keys.job(job_id), mapping={
                "request": protocol.encode(request), "worker": worker, "attempt": request.attempt,
                "last_seq": 0, "state": "dispatched", "reasons": pending.reasons,
            })
            pipe.sadd(self.keys.inflight, job_id)
            if source is not None:
                pipe.set(source_key(self.keys.prefix, job_id, request.source), source, ex=FILE_TTL_S)
            pipe.xadd(self.keys.jobs(worker), {"request": protocol.encode(request)})
            d.entry_id = (await pipe.execute())[-1]
        await self.client.hset(self.keys.job(job_id), "entry_id", d.entry_id)
        log.info("job %s attempt %d -> %s", job_id, request.attempt, worker)
