"""Job executors: what a scale-out worker (``engine.scaleout.redis_worker``) runs its jobs on.

``JobExecutor`` is the small interface the Redis worker needs: submit a request, cancel a job,
describe the device, list and reload adapters. Events come back through the ``emit`` callback
given to ``start`` (called from the executor's thread; it must be thread-safe).

``ThreadJobExecutor`` is the plain implementation: one thread runs one job at a time through a
job function ``run_job(request, ctx) -> dict`` (the fields of ``Completed``). The production
job function drives the Generator (``engine.cli.worker``); tests pass small functions. Either
way the same code turns the function's progress, return and exceptions into protocol events.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

from engine.contract import protocol
from engine.contract.errors import EngineError, JobCanceled

log = logging.getLogger(__name__)

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


class JobContext:
    """Handed to a job function: report progress, ask whether the job was canceled."""

    def __init__(self, request: Any, emit: EmitFn, cancel_flag: threading.Event) -> None:
        self.request = request
        self._emit = emit
        self._cancel = cancel_flag

    def is_canceled(self) -> bool:
        return self._cancel.is_set()

    def check_canceled(self) -> None:
        """Raise ``JobCanceled`` if the job was canceled (call it between steps)."""
        if self._cancel.is_set():
            raise JobCanceled("canceled")

    def progress(self, step: int, total: int, **fields: Any) -> None:
        self._emit(
            protocol.Progress(
                job_id=self.request.job_id, attempt=self.request.attempt, step=step, total=max(total, 1), **fields
            )
        )


JobFunction = Callable[[Any, JobContext], dict[str, Any]]


class ThreadJobExecutor:
    """One thread, one job at a time, through ``run_job``; jobs wait in FIFO order.

    The dispatcher decides order and gives a worker at most one or two jobs, so no scheduling
    happens here.
    """

    def __init__(
        self,
        run_job: JobFunction,
        *,
        describe: Callable[[], dict[str, Any]] | None = None,
        list_adapters: Callable[[], list[protocol.AdapterInfo]] | None = None,
        reload_adapters: Callable[[], dict[str, Any]] | None = None,
        name: str = "gpu-worker",
    ) -> None:
        self._run_job = run_job
        self._describe = describe or (lambda: {})
        self._list_adapters = list_adapters or (lambda: [])
        self._reload = reload_adapters or (lambda: {"added": [], "removed": [], "changed": []})
        self._queue: queue.Queue[Any] = queue.Queue()
        self._cancel_flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._emit: EmitFn = lambda ev: None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self, emit: EmitFn) -> None:
        self._emit = emit
        self._thread.start()

    def submit(self, request: Any) -> None:
        with self._lock:
            self._cancel_flags[request.job_id] = threading.Event()
        self._queue.put(request)

    def cancel(self, job_id: str) -> bool:
        with self._lock:
            flag = self._cancel_flags.get(job_id)
        if flag is None:
            return False
        flag.set()
        return True

    def describe(self) -> dict[str, Any]:
        return self._describe()

    def list_adapters(self) -> list[protocol.AdapterInfo]:
        return self._list_adapters()

    def reload_adapters(self) -> dict[str, Any]:
        # Queued on the worker thread so a reload never happens under a running job.
        done: queue.Queue[Any] = queue.Queue()
        self._queue.put(("reload", done))
        result = done.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def stop(self) -> None:
        with self._lock:
            for flag in self._cancel_flags.values():
                flag.set()
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, tuple):
                _, done = item
                try:
                    done.put(self._reload())
                except Exception as exc:  # reported to the caller, the thread goes on
                    done.put(exc)
                continue
            self._run_one(item)

    def _run_one(self, request: Any) -> None:
        with self._lock:
            flag = self._cancel_flags.setdefault(request.job_id, threading.Event())
        ids = {"job_id": request.job_id, "attempt": request.attempt}
        try:
            if flag.is_set():
                raise JobCanceled("canceled before it started")
            self._emit(protocol.Started(**ids))
            result = self._run_job(request, JobContext(request, self._emit, flag))
            self._emit(protocol.Completed(**ids, **(result or {})))
        except JobCanceled:
            self._emit(protocol.Canceled(**ids))
        except EngineError as exc:
            self._emit(protocol.Failed(**ids, error=exc.code, message=exc.message, retryable=exc.code in RETRYABLE_CODES))
        except Exception as exc:  # a bug or a driver fault: report it, keep the thread alive
            log.exception("job %s failed", request.job_id)
            self._emit(
                protocol.Failed(**ids, error="engine_error", message=f"{type(exc).__name__}: {exc}", retryable=True)
            )
        finally:
            with self._lock:
                self._cancel_flags.pop(request.job_id, None)
