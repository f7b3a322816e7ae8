"""The job executor interface: what a scale-out worker (``engine.scaleout.redis_worker``) runs its jobs on.

``JobExecutor`` is the small interface the Redis worker needs: submit a request, cancel a job,
describe the device, list and reload adapters. Events come back through the ``emit`` callback
given to ``start`` (called from the executor's thread; it must be thread-safe). In production
it is the ``GpuWorker`` (``engine.cli.worker``); the tests' ``ThreadJobExecutor`` runs small job
functions instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from engine.contract import protocol

# Failures worth another attempt on (possibly) another worker.
RETRYABLE_CODES = frozenset({"out_of_memory", "engine_error"})

EmitFn = Callable[[Any], None]


class JobExecutor(Protocol):
    """What ``RedisWorker`` needs from the thing that owns the GPU."""

    def start(self, emit: EmitFn) -> None: ...

    def submit(self, request: Any) -> None: ...

    def cancel(self, job_id: str) -> bool: ...

    def describe(self) -> dict[str, Any]: ...

    def list_adapters(self) -> list[protocol.AdapterInfo]: ...

    def reload_adapters(self) -> dict[str, Any]: ...

    def stop(self) -> None: ...
