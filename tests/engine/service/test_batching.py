"""Batching: compatible queued txt2img jobs share one pipeline call (in-process GpuWorker, tiny model).

The worker is held busy by a control action that waits on an event, so the queue is filled
deterministically before the worker looks at it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.contract import protocol as p
from engine.scheduler import FairScheduler, ScheduledJob
from tests.conftest import write_config


class Env:
    def __init__(self, worker, config) -> None:
        self.worker = worker
        self.config = config
        self.events: list = []
        self.on_event = None  # optional hook, called on the worker thread
        self.done = threading.Condition()

    def emit(self, event) -> None:
        with self.done:
            self.events.append(event)
            self.done.notify_all()
        if self.on_event is not None:
            self.on_event(event)

    def of(self, job_id: str, kind: type | None = None) -> list:
        return [e for e in self.events if e.job_id == job_id and (kind is None or isinstance(e, kind))]

    def wait_terminal(self, job_ids, timeout: float = 60.0) -> dict:
        def found():
            out = {}
            for job_id in job_ids:
                ends = [e for e in self.of(job_id) if isinstance(e, p.TERMINAL_EVENT_TYPES)]
                if ends:
                    out[job_id] = ends[-1]
            return out if len(out) == len(job_ids) else None

        with self.done:
            assert self.done.wait_for(found, timeout), f"timed out waiting for {job_ids}"
            return found()

    def hold(self) -> threading.Event:
        """Keep the worker busy until the returned event is set."""
        release, holding = threading.Event(), threading.Event()
        self.worker.call_between_jobs(lambda: (holding.set(), release.wait(30)))
        assert holding.wait(30)
        return release

    def set_max_batch(self, n: int) -> None:
        engine = self.config.engine.model_copy(update={"max_batch_jobs": n})
        self.worker.config = self.config.model_copy(update={"engine": engine})


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    from engine.contract.config import load_config
    from engine.generation.generator import Generator
    from engine.service.gpu_worker import GpuWorker

    config = load_config(write_config(tmp_path_factory.mktemp("batching"), tiny_model_dir))
    assert config.engine.max_batch_jobs == 4  # the default
    worker = GpuWorker(Generator.from_config(config), config, name="batch-gpu")
    env = Env(worker, config)
    worker.start(env.emit)
    yield env
    worker.stop()


@pytest.fixture
def unet_batches(env):
    batches: list[int] = []
    handle = env.worker.generator.pipe.unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    yield batches
    handle.remove()


def request(job_id: str, owner: str, seed: int, prompt: str = "1girl, solo", steps: int = 2, **params):
    return p.GenerateRequest(
        job_id=job_id, owner=owner, params=p.GenerationParams(prompt=prompt, seed=seed, steps=steps, **params)
    )


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def alone(env, req: p.GenerateRequest) -> np.ndarray:
    """The job's image when it runs by itself (the worker is idle; same thread rules apply)."""
    out = env.worker.generator.generate(req.params, job_id=f"{req.job_id}-alone")
    return pixels(out.images[0].path)


def test_compatible_jobs_share_one_call_and_an_incompatible_one_keeps_its_turn(env, unet_batches):
    from engine.generation.infotext import read_png_metadata

    jobs = [
        request("a", "alice", 100, "1girl, solo"),
        request("x", "bob", 5, width=64, height=96),  # other size: never merged
        request("b", "carol", 200, "1boy, smile"),
        request("c", "dave", 300, "cat, outdoors"),
    ]
    release = env.hold()
    for job in jobs:
        env.worker.submit(job)
    release.set()
    ends = env.wait_terminal(["a", "x", "b", "c"])
    assert all(isinstance(e, p.Completed) for e in ends.values()), ends
    # One call for a, b, c: 3 images x 2 (CFG) rows, once per step; then x alone.
    assert unet_batches == [6, 6, 2, 2]
    started = [e.job_id for e in env.events if isinstance(e, p.Started) and e.job_id in "axbc"]
    assert started == ["a", "b", "c", "x"]
    for job in jobs:
        done = ends[job.job_id]
        kinds = [type(e).__name__ for e in env.of(job.job_id)]
        assert kinds[0] == "Queued" and kinds.count("Started") == 1 and "Progress" in kinds and kinds[-1] == "Completed"
        image = done.images[0]
        assert image.seed == job.params.seed and Path(image.path).name == f"{job.job_id}-0.png"
        text, stored = read_png_metadata(image.path)
        assert stored["params"]["prompt"] == job.params.prompt and stored["params"]["seed"] == job.params.seed
        assert job.params.prompt in text and f"Seed: {job.params.seed}" in text
        assert done.timings.get("batch_jobs") == (None if job.job_id == "x" else 3.0)
    unet_batches.clear()
    for job in jobs:
        diff = np.abs(pixels(ends[job.job_id].images[0].path) - alone(env, job))
        assert diff.max() <= 1, (job.job_id, diff.max())  # batched matmuls may round by one level
    assert not np.array_equal(pixels(ends["a"].images[0].path), pixels(ends["b"].images[0].path))


