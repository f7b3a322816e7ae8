"""Redis layout shared by scale-out workers (``engine.scaleout.redis_worker``) and the bot's dispatcher.

Redis is only the transport; the bot's SQLite database stays the source of truth for jobs.
Every value is a typed protocol message (``engine.contract.protocol.encode``) or a small JSON record.
All keys start with a prefix (default ``arcae``) so that one Redis can serve several bots.

Keys and streams (``P`` = prefix, ``W`` = worker name, ``J`` = job id)::

    P:workers            SET     names of every worker that ever registered (discovery)
    P:worker:W           STRING  JSON WorkerInfo (device, GPU, adapters loaded, capacity,
                                 jobs held); TTL = lease_ttl_s, refreshed every ttl/3.
                                 Its absence means the worker is gone.
    P:worker:W:adapters  STRING  JSON list of AdapterInfo the worker can load; same TTL.
    P:jobs:W             STREAM  jobs for one worker; field "request" = encoded request
                                 (GenerateRequest | Img2ImgRequest | TrainRequest) whose
                                 ``attempt`` is the attempt number. Group "workers", the
                                 worker's consumer is its name. The dispatcher XADDs only
                                 when the worker has a free slot (capacity 1-2), so a
                                 worker never holds more. An entry stays pending while
                                 the job runs; the worker refreshes its idle time with
                                 ``XCLAIM ... JUSTID`` (the lease). Entries idle longer
                                 than lease_ttl_s are reclaimed by the dispatcher with
                                 XAUTOCLAIM. Finished entries are XACKed and XDELed one
                                 by one; job streams are NEVER trimmed (MAXLEN/XTRIM
                                 would delete entries a consumer still holds).
    P:control:W          STREAM  cancel / reload requests for one worker (field
                                 "request"); read with plain XREAD, approximately
                                 capped: a control message is only a nudge.
    P:events             STREAM  job events from every worker (field "event" = encoded
                                 event with job_id, attempt, seq; field "worker").
                                 Group "dispatcher"; entries are XACKed and XDELed
                                 once applied.
    P:job:J              HASH    dispatch state of a job that left the dispatcher's
                                 memory queue: request, worker, attempt, last_seq,
                                 state (dispatched | done), canceled. Lets a restarted
                                 dispatcher pick up jobs that kept running. "done"
                                 hashes expire after a day (late events are dropped).
    P:inflight           SET     ids of jobs currently dispatched to a worker.
    P:cancel:J           STRING  "1" when a job was canceled (TTL one day): a worker
                                 checks it before starting a job it read.
    P:deadletter         STREAM  jobs that failed max_attempts times: job_id, attempts,
                                 reason. Kept for operators; never trimmed.
    P:file:J:A:NAME      STRING  base64 of output NAME of job J attempt A, written with the
                                 terminal event (same MULTI); the dispatcher stores it in
                                 the bot's outputs dir and deletes the key. TTL one day.
    P:file:J:src:NAME    STRING  base64 of an img2img source, written by the dispatcher with
                                 the job entry; a worker that lacks the file stores it.
                                 See ``engine.scaleout.redis_files``.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

JOBS_GROUP = "workers"
EVENTS_GROUP = "dispatcher"
DONE_TTL_S = 24 * 3600
CONTROL_MAXLEN = 1000


@dataclass(frozen=True)
class RedisKeys:
    """Key names for one prefix; see the module docstring for what each holds."""

    prefix: str = "arcae"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    def worker_adapters(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}:adapters"

    def jobs(self, name: str) -> str:
        return f"{self.prefix}:jobs:{name}"

    def control(self, name: str) -> str:
        return f"{self.prefix}:control:{name}"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    @property
    def inflight(self) -> str:
        return f"{self.prefix}:inflight"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}:deadletter"


class RedisConfigError(ValueError):
    """The Redis URL or password setting is unsafe or malformed; the message says what to do."""


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_redis_url(url: str, password: str | None, password_env: str) -> str:
    """Validate a Redis URL; return a description without credentials for log lines.

    A password inside the URL is refused (it would show up in process lists and logs), and a
    Redis outside loopback without a password is refused: anyone reaching it could run jobs.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise RedisConfigError(f"Redis URL must start with redis://, rediss:// or unix:// (got {parts.scheme or 'no'} scheme)")
    if parts.password or parts.username:
        raise RedisConfigError(
            f"do not put credentials in the Redis URL; set the environment variable {password_env} instead"
        )
    host = parts.hostname or ""
    if parts.scheme != "unix" and not _is_loopback(host) and not password:
        raise RedisConfigError(
            f"Redis at {host} is not on loopback and no password is set: protect it with "
            f"requirepass (or an ACL user) and put the password in the environment variable {password_env}"
        )
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def make_client(url: str, password: str | None, *, block_ms: int) -> Any:
    """An asyncio Redis client whose socket timeout outlasts its longest blocking read.

    redis-py raises TimeoutError when ``socket_timeout`` is shorter than an XREAD BLOCK.
    """
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(
        url,
        password=password or None,
        decode_responses=True,
        socket_timeout=block_ms / 1000 + 10,
        socket_connect_timeout=5,
        health_check_interval=30,
    )


async def ensure_group(client: Any, stream: str, group: str) -> None:
    """``XGROUP CREATE stream group 0 MKSTREAM``, tolerating BUSYGROUP (already there)."""
    import redis.exceptions

    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.exceptions.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _now() -> float:
    import time

    return time.time()


class WorkerInfo(BaseModel):
    """What a worker advertises in its heartbeat key (``P:worker:W``)."""

    model_config = ConfigDict(extra="ignore")

    name: str
    host: str = ""
    pid: int = 0
    device: str = ""
    gpu: str = ""
    model: str = ""
    capacity: int = Field(1, ge=1, le=2)
    accepts_training: bool = False
    loaded_adapters: list[str] = Field(default_factory=list)
    jobs: list[str] = Field(default_factory=list)
    vram_used_mb: float | None = None
    vram_total_mb: float | None = None
    started_at: float = Field(default_factory=_now)
    seen_at: float = Field(default_factory=_now)
    protocol_version: int = 1
    rates_outputs: bool | None = None


async def cancel_tasks(tasks: list[Any], *, patience_s: float = 10.0) -> None:
    """Cancel tasks and wait for them, cancelling again until they end.

    redis-py 8.1's asyncio client sometimes swallows a CancelledError that lands inside a
    command (the task's loop goes on), so one ``cancel()`` is not always enough.
    """
    import asyncio

    pending = {t for t in tasks if not t.done()}
    deadline = asyncio.get_running_loop().time() + patience_s
    while pending and asyncio.get_running_loop().time() < deadline:
        for task in pending:
            task.cancel()
        _done, pending = await asyncio.wait(pending, timeout=0.2)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            logging.getLogger(__name__).warning("task %s ended with %r", task.get_name(), task.exception())
