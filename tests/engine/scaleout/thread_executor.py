"""A plain ``JobExecutor`` for the scale-out tests: one thread runs small job functions, one at a time.

A job function ``run_job(request, ctx) -> dict`` returns the fields of ``Completed``; the same
code as the GPU worker's turns its progress, return and exceptions into protocol events, so the
Redis layer is tested against real events without a model.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from engine.contract import protocol
from engine.contract.errors import EngineError, JobCanceled
from engine.service.job_executor import RETRYABLE_CODES, EmitFn

log = logging.getLogger(__name__)


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