def test_counts_add_up_to_the_image_limit(env, unet_batches):
    release = env.hold()
    env.worker.submit(request("n1", "erin", 7, count=2))
    env.worker.submit(request("n2", "frank", 8, count=2))
    env.worker.submit(request("n3", "gina", 9))  # would make 5 images: waits for the next call
    release.set()
    ends = env.wait_terminal(["n1", "n2", "n3"])
    assert [i.seed for i in ends["n1"].images] == [7, 8] and [i.seed for i in ends["n2"].images] == [8, 9]
    assert unet_batches == [8, 8, 2, 2]


def test_canceling_one_job_of_a_batch_leaves_the_others_completing(env, unet_batches):
    jobs = [request("k1", "hana", 11, steps=4), request("k2", "ivan", 12, steps=4), request("k3", "jun", 13, steps=4)]

    def cancel_k2_mid_run(event) -> None:
        if isinstance(event, p.Progress) and event.job_id == "k2" and event.step == 1:
            env.worker.cancel("k2")  # on the worker thread, under its lock (reentrant)

    env.on_event = cancel_k2_mid_run
    try:
        release = env.hold()
        for job in jobs:
            env.worker.submit(job)
        release.set()
        ends = env.wait_terminal(["k1", "k2", "k3"])
    finally:
        env.on_event = None
    assert isinstance(ends["k2"], p.Canceled) and not list(env.worker.generator.outputs_dir.glob("k2-*"))
    assert isinstance(ends["k1"], p.Completed) and isinstance(ends["k3"], p.Completed)
    # Canceled after step 1, the shared call stopped at the end of step 2; then k1 and k3 ran
    # again as one call of 2 images.
    assert unet_batches == [6, 6, 4, 4, 4, 4]
    for name in ("k1", "k3"):
        assert len(env.of(name, p.Started)) == 1
    unet_batches.clear()
    for job in (jobs[0], jobs[2]):
        diff = np.abs(pixels(ends[job.job_id].images[0].path) - alone(env, job))
        assert diff.max() <= 1


def test_a_job_without_a_seed_keeps_its_seed_when_the_batch_reruns(env, unet_batches):
    # A random seed is drawn once: the rerun after a partial cancel makes the picture whose
    # previews the user already saw, and the seed the result reports is the one that ran.
    jobs = [request(f"u{i}", f"user{i}", None, steps=4) for i in (1, 2, 3)]
    seeds_per_call: list[dict] = []
    real = env.worker.generator.generate_batch

    def spy(batch, **kwargs):
        seeds_per_call.append({job_id: params.seed for job_id, params in batch})
        return real(batch, **kwargs)

    def cancel_u2_mid_run(event) -> None:
        if isinstance(event, p.Progress) and event.job_id == "u2" and event.step == 1:
            env.worker.cancel("u2")

    env.worker.generator.generate_batch = spy
    env.on_event = cancel_u2_mid_run
    try:
        release = env.hold()
        for job in jobs:
            env.worker.submit(job)
        release.set()
        ends = env.wait_terminal(["u1", "u2", "u3"])
    finally:
        env.on_event = None
        del env.worker.generator.generate_batch
    assert isinstance(ends["u2"], p.Canceled)
    assert len(seeds_per_call) == 2 and set(seeds_per_call[1]) == {"u1", "u3"}
    for job_id in ("u1", "u3"):
        assert isinstance(ends[job_id], p.Completed)
        assert seeds_per_call[0][job_id] == seeds_per_call[1][job_id] == ends[job_id].images[0].seed
    unet_batches.clear()


def test_the_worker_asks_for_a_preview_only_when_it_would_send_one(env):
    from engine.service.gpu_jobs import JobRecord

    assert env.config.engine.previews
    on_step = env.worker._progress_callback(JobRecord("preview-ask", 1))
    assert on_step.wants_preview(1, 10)  # nothing sent yet
    on_step(1, 10, Image.new("RGB", (16, 16)))
    [sent] = env.of("preview-ask", p.Progress)
    assert sent.preview_jpeg_b64
    # Within PROGRESS_INTERVAL_S (and PREVIEW_INTERVAL_S) of that event, no preview would be sent.
    assert not on_step.wants_preview(2, 10) and not on_step.wants_preview(10, 10)


def test_listing_and_submitting_do_not_wait_for_an_adapter_reload(env):
    # The server calls list_adapters and submit on its event loop: a reload (hashing files,
    # loading LoRA weights) running on the worker thread must not stall them.
    entered, release = threading.Event(), threading.Event()
    registry = env.worker.generator.registry
    real_reload = registry.reload

    def slow_reload():
        entered.set()
        release.wait(30)
        return real_reload()

    registry.reload = slow_reload
    try:
        future = env.worker.reload_adapters_later()
        assert entered.wait(30)
        answers: list = []
        caller = threading.Thread(
            target=lambda: answers.append((env.worker.list_adapters(), env.worker.submit(request("rl1", "rita", 41)))),
            daemon=True,
        )
        caller.start()
        caller.join(10)
        assert answers and isinstance(answers[0][1], p.Queued), "list_adapters/submit waited for the reload"
        release.set()
        assert future.result(30) == {"added": [], "removed": [], "changed": []}
        assert isinstance(env.wait_terminal(["rl1"])["rl1"], p.Completed)
    finally:
        release.set()
        del registry.reload


