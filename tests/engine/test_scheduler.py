"""FairScheduler: priorities, round-robin between owners, bounded queue, positions, cancel."""

from __future__ import annotations

import pytest

from engine.errors import QueueFull
from engine.scheduler import FairScheduler, ScheduledJob


def push(s: FairScheduler, job_id: str, owner: str, priority: str = "interactive") -> int:
    return s.push(ScheduledJob(job_id, owner, priority))


def drain(s: FairScheduler) -> list[str]:
    out = []
    while (job := s.pop()) is not None:
        out.append(job.job_id)
    return out


def test_one_owner_is_first_in_first_out():
    s = FairScheduler(10)
    for i in range(4):
        assert push(s, f"a{i}", "alice") == i
    assert drain(s) == ["a0", "a1", "a2", "a3"]


def test_a_late_owner_is_not_starved_by_a_busy_one():
    s = FairScheduler(20)
    for i in range(10):
        push(s, f"a{i}", "alice")
    assert push(s, "b0", "bob") == 1  # bob's one job runs second, not eleventh
    assert drain(s)[:3] == ["a0", "b0", "a1"]


def test_owners_take_turns_even_after_the_busy_owner_was_just_served():
    s = FairScheduler(20)
    for i in range(4):
        push(s, f"a{i}", "alice")
    assert s.pop().job_id == "a0"  # alice's first job is running when bob arrives
    push(s, "b0", "bob")
    push(s, "b1", "bob")
    assert drain(s) == ["b0", "a1", "b1", "a2", "a3"]


def test_three_owners_round_robin():
    s = FairScheduler(20)
    for owner in "abc":
        for i in range(3):
            push(s, f"{owner}{i}", owner)
    assert drain(s) == ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2"]


def test_interactive_runs_before_batch_whatever_the_owner():
    s = FairScheduler(20)
    push(s, "batch1", "alice", "batch")
    push(s, "batch2", "bob", "batch")
    push(s, "now", "alice", "interactive")
    assert s.position("now") == 0
    # Turns count across priorities: alice just had one, so bob's batch job goes first.
    assert s.position("batch2") == 1
    assert drain(s) == ["now", "batch2", "batch1"]


def test_positions_match_the_order_jobs_run_in():
    s = FairScheduler(20)
    for job_id, owner in [("a0", "a"), ("a1", "a"), ("a2", "a"), ("b0", "b"), ("c0", "c"), ("b1", "b")]:
        push(s, job_id, owner)
    predicted = {j.job_id: s.position(j.job_id) for j in s.order()}
    snapshot = [row["job_id"] for row in s.snapshot()]
    assert drain(s) == sorted(predicted, key=predicted.get) == snapshot


def test_full_queue_refuses_with_a_clear_message_and_recovers():
    s = FairScheduler(3)
    for i in range(3):
        push(s, f"j{i}", f"u{i}")
    with pytest.raises(QueueFull) as info:
        push(s, "j3", "u3")
    assert "queue full (3 jobs)" in info.value.message and "try again later" in info.value.message
    assert len(s) == 3 and "j3" not in s
    s.pop()
    assert push(s, "j3", "u3") == 2


def test_remove_a_queued_job():
    s = FairScheduler(10)
    for i in range(3):
        push(s, f"a{i}", "alice")
    push(s, "b0", "bob")
    removed = s.remove("a1")
    assert removed is not None and removed.job_id == "a1"
    assert s.remove("a1") is None and s.remove("nope") is None
    assert s.position("a1") is None
    assert drain(s) == ["a0", "b0", "a2"]


def test_removing_an_owners_last_job_forgets_the_owner():
    s = FairScheduler(10)
    push(s, "b0", "bob")
    s.remove("b0")
    assert s.pop() is None and len(s) == 0
    push(s, "a0", "alice")
    assert drain(s) == ["a0"]


def test_duplicate_job_id_and_bad_priority_are_refused():
    s = FairScheduler(10)
    push(s, "a0", "alice")
    with pytest.raises(ValueError, match="already queued"):
        push(s, "a0", "alice")
    with pytest.raises(ValueError, match="interactive, batch"):
        push(s, "x", "alice", "urgent")
