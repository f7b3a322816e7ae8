"""The GPU worker's post-processing pool: PNG files, hashes and ratings off the GPU thread.

After a pipeline call the worker thread only decodes; the call's ``PendingOutput``s go to this
pool (``Generator.finish``: PNG encode, atomic write with fsync, sha256, the rating as one batch,
base64) while the worker thread already runs the next job. Each job's ``Completed`` is emitted
from here once its files exist, so a job's events keep their order (its Progress events all
come before its pipeline call returned). At most ``max_pending`` calls wait here: a GPU faster
than the CPUs then waits instead of piling decoded images up in memory.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any, Callable, Sequence

from engine.contract import protocol

log = logging.getLogger(__name__)

POOL_THREADS = 2  # PNG encoding (zlib) and onnxruntime release the GIL: two overlap well
MAX_PENDING_CALLS = 4


class PostPool:
    """Finish deferred outputs on a small thread pool; report each job through callbacks."""

    def __init__(
        self,
        finish: Callable[[Sequence[Any]], list[Any]],
        *,
        on_done: Callable[[Any, Any], None],
        on_error: Callable[[Any, Exception], None],
        name: str = "gpu-post",
        threads: int = POOL_THREADS,
        max_pending: int = MAX_PENDING_CALLS,
    ) -> None:
        self._finish = finish
        self._on_done = on_done
        self._on_error = on_error
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._room = threading.BoundedSemaphore(max_pending)

    def submit(self, records: Sequence[Any], pending: Sequence[Any]) -> None:
        """Finish ``pending`` (one output per record, in order) in the pool; blocks while it is full."""
        self._room.acquire()
        try:
            self._pool.submit(self._run, list(records), list(pending))
        except RuntimeError:  # the pool was shut down (engine stopping): finish here instead
            self._run(list(records), list(pending))

    def _run(self, records: list[Any], pending: list[Any]) -> None:
        try:
            try:
                outputs = self._finish(pending)
            except Exception as exc:  # e.g. a full disk: every job of the call fails alone
                for record in records:
                    self._on_error(record, exc)
                return
            for record, output in zip(records, outputs):
                try:
                    self._on_done(record, output)
                except Exception:  # pragma: no cover - the callbacks report their own errors
                    log.exception("post-processing callback failed for %s", getattr(record, "job_id", record))
        finally:
            self._room.release()

    def shutdown(self) -> None:
        """Finish everything submitted (their Completed events go out), then stop the threads."""
        self._pool.shutdown(wait=True)


class PostProcessingMixin:
    """``GpuWorker``'s side of the pool: a job leaves "running" when its pipeline call returns,
    and its ``Completed`` goes out from the pool once its files are written."""

    # Set by GpuWorker; declared here so that this module needs no import of GpuWorker.
    _lock: Any
    _running: Any
    _batch: list[Any]
    _emit_job: Callable[..., Any]

    def _left_gpu(self) -> None:
        """The pipeline call returned: its jobs are not running any more (their files are
        being written); a status shows the next job as soon as it starts."""
        with self._lock:
            self._running, self._batch = None, []

    def _completed(self, record: Any, output: Any) -> None:
        """A job's files are written (on the post-processing pool): send its ``Completed``."""
        self._emit_job(
            record,
            protocol.Completed,
            images=list(output.images),
            params=output.params,
            timings=dict(output.timings),
            warnings=list(output.warnings),
        )
