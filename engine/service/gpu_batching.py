"""Batching for the GPU worker: compatible queued txt2img jobs share one pipeline call.

When the worker takes the next job and it is a ``GenerateRequest``, it also takes queued jobs
that ``Generator.batch_key`` calls compatible (same size, steps, CFG, sampler, fast mode,
adapter mix and prompt length), in the scheduler's fair order, up to ``[engine]
max_batch_jobs`` images in all (the sum of the counts). An incompatible job keeps its turn:
no owner gets a second job into the batch past it (``FairScheduler.take_compatible``). The
benchmark (``python -m engine bench --only batching``) shows why: four images as one call take
clearly less time than four calls. ``max_batch_jobs = 1`` turns it off.

Each job of a batch still gets its own Started / Progress / Completed events, images, seeds,
PNG files and infotext; every image is what the job alone would produce.

Faults, chosen so that one job never costs the others their result:

* Cancel: the canceled job gets ``Canceled`` and writes no file. The shared call stops at its
  next step (a pipeline call cannot drop one row), and the remaining jobs run again at once as
  a new call with the same seeds, so they still complete with the same images; their progress
  restarts from step 1 (no second ``Started``).
* Failure (an error, NaN, out of memory): each job runs again alone, so only a job that fails
  by itself gets ``Failed``.
* Shutdown: every job of the batch gets the retryable ``Failed`` a single job gets.
"""

from __future__ import annotations

import logging
from typing import Any

from engine.contract import protocol
from engine.contract.config import ArcaeConfig
from engine.contract.errors import EngineError, JobCanceled
from engine.generation.params import random_seed
from engine.scheduler import FairScheduler
from engine.service.gpu_jobs import JobRecord
from engine.service.gpu_postprocess import PostPool

log = logging.getLogger(__name__)


class BatchingMixin:
    """``GpuWorker``'s batching half (see the module docstring); runs on the worker thread."""

    # Set by GpuWorker.__init__; declared here so that this module needs no import of GpuWorker.
    config: ArcaeConfig
    generator: Any
    scheduler: FairScheduler
    name: str
    _jobs: dict[str, JobRecord]
    _post: PostPool
    _left_gpu: Any

    def _take_batch_mates(self, record: JobRecord) -> list[JobRecord]:
        """Queued jobs that may share ``record``'s pipeline call, taken off the queue (lock held)."""
        request = record.request
        room = self.config.engine.max_batch_jobs - getattr(getattr(request, "params", None), "count", 1)
        if room <= 0 or not isinstance(request, protocol.GenerateRequest):
            return []
        if not hasattr(self.generator, "generate_batch"):
            return []
        key = self._batch_key(request)
        if key is None:
            return []

        def compatible(job: Any) -> bool:
            return isinstance(job.payload, protocol.GenerateRequest) and self._batch_key(job.payload) == key

        taken = self.scheduler.take_compatible(
            compatible, room, size=lambda job: job.payload.params.count, batch_owners=[request.owner]
        )
        return [self._jobs[job.job_id] for job in taken]

    def _batch_key(self, request: protocol.GenerateRequest) -> tuple | None:
        """The request's batch key, or None when it cannot be batched (it then runs alone)."""
        try:
            return self.generator.batch_key(request.params)
        except EngineError:  # e.g. an adapter removed since it was queued: it fails alone
            return None
        except Exception:  # runs in the worker loop's locked section: never let it end the thread
            log.exception("batch key of job %s failed; it runs alone", request.job_id)
            return None

    def _run_batch(self, batch: list[JobRecord]) -> None:
        """Run ``batch`` as one pipeline call; see the module docstring for cancel and failure."""
        for record in batch:
            _pin_seed(record)
            self._emit_job(record, protocol.Started, worker=self.name)
        pending = list(batch)
        while pending:
            try:
                outputs = self.generator.generate_batch(
                    [(r.job_id, r.request.params) for r in pending],
                    on_steps=[self._progress_callback(r) for r in pending],
                    should_cancel=lambda jobs=tuple(pending): any(r.cancel.is_set() for r in jobs),
                    deferred=True,
                )
            except JobCanceled:
                canceled = [r.cancel.is_set() for r in pending]
                if not any(canceled):  # pragma: no cover - the flag is only ever set, never cleared
                    canceled = [True] * len(pending)
                for record, flag in zip(pending, canceled):
                    if flag:
                        self._canceled_event(record)
                pending = [r for r, flag in zip(pending, canceled) if not flag]
                if pending:  # (each Canceled moved the worker's running job on to the first of these)
                    log.info("batch canceled in part; rerunning %s", ", ".join(r.job_id for r in pending))
                continue
            except Exception as exc:
                log.warning("a batched call of %d jobs failed (%s); running each alone", len(pending), exc)
                for record in pending:
                    self._run_job(record, started=True)
                return
            # Each job's Completed comes from the post-processing pool once its files exist.
            self._left_gpu()
            self._post.submit(pending, outputs)
            log.info("batch of %d jobs decoded: %s", len(pending), ", ".join(r.job_id for r in pending))
            return


def _pin_seed(record: JobRecord) -> None:
    """Give a job without a seed its random seed now, so that a rerun (after a partial cancel or
    a failed shared call) makes the same images instead of drawing new seeds."""
    params = record.request.params
    if params.seed is None:
        pinned = params.model_copy(update={"seed": random_seed(params.count)})
        record.request = record.request.model_copy(update={"params": pinned})
