"""Where the scale-out dispatcher sends a job (pure policy, no Redis)."""

from __future__ import annotations

import pytest

from engine.scaleout.dispatch_policy import NoWorkerCanRun, WorkerSlot, choose_worker
from engine.contract import protocol

FILES = frozenset({"style-a", "char-b", "lcm"})


def slot(name: str, assigned: int = 0, loaded: set[str] = frozenset(), capacity: int = 1, **kw) -> WorkerSlot:
    return WorkerSlot(name=name, capacity=capacity, assigned=assigned, accepts_training=kw.pop("training_ok", False),
                      loaded=frozenset(loaded), available=kw.pop("available", FILES), **kw)


def gen(*adapters: str, fast: bool = False) -> protocol.GenerateRequest:
    return protocol.GenerateRequest(job_id="j", owner="u", params=protocol.GenerationParams(
        prompt="x", fast=fast, adapters=[protocol.AdapterWeight(name=a) for a in adapters]))


def choose(request, workers, waited_s=0.0, **kw):
    return choose_worker(request, workers, waited_s=waited_s, affinity_wait_s=2.0, lcm_adapter="lcm", **kw)


def test_prefers_a_free_worker_that_already_holds_the_adapters():
    workers = [slot("a"), slot("b", loaded={"style-a", "lcm"})]
    assert choose(gen("style-a", fast=True), workers).name == "b"  # fast mode needs the LCM adapter too
    assert choose(gen("style-a"), workers).name == "b"
    assert choose(gen(), workers).name == "a"  # nothing to reuse: the worker with least loaded


def test_waits_briefly_for_a_busy_affine_worker_then_takes_any():
    workers = [slot("a"), slot("b", assigned=1, loaded={"style-a"})]
    assert choose(gen("style-a"), workers, waited_s=0.5) is None
    assert choose(gen("style-a"), workers, waited_s=2.5).name == "a"


def test_capacity_two_leaves_a_slot_and_full_workers_get_nothing():
    assert choose(gen(), [slot("a", assigned=1, capacity=2)]).name == "a"
    assert choose(gen(), [slot("a", assigned=1), slot("b", assigned=1)]) is None


def test_missing_adapters_are_an_honest_error():
    with pytest.raises(NoWorkerCanRun, match="no worker has the adapter.*zzz.*known adapters: char-b, lcm, style-a"):
        choose(gen("zzz"), [slot("a")])
    split = [slot("a", available=frozenset({"style-a"})), slot("b", available=frozenset({"char-b"}))]
    with pytest.raises(NoWorkerCanRun, match="no single worker"):
        choose(gen("style-a", "char-b"), split)
    assert choose(gen("style-a"), []) is None  # no worker online yet: wait, don't fail


def test_training_only_on_training_workers_one_run_each():
    train = protocol.TrainRequest(job_id="t", owner="admin")
    assert choose(train, [slot("a"), slot("b", training_ok=True)]).name == "b"
    assert choose(train, [slot("a"), slot("b", training_ok=True, capacity=2, assigned=1, training=True)]) is None


def test_a_retry_avoids_the_worker_it_failed_on_when_another_is_free():
    workers = [slot("a"), slot("b")]
    assert choose(gen(), workers, avoid="a").name == "b"
    assert choose(gen(), [slot("a")], avoid="a").name == "a"
