"""FairScheduler: priorities, round-robin between owners, bounded queue, positions, cancel."""

from __future__ import annotations

import pytest

from engine.contract.errors import QueueFull
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


def test_order_and_positions_match_what_pop_runs_after_random_traffic():
    """order/position are computed without replaying pop; they must still predict pop exactly."""
    import copy
    import random

    rng = random.Random(15)
    for trial in range(60):
        s = FairScheduler(500)
        owners = [f"u{i}" for i in range(rng.randint(1, 7))]
        for step in range(rng.randint(1, 80)):
            roll = rng.random()
            if roll < 0.6 or not len(s):
                push(s, f"j{trial}-{step}", rng.choice(owners), rng.choice(["interactive", "batch"]))
            elif roll < 0.85:
                s.pop()
            else:
                s.remove(rng.choice(s.order()).job_id)
        predicted = [job.job_id for job in s.order()]
        assert [s.position(job_id) for job_id in predicted] == list(range(len(predicted)))
        assert drain(copy.deepcopy(s)) == predicted


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


# --------------------------------------------------------------------------------------------
# GpuWorker's loop: generation jobs first, training steps in between (real Generator, tiny
# model). The training run is a small step counter: the trainer plugs its run in the same way.


class CountingRun:
    """A training run that only counts its steps (the TrainingRun hook's contract)."""

    def __init__(self, job_id: str, total: int, log: list) -> None:
        self.job_id, self.attempt, self.total, self.log = job_id, 1, total, log
        self.done = False
        self.steps = 0
        self.result: dict = {}
        self.canceled_on: str | None = None

    def step(self):
        import time

        self.steps += 1
        self.log.append(("train", self.steps))
        time.sleep(0.01)
        if self.steps >= self.total:
            self.done = True
            self.result = {"steps": self.steps}
        return self.steps, self.total, 0.25

    def cancel(self) -> None:
        import threading

        self.canceled_on = threading.current_thread().name


@pytest.fixture(scope="module")
def worker_setup(tmp_path_factory, tiny_model_dir):
    from engine.contract.config import load_config
    from engine.generation.generator import Generator
    from engine.service.gpu_worker import GpuWorker
    from tests.conftest import write_config

    root = tmp_path_factory.mktemp("worker")
    config = load_config(write_config(root, tiny_model_dir, "[training]\nexclusive = false\n"))
    log: list = []
    events: list = []

    def emit(event) -> None:
        events.append(event)
        if type(event).__name__ == "Started":
            log.append(("started", event.job_id))

    import torch

    # One thread while this module runs: two thrash on a loaded 2-core machine (see
    # test_engine_process); the session's setting is restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    worker = GpuWorker(Generator.from_config(config), config, name="test-gpu")
    worker.start(emit)
    yield worker, log, events
    worker.stop()
    torch.set_num_threads(threads)


def _wait(predicate, timeout: float = 60.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError("timed out")


def _terminal(events, job_id):
    return [e for e in events if e.job_id == job_id and type(e).__name__ in ("Completed", "Failed", "Canceled")]


def _generate(job_id: str, owner: str):
    from engine.contract import protocol as p

    return p.GenerateRequest(job_id=job_id, owner=owner, params=p.GenerationParams(prompt="1girl", steps=2, seed=3))


def test_generation_jobs_preempt_a_training_run_between_steps(worker_setup):
    worker, log, events = worker_setup
    run = CountingRun("train-long", total=100_000, log=log)
    worker.start_training(run)
    with pytest.raises(Exception, match="still active"):
        worker.start_training(CountingRun("train-other", 5, log))
    _wait(lambda: run.steps >= 3)
    worker.submit(_generate("g1", "alice"))
    worker.submit(_generate("g2", "bob"))
    mark = len(log) - 1
    _wait(lambda: _terminal(events, "g2"))
    assert [type(e).__name__ for e in _terminal(events, "g1") + _terminal(events, "g2")] == ["Completed"] * 2
    window = log[mark : log.index(("started", "g2")) + 1]
    # At most the one step already running when the jobs arrived; none between the two jobs.
    assert sum(1 for entry in window if entry[0] == "train") <= 1, window
    steps_after_jobs = run.steps
    _wait(lambda: run.steps > steps_after_jobs)  # training resumes once the queue is empty
    assert worker.cancel("train-long")
    _wait(lambda: _terminal(events, "train-long"))
    assert type(_terminal(events, "train-long")[0]).__name__ == "Canceled"
    assert run.canceled_on == "test-gpu"  # cleanup runs on the GPU thread
    stopped_at = run.steps
    worker.submit(_generate("g3", "alice"))
    _wait(lambda: _terminal(events, "g3"))
    assert run.steps == stopped_at and worker.status().training_run is None


def test_a_training_run_reports_progress_and_completes(worker_setup):
    worker, log, events = worker_setup
    worker.start_training(CountingRun("train-short", total=3, log=log))
    _wait(lambda: _terminal(events, "train-short"))
    mine = [e for e in events if e.job_id == "train-short"]
    assert [type(e).__name__ for e in (mine[0], mine[-1])] == ["Started", "Completed"]
    assert mine[-1].result == {"steps": 3}
    progress = [e for e in mine if type(e).__name__ == "Progress"]
    assert progress and progress[-1].step == 3 and progress[-1].total == 3 and progress[-1].loss == 0.25
    assert [e.seq for e in mine] == sorted(e.seq for e in mine)


class BaseCheckingRun(CountingRun):
    """A training run that checks, at every step, that the base weights are exactly the originals."""

    def __init__(self, job_id: str, total: int, log: list, originals: list) -> None:
        super().__init__(job_id, total, log)
        self.originals = originals
        self.fused_steps = 0

    def step(self):
        import torch

        if any(not torch.equal(param, copy) for param, copy in self.originals):
            self.fused_steps += 1
        return super().step()


def test_training_between_fused_lora_jobs_sees_the_exact_base(worker_setup):
    """The default fused LoRA execution changes the base weights; a training step must never see that."""
    from engine.contract import protocol as p
    from tests.engine.generation.lora_factory import make_lora

    worker, log, events = worker_setup
    generator = worker.generator
    assert generator.registry.lora_execution == "fused"
    make_lora(generator.pipe, generator.registry.adapters_dir / "ink.safetensors", seed=5, strength=2.0)
    generator.registry.reload()
    # Parameters keep their identity when peft wraps a layer: the snapshot covers every base weight.
    originals = [(param, param.detach().clone()) for param in generator.pipe.unet.parameters()]
    run = BaseCheckingRun("train-fused", total=100_000, log=log, originals=originals)
    worker.start_training(run)
    params = p.GenerationParams(prompt="1girl", steps=2, seed=3, adapters=[p.AdapterWeight(name="ink", weight=1.0)])
    for i in range(3):
        _wait(lambda: run.steps >= 2 * (i + 1))
        worker.submit(p.GenerateRequest(job_id=f"fused-{i}", owner="alice", params=params))
        _wait(lambda: _terminal(events, f"fused-{i}"))
        assert type(_terminal(events, f"fused-{i}")[0]).__name__ == "Completed"
    steps = run.steps
    _wait(lambda: run.steps > steps + 1)
    assert worker.cancel("train-fused")
    _wait(lambda: _terminal(events, "train-fused"))
    assert run.fused_steps == 0, f"{run.fused_steps} training steps saw fused weights"
