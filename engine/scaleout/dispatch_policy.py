"""Which worker gets a job: adapter affinity, free slots, training capability.

Pure functions over a snapshot of the workers, so the policy is easy to read and to test.
The order between jobs (fairness between users, priorities) is ``engine.scheduler``'s; this
module only answers "where may this job run now".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.contract import protocol


@dataclass
class WorkerSlot:
    """The dispatcher's view of one live worker."""

    name: str
    capacity: int
    assigned: int
    accepts_training: bool
    loaded: frozenset[str] = frozenset()
    available: frozenset[str] = frozenset()
    jobs: list[str] = field(default_factory=list)
    training: bool = False  # a training run is on it (one at a time per worker)

    @property
    def free(self) -> int:
        return self.capacity - self.assigned


def needed_adapters(request: Any, lcm_adapter: str) -> frozenset[str]:
    """Adapters a request will make active (fast mode adds the LCM adapter)."""
    params = getattr(request, "params", None)
    if params is None:
        return frozenset()
    names = {a.name for a in params.adapters}
    if params.fast and lcm_adapter:
        names.add(lcm_adapter)
    return frozenset(names)


class NoWorkerCanRun(Exception):
    """No live worker has the adapters a job needs; the message names them."""


def choose_worker(
    request: Any,
    workers: list[WorkerSlot],
    *,
    waited_s: float,
    affinity_wait_s: float,
    lcm_adapter: str,
    avoid: str | None = None,
) -> WorkerSlot | None:
    """The worker to send ``request`` to now, or None to keep it queued a little longer.

    Prefers a worker with a free slot that already holds every adapter the job needs (no
    loading), then the least loaded. While ``waited_s < affinity_wait_s`` and a busy worker
    holds those adapters, the job waits for it; after that any worker with a free slot that
    has the adapter files will do. ``avoid`` (the worker an earlier attempt died on) is used
    only when no other worker is free. Raises ``NoWorkerCanRun`` when no live worker has
    the adapter files at all.
    """
    training = isinstance(request, protocol.TrainRequest)
    pool = [w for w in workers if w.accepts_training and not w.training] if training else list(workers)
    if not pool:
        return None
    needed = needed_adapters(request, lcm_adapter)
    able = [w for w in pool if needed <= w.available]
    if not able:
        missing = sorted(needed - frozenset().union(*(w.available for w in pool)))
        if missing:
            raise NoWorkerCanRun(
                "no worker has the adapter(s) " + ", ".join(missing)
                + "; known adapters: " + (", ".join(sorted(frozenset().union(*(w.available for w in pool)))) or "none")
            )
        # Each adapter is somewhere, but no single worker has them all.
        raise NoWorkerCanRun("no single worker has all of the adapters " + ", ".join(sorted(needed)))
    free = [w for w in able if w.free > 0]
    if len(free) > 1 and avoid is not None:
        free = [w for w in free if w.name != avoid] or free
    if not free:
        return None
    affine = [w for w in free if needed <= w.loaded]
    if affine:
        return min(affine, key=lambda w: (w.assigned, len(w.loaded - needed), w.name))
    if waited_s < affinity_wait_s and any(needed <= w.loaded for w in able):
        return None  # the worker that holds them is busy; worth a short wait
    return min(free, key=lambda w: (w.assigned, -len(needed & w.loaded), w.name))


def format_workers(rows: list[Any], queue_length: int, limit: int = 1024) -> str:
    """One line per worker (``engine.scaleout.dispatcher.WorkerStatus``) for the admin /status embed."""
    lines = [f"queue: {queue_length} waiting in the bot"]
    for w in rows:
        state = (w.gpu or w.device or "?") if w.alive else "gone (its jobs are being moved)"
        jobs = f"{len(w.assigned)}/{w.capacity} jobs" + (f" ({', '.join(w.assigned)})" if w.assigned else "")
        extra = (" · training" if w.accepts_training else "") + (
            f" · adapters: {', '.join(w.loaded_adapters)}" if w.loaded_adapters else "")
        lines.append(f"{w.name} · {state} · {jobs}{extra}")
    text = "\n".join(lines)
    return text if len(text) <= limit else text[: limit - 1] + "…"
