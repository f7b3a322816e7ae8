"""FairScheduler: the one place that orders the engine's generation work.

Rules, in order:

1. Priority: every ``interactive`` job runs before any ``batch`` job.
2. Within a priority, round-robin between owners: the next job comes from the owner who was
   served least recently (an owner never served goes first, ties by arrival). A user with ten
   queued jobs therefore gets every other turn at most when someone else is waiting, and a
   user who arrives later is not stuck behind all of them.
3. Within one owner, first in, first out.
4. Bounded: ``push`` beyond ``limit`` raises ``errors.QueueFull`` instead of growing.

Pure Python and NOT thread-safe: the owner (``engine.service.gpu_worker.GpuWorker``) guards every call
with its own lock, so that a submit, the worker's pop and a cancel never interleave.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from engine.contract.errors import QueueFull

PRIORITIES = ("interactive", "batch")
# Owners remembered for fairness after their queue emptied; older ones are forgotten (they
# then count as never served, which only ever favours them).
_MAX_REMEMBERED_OWNERS = 4096


@dataclass(eq=False)
class ScheduledJob:
    """A queued unit of work; ``payload`` is whatever the worker needs to run it."""

    job_id: str
    owner: str
    priority: str = "interactive"
    payload: Any = None
    arrival: int = field(default=0, compare=False)


class FairScheduler:
    """A bounded, priority-then-round-robin job queue (see the module docstring)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        # priority -> owner -> that owner's jobs in arrival order
        self._queues: dict[str, dict[str, deque[ScheduledJob]]] = {p: {} for p in PRIORITIES}
        self._by_id: dict[str, ScheduledJob] = {}
        self._last_served: OrderedDict[str, int] = OrderedDict()
        self._ticks = itertools.count(1)
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._by_id

    def push(self, job: ScheduledJob) -> int:
        """Queue ``job``; return its position (0 = runs next). Raises ``QueueFull``, ``ValueError``."""
        if job.priority not in self._queues:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}")
        if job.job_id in self._by_id:
            raise ValueError(f"job {job.job_id} is already queued")
        if len(self._by_id) >= self.limit:
            raise QueueFull(f"queue full ({len(self._by_id)} jobs); try again later")
        job.arrival = next(self._arrivals)
        self._queues[job.priority].setdefault(job.owner, deque()).append(job)
        self._by_id[job.job_id] = job
        return self.position(job.job_id)  # type: ignore[return-value]

    def pop(self) -> ScheduledJob | None:
        """Take the job that runs next, or None when the queue is empty."""
        job = self._peek(self._queues, self._last_served)
        if job is None:
            return None
        self._take(self._queues, job)
        del self._by_id[job.job_id]
        self._mark_served(job.owner)
        return job

    def _mark_served(self, owner: str) -> None:
        self._last_served[owner] = next(self._ticks)
        self._last_served.move_to_end(owner)
        while len(self._last_served) > _MAX_REMEMBERED_OWNERS:
            self._last_served.popitem(last=False)

    def take_compatible(
        self,
        predicate: Callable[[ScheduledJob], bool],
        limit: int,
        size: Callable[[ScheduledJob], int] = lambda job: 1,
        *,
        batch_owners: Iterable[str] = (),
    ) -> list[ScheduledJob]:
        """Take the next jobs that ``predicate`` accepts, in run order, while their sizes fit ``limit``.

        Used to batch compatible jobs into one pipeline call with a job just popped (whose owner
        goes in ``batch_owners``). A batch holds at most one job per owner: a user who queued
        many jobs gets one turn per call like everyone else, so someone who asks later is not
        made to wait behind a batch of another user's jobs (one user wanting several images
        asks for ``count``). Jobs that do not fit are skipped and keep their turn; past a skipped
        job, a job is only taken if its owner had no job skipped (each owner's jobs stay first
        in, first out) and its priority is not lower. Every taken job counts as served, in
        order, exactly as if ``pop`` had returned it.
        """
        taken: list[ScheduledJob] = []
        in_batch = set(batch_owners)
        skipped_owners: set[str] = set()
        lowest_rank = len(PRIORITIES)  # rank of the most urgent skipped job's priority
        for job in self._simulate():
            if limit <= 0:
                break
            rank = PRIORITIES.index(job.priority)
            behind_skip = bool(skipped_owners) and rank > lowest_rank
            blocked = job.owner in in_batch or job.owner in skipped_owners or behind_skip
            cost = size(job)
            if blocked or cost > limit or not predicate(job):
                skipped_owners.add(job.owner)
                lowest_rank = min(lowest_rank, rank)
                continue
            limit -= cost
            taken.append(job)
            in_batch.add(job.owner)
        for job in taken:
            self._take(self._queues, job)
            del self._by_id[job.job_id]
            self._mark_served(job.owner)
        return taken

    def remove(self, job_id: str) -> ScheduledJob | None:
        """Remove a queued job (a cancel); return it, or None if it is not queued."""
        job = self._by_id.pop(job_id, None)
        if job is not None:
            self._take(self._queues, job)
        return job

    def get(self, job_id: str) -> ScheduledJob | None:
        return self._by_id.get(job_id)

    def order(self) -> list[ScheduledJob]:
        """All queued jobs in the order they would run if nothing else arrived."""
        return list(self._simulate())

    def position(self, job_id: str) -> int | None:
        """How many queued jobs run before ``job_id`` (0 = next); None if it is not queued.

        Counted from queue lengths in O(owners log owners), without listing the order: every
        job of a more urgent priority, then ``rank`` full rounds of its own priority, then the
        owners served before its owner in the round that reaches it.
        """
        job = self._by_id.get(job_id)
        if job is None:
            return None
        later: dict[str, tuple[int, int, int]] = {}
        before = 0
        for priority in PRIORITIES:
            owners = self._owner_order(priority, later)
            queues = self._queues[priority]
            if priority != job.priority:
                before += sum(len(q) for q in queues.values())
                for i, owner in enumerate(owners):
                    later[owner] = (1, len(queues[owner]) - 1, i)
                continue
            # An owner's queue is in arrival order (FIFO, removals keep it): bisect, not a scan.
            rank = bisect.bisect_left(queues[job.owner], job.arrival, key=lambda queued: queued.arrival)
            for owner in owners:
                if owner == job.owner:
                    before += rank
                    break
                before += min(len(queues[owner]), rank + 1)
            before += sum(min(len(queues[o]), rank) for o in owners[owners.index(job.owner) + 1:])
            return before
        return None  # pragma: no cover - every queued job has a known priority

    def snapshot(self) -> list[dict[str, Any]]:
        """Queued jobs in run order, as plain dicts for a status display."""
        return [
            {"job_id": j.job_id, "owner": j.owner, "priority": j.priority, "position": i}
            for i, j in enumerate(self._simulate())
        ]

    # ------------------------------------------------------------------ internals

    def _simulate(self) -> Iterator[ScheduledJob]:
        """Run order without replaying ``pop``: each priority is round-robin over a fixed owner order.

        Replaying ``pop`` costs O(owners) per job (O(N x owners) for the whole queue, which made
        filling a 1,000-job queue take seconds). Once an owner is served in the simulation its
        tick is newer than every real one, so after the first round the owners keep the first
        round's order: O(N + owners log owners) in all.
        """
        later: dict[str, tuple[int, int, int]] = {}
        for priority in PRIORITIES:
            owners = self._owner_order(priority, later)
            queues = [list(self._queues[priority][owner]) for owner in owners]
            active = list(range(len(owners)))
            rank = 0
            while active:
                for i in active:
                    yield queues[i][rank]
                rank += 1
                active = [i for i in active if len(queues[i]) > rank]
            for i, owner in enumerate(owners):
                later[owner] = (1, len(queues[i]) - 1, i)

    def _owner_order(self, priority: str, later: dict[str, tuple[int, int, int]]) -> list[str]:
        """Owners of ``priority`` in the order the first round serves them.

        ``later`` holds owners already served by the simulation of a more urgent priority: they
        sort after every owner not yet served, in the order of their last simulated turn.
        """
        owners = self._queues[priority]

        def key(owner: str) -> tuple[tuple[int, int, int], int]:
            served = later.get(owner) or (0, self._last_served.get(owner, 0), 0)
            return served, owners[owner][0].arrival

        return sorted(owners, key=key)

    @staticmethod
    def _peek(
        queues: dict[str, dict[str, deque[ScheduledJob]]], last_served: dict[str, int]
    ) -> ScheduledJob | None:
        for priority in PRIORITIES:
            owners = queues[priority]
            if owners:
                heads = (q[0] for q in owners.values())
                return min(heads, key=lambda j: (last_served.get(j.owner, 0), j.arrival))
        return None

    @staticmethod
    def _take(queues: dict[str, dict[str, deque[ScheduledJob]]], job: ScheduledJob) -> None:
        owners = queues[job.priority]
        q = owners[job.owner]
        q.remove(job)
        if not q:
            del owners[job.owner]