def test_a_finished_job_is_no_longer_reported_running(env):
    # A status asked as soon as a job's end is heard (here: in the event callback itself) shows
    # the job as running no more. A job leaves "running" when its pipeline call returns (its
    # files are written off the GPU thread), so after a batch neither of its jobs is shown.
    running_at_end: dict = {}

    def record_status(event) -> None:
        if isinstance(event, p.TERMINAL_EVENT_TYPES):
            running_at_end[event.job_id] = env.worker.describe()["running_job"]

    env.on_event = record_status
    try:
        release = env.hold()
        env.worker.submit(request("st1", "sara", 51))
        env.worker.submit(request("st2", "tom", 52))
        release.set()
        env.wait_terminal(["st1", "st2"])
        env.worker.submit(request("st3", "sara", 53))
        env.wait_terminal(["st3"])
    finally:
        env.on_event = None
    assert running_at_end == {"st1": None, "st2": None, "st3": None}


def test_a_failing_batched_call_reruns_each_job_alone(env, unet_batches):
    def refuse_batches(module, args):
        if args[0].shape[0] > 2:
            raise RuntimeError("simulated failure of the batched call")

    handle = env.worker.generator.pipe.unet.register_forward_pre_hook(refuse_batches)
    try:
        release = env.hold()
        env.worker.submit(request("f1", "olga", 31))
        env.worker.submit(request("f2", "pete", 32))
        release.set()
        ends = env.wait_terminal(["f1", "f2"])
    finally:
        handle.remove()
    assert all(isinstance(e, p.Completed) for e in ends.values()), ends
    assert [i.seed for i in ends["f1"].images] == [31] and [i.seed for i in ends["f2"].images] == [32]
    assert len(env.of("f1", p.Started)) == 1 and len(env.of("f2", p.Started)) == 1
    assert unet_batches == [2, 2, 2, 2]  # the refused call never reached the forward hook


def test_max_batch_jobs_1_runs_every_job_alone(env, unet_batches):
    env.set_max_batch(1)
    try:
        release = env.hold()
        for i, owner in enumerate(["kim", "lee", "max"]):
            env.worker.submit(request(f"s{i}", owner, 20 + i))
        release.set()
        ends = env.wait_terminal(["s0", "s1", "s2"])
    finally:
        env.set_max_batch(4)
    assert all(isinstance(e, p.Completed) and "batch_jobs" not in e.timings for e in ends.values())
    assert unet_batches == [2] * 6


def _job(job_id: str, owner: str, kind: str = "ok", priority: str = "interactive") -> ScheduledJob:
    return ScheduledJob(job_id, owner, priority, payload=kind)


def test_take_compatible_never_gives_a_turn_away_from_a_skipped_job():
    s = FairScheduler(limit=20)
    for job in [_job("a1", "alice"), _job("a2", "alice"), _job("b1", "bob", "big"), _job("b2", "bob"),
                _job("c1", "carol"), _job("z1", "zed", priority="batch")]:
        s.push(job)
    head = s.pop()
    assert head.job_id == "a1"
    # Run order now: b1 c1 a2 b2 z1. b1 does not fit and keeps its turn: carol (new to the
    # batch) may join, but not alice's second job, bob's later job or a lower-priority job.
    taken = s.take_compatible(lambda j: j.payload == "ok", limit=3, batch_owners=[head.owner])
    assert [j.job_id for j in taken] == ["c1"]
    assert [j.job_id for j in s.order()] == ["b1", "a2", "b2", "z1"]  # bob runs next
    assert s.take_compatible(lambda j: True, limit=0) == []


def test_take_compatible_takes_one_job_per_owner():
    s = FairScheduler(limit=20)
    for job in [_job("a1", "alice"), _job("a2", "alice"), _job("a3", "alice"), _job("b1", "bob"),
                _job("z1", "zed", priority="batch")]:
        s.push(job)
    head = s.pop()
    taken = s.take_compatible(lambda j: True, limit=3, size=lambda j: 2 if j.job_id == "b1" else 1,
                              batch_owners=[head.owner])
    # Run order b1 a2 a3 z1: bob joins alice's batch; alice's later jobs wait for her next turn
    # (and z1, lower priority, may not pass them).
    assert [j.job_id for j in taken] == ["b1"]
    assert [j.job_id for j in s.order()] == ["a2", "a3", "z1"] and len(s) == 3
    s.push(_job("b2", "bob"))
    # Alice (served before bob's b1 in the batch) is the least recently served owner.
    assert [j.job_id for j in s.order()] == ["a2", "b2", "a3", "z1"]
