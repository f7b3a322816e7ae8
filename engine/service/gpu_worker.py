"""GpuWorker: the one thread that owns the Generator and the GPU.

Every GPU action goes through this thread, in the order the ``FairScheduler`` decides:
generation and img2img jobs, adapter reloads (always between jobs, never under a running
one) and training steps (one step at a time, between generation jobs, so a long training run
never blocks users for more than one step). Compatible queued txt2img jobs may share one
pipeline call (``engine.service.gpu_batching``, ``[engine] max_batch_jobs``).

The worker knows nothing about transports: requests come in through ``submit``/``cancel``
(from any thread), protocol events go out through the ``emit`` callback given to ``start``.
``emit`` is called from the worker's, the post-processing pool's (``gpu_postprocess``) and the
submitters' threads, while the worker's lock is held (so that each job's events leave in ``seq``
order): it must be thread-safe and must not
block (e.g. ``loop.call_soon_threadsafe``). The websocket server (``engine.service.server``) is one
transport; the Redis worker is another. ``GpuWorker`` offers the same methods as
``engine.service.job_executor.JobExecutor`` (start, submit, cancel, describe, list_adapters,
reload_adapters, stop).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.contract import limits, protocol
from engine.contract.config import ArcaeConfig
from engine.contract.errors import EngineError, InvalidRequest, JobCanceled, OutOfMemory
from engine.scheduler import FairScheduler, ScheduledJob
from engine.service.gpu_batching import BatchingMixin
from engine.service.gpu_postprocess import PostPool, PostProcessingMixin
from engine.service.gpu_training import PROGRESS_INTERVAL_S, TrainingSlotMixin
from engine.service.gpu_jobs import (
    JobRecord,
    ShuttingDown,
    SourceNotFound,
    SteppableRun,
    encode_preview,
    is_cuda_oom,
    record_queued,
    release_cuda_memory,
    vram_in_use,
)

log = logging.getLogger(__name__)

EmitFn = Callable[[Any], None]
PREVIEW_INTERVAL_S = 1.0  # at most one preview image a second
_FINISHED_MEMORY = 512  # terminal events kept so that a resubmitted finished job is not rerun


class GpuWorker(TrainingSlotMixin, BatchingMixin, PostProcessingMixin):
    """Owns the Generator on one thread; see the module docstring for the threading contract."""

    def __init__(
        self,
        generator: Any,
        config: ArcaeConfig,
        *,
        name: str = "gpu-worker",
        train_factory: Callable[[protocol.TrainRequest], SteppableRun] | None = None,
    ) -> None:
        self.generator = generator
        self.config = config
        self.name = name
        self.train_factory = train_factory
        # DriftRequest -> a steppable drift measurement (engine.service.drift_hook); runs in the training slot.
        self.drift_factory: Callable[[protocol.DriftRequest], SteppableRun] | None = None
        # DistillRequest -> a steppable distillation run (engine.service.distill_hook); same slot.
        self.distill_factory: Callable[[protocol.DistillRequest], SteppableRun] | None = None
        self.scheduler = FairScheduler(config.engine.queue_limit)
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._emit: EmitFn = lambda event: None
        self._jobs: dict[str, JobRecord] = {}
        self._running: JobRecord | None = None
        self._batch: list[JobRecord] = []  # every job of the running pipeline call
        self._training: JobRecord | None = None
        self._controls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._finished: OrderedDict[str, Any] = OrderedDict()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        # PNG files, hashes and ratings are made here while the worker thread runs the next job.
        self._post = PostPool(
            lambda pending: self.generator.finish(pending), on_done=self._completed,
            on_error=self._unexpected_failure, name=f"{name}-post",
        )

    # ------------------------------------------------------------------ public API (any thread)

    def start(self, emit: EmitFn) -> None:
        """Start the worker thread; ``emit`` receives every protocol event."""
        self._emit = emit
        self._thread.start()

    def submit(self, request: Any) -> protocol.Queued:
        """Validate and queue a job; return its ``Queued`` event (also emitted).

        Raises ``EngineError`` subclasses (``InvalidRequest``, ``UnknownAdapter``, ``QueueFull``,
        ``SourceNotFound``, ``ShuttingDown``). Idempotent: a job id the worker already holds is
        not queued twice; the answer describes the job as it is (position 0 when running).
        """
        if isinstance(request, (protocol.TrainRequest, protocol.DriftRequest, protocol.DistillRequest)):
            return self._submit_training(request)
        if not isinstance(request, (protocol.GenerateRequest, protocol.Img2ImgRequest)):
            raise InvalidRequest(f"cannot queue a {type(request).__name__}; send generate, img2img or train")
        known = self._known_state(request)
        if known is not None:
            return known
        self._validate(request)
        with self._lock:
            known = self._known_state(request)
            if known is not None:
                return known
            if self._stopping:
                raise ShuttingDown("the engine is shutting down; try again shortly")
            job = ScheduledJob(request.job_id, request.owner, request.priority, payload=request)
            position = self.scheduler.push(job)  # QueueFull propagates
            record = JobRecord(request.job_id, request.attempt, request)
            record.position = position
            self._jobs[request.job_id] = record
            self._finished.pop(request.job_id, None)
            event = self._emit_job(record, protocol.Queued, position=position)
            self._wake.notify()
            return event

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job (removed at once) or the running one (stops at its next step)."""
        with self._lock:
            record = self._jobs.get(job_id)
            if record is None:
                return False
            if self.scheduler.remove(job_id) is not None:
                self._emit_job(record, protocol.Canceled)
                self._announce_positions()
                return True
            record.cancel.set()
            self._wake.notify()
            return True

    def call_between_jobs(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the worker thread before the next job; return a Future of its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._stopping:
                future.set_exception(ShuttingDown("the engine is shutting down"))
                return future
            self._controls.append((fn, future))
            self._wake.notify()
        return future

    def reload_adapters(self) -> dict[str, Any]:
        """Rescan the adapters directory between jobs (blocks until done)."""
        return self.reload_adapters_later().result()

    def reload_adapters_later(self) -> concurrent.futures.Future:
        return self.call_between_jobs(self._reload_now)

    def list_adapters(self) -> list[protocol.AdapterInfo]:
        # The registry's list()/get() are thread-safe and never wait for a reload in progress
        # (callers include the server's event loop).
        return list(self.generator.registry.list())

    def describe(self) -> dict[str, Any]:
        """The generator's description plus the queue: a plain dict for status displays."""
        try:
            info = dict(self.generator.describe())
        except Exception:  # status must answer even if describe breaks
            log.exception("describe() failed")
            info = {}
        with self._lock:
            info["queue_length"] = len(self.scheduler)
            info["queue"] = self.scheduler.snapshot()
            info["running_job"] = self._running.job_id if self._running else None
            info["training_run"] = self._training.job_id if self._training else None
        info.setdefault("worker", self.name)
        info.update(vram_in_use())
        return info

    def status(self) -> protocol.EngineStatus:
        info = self.describe()
        return protocol.EngineStatus(
            model=str(info.get("model") or info.get("name") or "unknown"),
            device=str(info.get("device") or "unknown"),
            dtype=str(info.get("dtype") or ""),
            vram_used_mb=info.get("vram_used_mb"),
            vram_total_mb=info.get("vram_total_mb"),
            queue_length=info["queue_length"],
            running_job=info["running_job"],
            loaded_adapters=[str(a) for a in info.get("loaded_adapters") or []],
            worker=self.name,
            training_run=info["training_run"],
            rates_outputs=info.get("rates_outputs"),
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop: accept nothing, interrupt the running job at its next step, end the thread.

        Queued jobs are dropped without events (the bot keeps them and resubmits them); the
        interrupted job gets a retryable ``Failed`` so the bot can run it again.
        """
        with self._lock:
            self._stopping = True
            for record in self._batch or ([self._running] if self._running is not None else []):
                record.shutdown = True
                record.cancel.set()
            while self._controls:
                _, future = self._controls.popleft()
                future.set_exception(ShuttingDown("the engine is shutting down"))
            self._wake.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._post.shutdown()  # jobs past their pipeline call still get their Completed

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------------ submit helpers

    def _known_state(self, request: Any) -> protocol.Queued | None:
        """The answer for a job id the worker already holds or recently finished, else None."""
        with self._lock:
            record = self._jobs.get(request.job_id)
            if record is not None:
                position = self.scheduler.position(request.job_id)
                return record_queued(record, 0 if position is None else position, self._next_seq(record))
            finished = self._finished.get(request.job_id)
            if finished is None:
                return None
            rerun = isinstance(finished, protocol.Failed) and request.attempt > finished.attempt
            if rerun:
                return None
            # The bot may have missed the terminal event while disconnected: send it again.
            self._emit(finished)
            return protocol.Queued(job_id=finished.job_id, attempt=finished.attempt, seq=finished.seq, position=0)

    def _validate(self, request: Any) -> None:
        params = request.params
        for label, text in (("prompt", params.prompt), ("negative prompt", params.negative_prompt or "")):
            problem = limits.too_long(self.config.generation, text, label)
            if problem:
                raise InvalidRequest(problem)
        if isinstance(request, protocol.Img2ImgRequest):
            source = self.config.path(self.config.storage.outputs_dir) / request.source
            if not source.is_file() and request.mode == "image":
                # The bot stores a user's picture in its outputs folder; a remote engine must share it.
                raise SourceNotFound(f"the picture {request.source} did not reach the engine (a remote engine must "
                                     "share the bot's [storage] outputs_dir; Redis workers get it through Redis)")
            if not source.is_file():
                raise SourceNotFound(f"image {request.source} is not in the engine's outputs; generate it first")
            if request.mode != "image":
                # The full parameters are only known once the source's stored request is merged in
                # (on the worker thread); the adapter names can be checked now.
                for adapter in params.adapters:
                    self.generator.registry.get(adapter.name)
                return
        self.generator.resolve(params)  # reads the registry through its thread-safe get()

    # ------------------------------------------------------------------ events

    def _next_seq(self, record: JobRecord) -> int:
        seq = record.seq
        record.seq += 1
        return seq

    def _emit_job(self, record: JobRecord, cls: type, **fields: Any) -> Any:
        """Build and emit one event of ``record`` with the next seq (under the lock: in order)."""
        with self._lock:
            event = cls(job_id=record.job_id, attempt=record.attempt, seq=self._next_seq(record), **fields)
            if isinstance(event, protocol.TERMINAL_EVENT_TYPES):
                # Forget the job before anyone hears it ended: a cancel or resubmit that reacts
                # to this event must find the job finished, not running.
                self._forget(record, event)
            try:
                self._emit(event)
            except Exception:  # a broken listener must not kill the GPU thread
                log.exception("event listener failed on %s", type(event).__name__)
            return event

    def _forget(self, record: JobRecord, event: Any) -> None:
        """Drop a finished job; remember its terminal event so a resubmit does not rerun it."""
        self._jobs.pop(record.job_id, None)
        if self._training is record:
            self._training = None
        if self._running is record:
            # A status asked right after this event must not show the job as running; the
            # worker loop clears it only after the action returns.
            self._running = next((r for r in self._batch if r.job_id in self._jobs), None)
        if not record.shutdown:  # interrupted by a shutdown: the bot may run it again
            self._finished[record.job_id] = event
            while len(self._finished) > _FINISHED_MEMORY:
                self._finished.popitem(last=False)

    def _announce_positions(self) -> None:
        """Tell queued jobs whose position changed where they stand now."""
        with self._lock:
            for index, job in enumerate(self.scheduler.order()):
                record = self._jobs.get(job.job_id)
                if record is not None and record.position != index:
                    record.position = index
                    self._emit_job(record, protocol.Queued, position=index)

    # ------------------------------------------------------------------ the worker thread

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._controls and not len(self.scheduler) and self._training is None:
                    self._wake.wait()
                if self._stopping:
                    return
                if self._controls:
                    action: Callable[[], None] = self._control_action(*self._controls.popleft())
                elif self._training is not None and (self.config.training.exclusive or not len(self.scheduler)):
                    record = self._training
                    action = lambda: self._training_step(record)  # noqa: E731
                else:
                    record = self._jobs[self.scheduler.pop().job_id]
                    batch = [record] + self._take_batch_mates(record)
                    self._running, self._batch = record, batch
                    self._announce_positions()
                    action = (lambda: self._run_job(record)) if len(batch) == 1 else (lambda: self._run_batch(batch))
            try:
                action()
            except Exception:  # pragma: no cover - every action reports its own errors
                log.exception("worker action failed")
            finally:
                with self._lock:
                    self._running, self._batch = None, []

    @staticmethod
    def _control_action(fn: Callable[[], Any], future: concurrent.futures.Future) -> Callable[[], None]:
        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)

        return run

    def _reload_now(self) -> dict[str, Any]:
        return self.generator.registry.reload()

    def _run_job(self, record: JobRecord, *, started: bool = False) -> None:
        request = record.request
        if not started:
            self._emit_job(record, protocol.Started, worker=self.name)
        started = time.monotonic()
        try:
            pending = self._generate(record, request)
            log.info("job %s decoded in %.2f s; its files are written meanwhile", record.job_id, time.monotonic() - started)
            self._left_gpu()
            self._post.submit([record], pending)
        except JobCanceled:
            self._canceled_event(record)
        except EngineError as exc:
            if isinstance(exc, OutOfMemory):
                release_cuda_memory()
            self._emit_job(record, protocol.Failed, error=exc.code, message=exc.message)
        except Exception as exc:
            self._unexpected_failure(record, exc)

    def _generate(self, record: JobRecord, request: Any) -> Any:
        """Run the job's pipeline call; its decoded, unwritten outputs (``PendingOutput`` list)."""
        on_step = self._progress_callback(record)
        should_cancel = record.cancel.is_set
        if isinstance(request, protocol.GenerateRequest):
            return self.generator.generate(
                request.params, job_id=record.job_id, on_step=on_step, should_cancel=should_cancel, deferred=True
            )
        source = self.config.path(self.config.storage.outputs_dir) / request.source
        return self.generator.img2img(
            Path(source),
            request.mode,
            request.params,
            job_id=record.job_id,
            strength=request.strength,
            on_step=on_step,
            should_cancel=should_cancel,
            deferred=True,
        )

    def _canceled_event(self, record: JobRecord) -> Any:
        if record.shutdown:
            return self._emit_job(
                record,
                protocol.Failed,
                error="engine_unavailable",
                message="the engine shut down during this job; it can be run again",
                retryable=True,
            )
        return self._emit_job(record, protocol.Canceled)

    def _unexpected_failure(self, record: JobRecord, exc: Exception) -> Any:
        if is_cuda_oom(exc):
            release_cuda_memory()
            return self._emit_job(
                record,
                protocol.Failed,
                error="out_of_memory",
                message="the GPU ran out of memory for this job; try a smaller size or fewer images",
            )
        log.error("job %s failed", record.job_id, exc_info=exc)
        return self._emit_job(
            record,
            protocol.Failed,
            error="engine_error",
            message=f"job {record.job_id} failed inside the engine ({type(exc).__name__}); details are in the engine log",
            retryable=True,
        )

    def _progress_callback(self, record: JobRecord) -> Callable[[int, int, Any], None]:
        previews = self.config.engine.previews

        def progress_due(step: int, total: int, now: float) -> bool:
            return step >= total or now - record.last_progress >= PROGRESS_INTERVAL_S

        def on_step(step: int, total: int, image: Any = None) -> None:
            now = time.monotonic()
            if not progress_due(step, total, now):
                return
            record.last_progress = now
            preview = None
            if previews and image is not None and now - record.last_preview >= PREVIEW_INTERVAL_S:
                record.last_preview = now
                preview = encode_preview(image)
            self._emit_job(
                record, protocol.Progress, step=max(0, int(step)), total=max(1, int(total)), preview_jpeg_b64=preview
            )

        def wants_preview(step: int, total: int) -> bool:
            # Asked by the Generator before it builds a preview: one a second, not one a step.
            now = time.monotonic()
            return previews and progress_due(step, total, now) and now - record.last_preview >= PREVIEW_INTERVAL_S

        on_step.wants_preview = wants_preview  # type: ignore[attr-defined]
        return on_step
