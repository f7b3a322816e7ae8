"""The worker side of scale-out: take jobs from Redis, run them on the GPU, publish events.

A worker only makes outbound connections (a GPU behind a home router works). It registers a
heartbeat key with a TTL that advertises its device, loaded adapters and capacity (1-2 jobs);
reads its own job stream with a consumer group; runs jobs on a ``JobExecutor`` (the thread
that owns the GPU); keeps the lease of every entry it holds by resetting the entry's idle time
with ``XCLAIM ... JUSTID``; and publishes the executor's events to the events stream. A
terminal event, the XACK and the XDEL of its job entry go in one MULTI transaction, so a job
is either finished and acknowledged or still pending (and reclaimable). Layout:
``engine.scaleout.redis_keys``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

from engine.contract import protocol
from engine.contract.errors import EngineError
from engine.service.job_executor import RETRYABLE_CODES, JobExecutor
from engine.scaleout.redis_files import FILE_TTL_S, decode_file, encode_file, output_key, source_key, store_file
from engine.scaleout.redis_keys import JOBS_GROUP, RedisKeys, WorkerInfo, cancel_tasks, ensure_group

log = logging.getLogger(__name__)

BLOCK_MS = 2000
# Failures another attempt (maybe on another worker) can fix.
RETRY_ELSEWHERE = RETRYABLE_CODES | {"engine_unavailable", "queue_full"}


@dataclass
class _Held:
    """A job entry this worker read and has not acknowledged yet."""

    entry_id: str
    request: Any
    seq: int = 0


class RedisWorker:
    """Serve jobs from ``P:jobs:<name>`` on ``executor`` until ``stop()``."""

    def __init__(
        self,
        client: Any,
        executor: JobExecutor,
        *,
        name: str = "",
        keys: RedisKeys | None = None,
        capacity: int = 1,
        lease_ttl_s: float = 30.0,
        accepts_training: bool = False,
        block_ms: int = BLOCK_MS,
        loaded_adapters: Callable[[], list[str]] | None = None,
        gpu: str = "",
        outputs_dir: Path | None = None,
    ) -> None:
        if capacity not in (1, 2):
            raise ValueError("a worker holds one or two jobs (capacity 1 or 2)")
        self.client = client
        self.executor = executor
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.keys = keys or RedisKeys()
        self.capacity = capacity
        self.lease_ttl_s = lease_ttl_s
        self.accepts_training = accepts_training
        self.block_ms = block_ms
        # Adapters in GPU memory now (what affinity is about); default: what describe() says.
        self._loaded_adapters = loaded_adapters
        self.gpu = gpu
        # Where img2img sources must be for the executor (the engine's outputs dir).
        self.outputs_dir = Path(outputs_dir) if outputs_dir is not None else None
        self._held: dict[str, _Held] = {}
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._control_start = "0-0"
        self.ready = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Register, then serve until ``stop()``; unfinished jobs are left to be reclaimed."""
        loop = asyncio.get_running_loop()
        await ensure_group(self.client, self.keys.jobs(self.name), JOBS_GROUP)
        self.executor.start(lambda ev: loop.call_soon_threadsafe(self._events.put_nowait, ev))
        await self._publish_adapters()
        await self._heartbeat_once()
        await self.client.sadd(self.keys.workers, self.name)
        # Control messages from now on (explicit id, not "$": none slips between reads).
        newest = await self.client.xrevrange(self.keys.control(self.name), count=1)
        self._control_start = newest[0][0] if newest else "0-0"
        log.info("worker %s registered (capacity %d, training %s)", self.name, self.capacity, self.accepts_training)
        self._tasks = [
            asyncio.create_task(self._job_loop(), name="jobs"),
            asyncio.create_task(self._event_loop(), name="events"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._control_loop(), name="control"),
        ]
        self.ready.set()
        try:
            await self._stopping.wait()
        finally:
            await self._shutdown()

    def stop(self) -> None:
        """Ask ``run()`` to return (safe from a signal handler)."""
        self._stopping.set()

    async def _shutdown(self) -> None:
        await cancel_tasks(self._tasks)
        # Jobs still held stay pending in Redis; deleting the heartbeat key tells the
        # dispatcher at once that this worker is gone, so it reclaims them without waiting.
        released = list(self._held)
        self._held.clear()
        await asyncio.to_thread(self.executor.stop)
        try:
            await self.client.delete(self.keys.worker(self.name), self.keys.worker_adapters(self.name))
        except Exception as exc:  # Redis gone too: the key's TTL does the same job
            log.warning("could not unregister: %s", exc)
        if released:
            log.info("left %d unfinished job(s) to be reclaimed: %s", len(released), ", ".join(released))

    # ------------------------------------------------------------------ jobs in

    async def _job_loop(self) -> None:
        stream = self.keys.jobs(self.name)
        while not self._stopping.is_set():
            free = self.capacity - len(self._held)
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            try:
                reply = await self.client.xreadgroup(
                    JOBS_GROUP, self.name, {stream: ">"}, count=free, block=self.block_ms
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reading jobs failed (%s); retrying", exc)
                await asyncio.sleep(1.0)
                if "NOGROUP" in str(exc):  # Redis restarted without its data
                    with contextlib.suppress(Exception):
                        await ensure_group(self.client, stream, JOBS_GROUP)
                continue
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    await self._accept(entry_id, fields or {})

    async def _accept(self, entry_id: str, fields: dict[str, str]) -> None:
        try:
            request = protocol.decode_request(fields.get("request", ""))
            if not isinstance(request, (protocol.GenerateRequest, protocol.Img2ImgRequest, protocol.TrainRequest)):
                raise protocol.ProtocolError(f"not a job request: {request.type}")
        except protocol.ProtocolError as exc:
            log.warning("dropping malformed job entry %s: %s", entry_id, exc.message)
            await self._finish_entry(entry_id, None)
            return
        held = _Held(entry_id, request)
        self._held[request.job_id] = held
        if isinstance(request, protocol.TrainRequest) and not self.accepts_training:
            ev = protocol.Failed(job_id=request.job_id, attempt=request.attempt, error="bad_request",
                                 message=f"worker {self.name} does not accept training runs", retryable=True)
            await self._publish(ev)
            return
        if await self.client.exists(self.keys.cancel(request.job_id)):
            await self._publish(protocol.Canceled(job_id=request.job_id, attempt=request.attempt))
            return
        log.info("job %s attempt %d accepted", request.job_id, request.attempt)
        try:
            if isinstance(request, protocol.Img2ImgRequest):
                await self._fetch_source(request)
            self.executor.submit(request)
        except EngineError as exc:  # validation, unknown adapter, missing source, shutting down
            await self._publish(protocol.Failed(job_id=request.job_id, attempt=request.attempt, error=exc.code,
                                                message=exc.message, retryable=exc.code in RETRY_ELSEWHERE))
        except Exception as exc:  # a bug below us: this job fails (retryable), the worker goes on
            log.exception("submitting job %s failed", request.job_id)
            await self._publish(protocol.Failed(job_id=request.job_id, attempt=request.attempt, error="engine_error",
                                                message=f"{type(exc).__name__}: {exc}", retryable=True))

    async def _fetch_source(self, request: protocol.Img2ImgRequest) -> None:
        """Store the img2img source the dispatcher attached, unless this host already has it."""
        if self.outputs_dir is None or (self.outputs_dir / request.source).is_file():
            return
        data = await self.client.get(source_key(self.keys.prefix, request.job_id, request.source))
        if data is None:
            return  # the executor answers "source not found"
        try:
            await asyncio.to_thread(store_file, self.outputs_dir, request.source, decode_file(data))
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot store the source image {request.source}: {exc}") from None

    # ------------------------------------------------------------------ events out

    async def _event_loop(self) -> None:
        while not self._stopping.is_set():
            event = await self._events.get()
            while not self._stopping.is_set():  # in order: retry this one before the next
                try:
                    await self._publish(event)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # Redis unreachable: keep the event; the job entry stays pending meanwhile.
                    log.warning("publishing an event failed (%s); retrying", exc)
                    await asyncio.sleep(1.0)

    async def _publish(self, event: Any) -> None:
        if isinstance(event, protocol.Queued):
            return  # the dispatcher owns the queue; a worker's own position means nothing to the bot
        held = self._held.get(getattr(event, "job_id", ""))
        if held is None or held.request.attempt != getattr(event, "attempt", None):
            return  # lease lost (reclaimed elsewhere) or a stale attempt: nobody wants it
        held.seq += 1
        update: dict[str, Any] = {"seq": held.seq}
        if isinstance(event, protocol.Started):
            update["worker"] = self.name
        event = event.model_copy(update=update)
        files: dict[str, str] = {}
        if isinstance(event, protocol.Completed):
            # The image bytes go in keys of their own (the events stream stays small); the
            # dispatcher puts them back into the event.
            files = await asyncio.to_thread(self._attach_outputs, event)
            event = event.model_copy(update={"images": [i.model_copy(update={"data_b64": None}) for i in event.images]})
        fields = {"event": protocol.encode(event), "worker": self.name}
        if isinstance(event, protocol.TERMINAL_EVENT_TYPES):
            await self._finish_entry(held.entry_id, fields, files)
            self._held.pop(event.job_id, None)
            self._slot_free.set()
            log.info("job %s attempt %d %s", event.job_id, event.attempt, event.type)
        else:
            await self.client.xadd(self.keys.events, fields)

    def _attach_outputs(self, event: protocol.Completed) -> dict[str, str]:
        """Output files to send along (key -> base64), for a bot on another host."""
        files = {}
        for image in event.images:
            try:
                files[output_key(self.keys.prefix, event.job_id, event.attempt, Path(image.path).name)] = (
                    image.data_b64 or encode_file(image.path))
            except (OSError, ValueError) as exc:  # the bot refuses the image without its bytes
                log.warning("cannot attach %s of job %s: %s", image.path, event.job_id, exc)
        return files

    async def _finish_entry(self, entry_id: str, event_fields: dict[str, str] | None,
                            files: dict[str, str] | None = None) -> None:
        """Publish the terminal event (and its files), acknowledge + delete the entry atomically."""
        stream = self.keys.jobs(self.name)
        async with self.client.pipeline(transaction=True) as pipe:
            for key, data in (files or {}).items():
                pipe.set(key, data, ex=FILE_TTL_S)
            # Fresh heartbeat first: the dispatcher sees the adapters now loaded here
            # when it places the next job.
            pipe.set(self.keys.worker(self.name), self.info().model_dump_json(), px=int(self.lease_ttl_s * 1000))
            if event_fields is not None:
                pipe.xadd(self.keys.events, event_fields)
            pipe.xack(stream, JOBS_GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()

    # ------------------------------------------------------------------ lease and heartbeat

    async def _heartbeat_loop(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(self.lease_ttl_s / 3)
            try:
                await self._heartbeat_once()
                await self._refresh_leases()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("heartbeat failed (%s); the lease expires in %.0f s", exc, self.lease_ttl_s)

    def info(self) -> WorkerInfo:
        desc = self.executor.describe() or {}
        return WorkerInfo(
            name=self.name,
            host=socket.gethostname(),
            pid=os.getpid(),
            device=str(desc.get("device", "")),
            gpu=self.gpu or str(desc.get("gpu", "")),
            model=str(desc.get("model", "")),
            capacity=self.capacity,
            accepts_training=self.accepts_training,
            loaded_adapters=list(self._loaded_adapters() if self._loaded_adapters else desc.get("loaded_adapters", [])),
            jobs=list(self._held),
            vram_used_mb=desc.get("vram_used_mb"),
            vram_total_mb=desc.get("vram_total_mb"),
            protocol_version=protocol.PROTOCOL_VERSION,
            rates_outputs=desc.get("rates_outputs"),
        )

    async def _heartbeat_once(self) -> None:
        ttl_ms = int(self.lease_ttl_s * 1000)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.worker(self.name), self.info().model_dump_json(), px=ttl_ms)
            pipe.pexpire(self.keys.worker_adapters(self.name), ttl_ms)
            pipe.sadd(self.keys.workers, self.name)  # again: Redis may have restarted empty
            _set, adapters_kept, _added = await pipe.execute()
        if not adapters_kept:
            await self._publish_adapters()

    async def _refresh_leases(self) -> None:
        """Reset the idle time of every held entry; an entry no longer pending was reclaimed."""
        if not self._held:
            return
        # A cancel whose control message was missed (e.g. sent while reconnecting).
        job_ids = list(self._held)
        flags = await self.client.mget([self.keys.cancel(j) for j in job_ids])
        for job_id, flag in zip(job_ids, flags):
            if flag:
                self.executor.cancel(job_id)
        by_entry = {h.entry_id: job_id for job_id, h in self._held.items()}
        kept = await self.client.xclaim(
            self.keys.jobs(self.name), JOBS_GROUP, self.name, 0, list(by_entry), justid=True
        )
        for entry_id in set(by_entry) - {str(x) for x in kept or []}:
            job_id = by_entry[entry_id]
            log.warning("lease of job %s was lost (reclaimed by the dispatcher); stopping it here", job_id)
            self._held.pop(job_id, None)
            self.executor.cancel(job_id)
            self._slot_free.set()

    async def _publish_adapters(self) -> None:
        adapters = await asyncio.to_thread(self.executor.list_adapters)
        payload = "[" + ",".join(a.model_dump_json() for a in adapters) + "]"
        await self.client.set(self.keys.worker_adapters(self.name), payload, px=int(self.lease_ttl_s * 1000))

    # ------------------------------------------------------------------ control

    async def _control_loop(self) -> None:
        stream = self.keys.control(self.name)
        last_id = self._control_start
        while not self._stopping.is_set():
            try:
                reply = await self.client.xread({stream: last_id}, block=self.block_ms, count=10)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reading control messages failed (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    await self._handle_control(fields.get("request", ""))

    async def _handle_control(self, raw: str) -> None:
        try:
            request = protocol.decode_request(raw)
        except protocol.ProtocolError as exc:
            log.warning("ignoring malformed control message: %s", exc.message)
            return
        if isinstance(request, protocol.CancelRequest):
            if request.job_id in self._held:
                log.info("cancel of job %s requested", request.job_id)
                self.executor.cancel(request.job_id)
        elif isinstance(request, protocol.ReloadAdaptersRequest):
            try:
                changes = await asyncio.to_thread(self.executor.reload_adapters)
                log.info("adapters reloaded: %s", changes)
            except Exception as exc:
                log.warning("adapter reload failed: %s", exc)
            await self._publish_adapters()
            await self._heartbeat_once()
