"""The GPU worker's training slot: one steppable run (LoRA training, distillation, a drift measurement).

``TrainingSlotMixin`` is mixed into ``engine.service.gpu_worker.GpuWorker``, which holds the lock,
the job table, the scheduler loop and the event emitter. A run advances one step at a time between
generation jobs; before each step a fused LoRA mix is undone so training sees the exact base weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from engine.contract import protocol
from engine.contract.errors import EngineError, InvalidRequest, JobCanceled
from engine.generation.pipe_state import pipe_state
from engine.service.gpu_jobs import JobRecord, ShuttingDown, SteppableRun

PROGRESS_INTERVAL_S = 0.2  # at most ~5 progress events a second per job


class TrainingSlotMixin:
    """Accept, build and step the one active training run (state lives on the GpuWorker)."""

    def start_training(self, run: SteppableRun) -> None:
        """Make ``run`` the active training run; it advances between generation jobs."""
        with self._lock:
            if self._training is not None:
                raise InvalidRequest(f"training run {self._training.job_id} is still active; one at a time")
            record = JobRecord(run.job_id, run.attempt, run=run)
            self._jobs[run.job_id] = record
            self._training = record
            self._wake.notify()

    def _factory_for(self, request: Any) -> Callable[[Any], SteppableRun] | None:
        if isinstance(request, protocol.DriftRequest):
            return self.drift_factory
        if isinstance(request, protocol.DistillRequest):
            return self.distill_factory
        return self.train_factory

    def _submit_training(self, request: Any) -> protocol.Queued:
        """Accept a training run; it is built on the worker thread (it changes the pipeline).

        Options the factory refuses arrive as a ``Failed`` event (code bad_request).
        """
        if self._factory_for(request) is None:
            what = {protocol.DriftRequest: "drift measurements", protocol.DistillRequest: "distillation runs"}
            raise InvalidRequest(f"this engine does not accept {what.get(type(request), 'training runs')}")
        with self._lock:
            known = self._known_state(request)
            if known is not None:
                return known
            if self._stopping:
                raise ShuttingDown("the engine is shutting down; try again shortly")
            if self._training is not None:
                raise InvalidRequest(f"training run {self._training.job_id} is still active; one at a time")
            record = JobRecord(request.job_id, request.attempt, request)
            self._jobs[request.job_id] = record
            self._training = record
            event = self._emit_job(record, protocol.Queued, position=0)
            self._wake.notify()
            return event

    def _training_step(self, record: JobRecord) -> None:
        """Advance the training run by one step (building it first if it came as a request)."""
        try:
            if record.cancel.is_set():
                if record.run is not None:
                    record.run.cancel()
                raise JobCanceled("training canceled")
            # Training shares the base weights: a fused LoRA mix must be undone, bit-identical, first
            # (for any steppable run; the trainer's own adapter switch claims the same way).
            pipe = getattr(self.generator, "pipe", None)
            if pipe is not None:
                pipe_state(pipe).claim_for_training()
            if record.run is None:
                record.run = self._factory_for(record.request)(record.request)  # type: ignore[misc]
            if not record.started:
                record.started = True
                self._emit_job(record, protocol.Started, worker=self.name)
            self._report_training_step(record, record.run.step())
            if record.run.done:
                self._emit_job(record, protocol.Completed, result=dict(getattr(record.run, "result", None) or {}))
        except JobCanceled:
            self._canceled_event(record)
        except EngineError as exc:
            self._emit_job(record, protocol.Failed, error=exc.code, message=exc.message)
        except Exception as exc:  # (TrainingCanceled is a JobCanceled, handled above)
            if type(exc).__module__.startswith("training."):  # the trainer's own typed errors
                message = f"training run {record.job_id} failed: {str(exc)[:300]}"
                self._emit_job(record, protocol.Failed, error="engine_error", message=message)
            else:
                self._unexpected_failure(record, exc)

    def _report_training_step(self, record: JobRecord, info: Any) -> None:
        if not (isinstance(info, tuple) and len(info) == 3):
            return
        step, total, loss = info
        now = time.monotonic()
        if now - record.last_progress >= PROGRESS_INTERVAL_S or step >= total:
            record.last_progress = now
            loss = float(loss) if loss is not None else None
            self._emit_job(record, protocol.Progress, step=int(step), total=max(1, int(total)), loss=loss)
