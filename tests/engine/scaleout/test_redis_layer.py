"""Scale-out through a real redis-server: dispatcher policy, leases, retries, dead-letter.

Workers here are real ``RedisWorker``s on ``ThreadJobExecutor``s whose job function is a small
Python function (the production worker runs the same code with the Generator behind it; see
test_redis_scaleout.py for real worker processes on the tiny model). Each test uses its own
key prefix on one shared server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import Any

import pytest

from engine.scaleout.dispatcher import Dispatcher
from engine.contract import protocol
from engine.contract.config import parse_config
from tests.engine.scaleout.thread_executor import ThreadJobExecutor
from engine.scaleout.redis_keys import RedisKeys, make_client
from engine.scaleout.redis_worker import RedisWorker
from tests.redis_fixture import redis_server  # noqa: F401  (module fixture)

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]
_prefixes = itertools.count()


class Recorder:
    """The bot's side of the events: everything delivered, in order."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self._changed = asyncio.Event()

    async def __call__(self, event: Any) -> None:
        self.events.append(event)
        self._changed.set()

    def of(self, job_id: str, kind: type | tuple[type, ...] = object) -> list[Any]:
        return [e for e in self.events if e.job_id == job_id and isinstance(e, kind)]

    async def wait_for(self, job_id: str, kind: type | tuple[type, ...], timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            found = self.of(job_id, kind)
            if found:
                return found[-1]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {kind} for {job_id}; got {[(e.type, e.job_id) for e in self.events]}")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


def make_config(**engine: Any):
    return parse_config({"engine": {"lease_ttl_s": 3.0, "max_attempts": 3, **engine}})


def gen(job_id: str, owner: str = "u1", adapters: tuple[str, ...] = (), prompt: str = "0.05") -> protocol.GenerateRequest:
    """A job whose prompt is how long the test job function runs, in seconds."""
    return protocol.GenerateRequest(
        job_id=job_id, owner=owner,
        params=protocol.GenerationParams(prompt=prompt, adapters=[protocol.AdapterWeight(name=a) for a in adapters]),
    )


class FakeGpu:
    """State of one test worker: which adapters it holds and which jobs it ran."""

    def __init__(self, name: str, loaded: set[str], available: set[str], fail: bool = False) -> None:
        self.name, self.loaded, self.available, self.fail = name, set(loaded), set(available), fail
        self.ran: list[tuple[str, int]] = []

    def run_job(self, request: Any, ctx: Any) -> dict[str, Any]:
        self.ran.append((request.job_id, request.attempt))
        if self.fail:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if isinstance(request, protocol.TrainRequest):
            seconds = request.options.steps / 10  # the fake "trains" for steps/10 seconds
        else:
            self.loaded = {a.name for a in request.params.adapters}
            seconds = float(request.params.prompt)
        total = 10
        for step in range(1, total + 1):
            ctx.check_canceled()
            time.sleep(seconds / total)
            ctx.progress(step, total)
        return {"timings": {"total": seconds}}

    def executor(self) -> ThreadJobExecutor:
        return ThreadJobExecutor(
            self.run_job,
            describe=lambda: {"device": "cpu", "gpu": f"test-gpu-{self.name}", "loaded_adapters": sorted(self.loaded)},
            list_adapters=lambda: [protocol.AdapterInfo(name=a) for a in sorted(self.available)],
        )


class Cluster:
    """Redis-connected workers and one dispatcher under a fresh key prefix."""

    def __init__(self, url: str, config: Any) -> None:
        self.url, self.config = url, config
        self.keys = RedisKeys(prefix=f"t{next(_prefixes)}")
        self.recorder = Recorder()
        self.workers: dict[str, tuple[RedisWorker, asyncio.Task, Any]] = {}
        self.dispatcher: Dispatcher | None = None

    async def add_worker(self, gpu: FakeGpu, capacity: int = 1, training: bool = False) -> RedisWorker:
        client = make_client(self.url, None, block_ms=500)
        worker = RedisWorker(client, gpu.executor(), name=gpu.name, keys=self.keys, capacity=capacity,
                             lease_ttl_s=self.config.engine.lease_ttl_s, block_ms=500, accepts_training=training)
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 5)
        self.workers[gpu.name] = (worker, task, client)
        return worker

    async def stop_worker(self, name: str) -> None:
        worker, task, client = self.workers.pop(name)
        worker.stop()
        await task
        await client.aclose()

    def new_dispatcher(self, **kw: Any) -> Dispatcher:
        self.dispatcher = Dispatcher(self.config, None, on_event=self.recorder, url=self.url, keys=self.keys,
                                     tick_s=0.05, **kw)
        return self.dispatcher

    async def close(self) -> None:
        if self.dispatcher is not None:
            await self.dispatcher.close()
        for name in list(self.workers):
            await self.stop_worker(name)


@pytest.fixture
async def cluster(redis_server):  # noqa: F811
    c = Cluster(redis_server.url, make_config())
    yield c
    await c.close()


async def test_fair_order_between_users(cluster):
    gpu = FakeGpu("w1", set(), set())
    d = cluster.new_dispatcher()
    # Alice queues three jobs before Bob's two: Bob must not wait behind all of Alice's.
    for job_id, owner in [("a1", "alice"), ("a2", "alice"), ("a3", "alice"), ("b1", "bob"), ("b2", "bob")]:
        await d.submit(gen(job_id, owner))
    await cluster.add_worker(gpu)
    await d.start()
    await cluster.recorder.wait_for("a3", protocol.Completed)
    await cluster.recorder.wait_for("b2", protocol.Completed)
    assert [j for j, _ in gpu.ran] == ["a1", "b1", "a2", "b2", "a3"]
    started = [e.worker for e in cluster.recorder.events if isinstance(e, protocol.Started)]
    assert started == ["w1"] * 5


async def test_affinity_prefers_the_worker_holding_the_adapters(cluster):
    # "w-a" would win every tie by name; only affinity sends style-a jobs to "w-b".
    gpu_a = FakeGpu("w-a", set(), {"style-a", "char-b"})
    gpu_b = FakeGpu("w-b", {"style-a"}, {"style-a", "char-b"})
    await cluster.add_worker(gpu_a)
    await cluster.add_worker(gpu_b)
    d = cluster.new_dispatcher(affinity_wait_s=1.0)
    await d.start()
    r = cluster.recorder
    await d.submit(gen("j1", adapters=("style-a",), prompt="0.5"))
    await d.submit(gen("j2", adapters=("style-a",), prompt="0.05"))  # w-b busy, w-a idle: short wait
    assert (await r.wait_for("j1", protocol.Started)).worker == "w-b"
    assert (await r.wait_for("j2", protocol.Started)).worker == "w-b"
    await r.wait_for("j2", protocol.Completed)
    # j3 keeps w-b busy longer than the affinity wait: j4 then takes any idle worker.
    await d.submit(gen("j3", adapters=("style-a",), prompt="2.5"))
    await r.wait_for("j3", protocol.Started)
    await d.submit(gen("j4", adapters=("style-a",), prompt="0.05"))
    assert (await r.wait_for("j4", protocol.Started)).worker == "w-a"
    await r.wait_for("j4", protocol.Completed)
    assert not r.of("j3", protocol.Completed), "j4 should not have waited for the long job"
    # An adapter no worker has: an honest failure, not a job stuck forever.
    await d.submit(gen("j5", adapters=("nobody-has-this",)))
    failed = await r.wait_for("j5", protocol.Failed)
    assert failed.error == "unknown_adapter" and "nobody-has-this" in failed.message and "style-a" in failed.message
    rows = {w.name: w for w in await d.workers()}
    assert rows["w-b"].gpu == "test-gpu-w-b" and rows["w-b"].loaded_adapters == ["style-a"]
    assert rows["w-b"].assigned == ["j3"]


async def test_cancel_queued_and_running_jobs(cluster):
    gpu = FakeGpu("w1", set(), set())
    await cluster.add_worker(gpu)
    d = cluster.new_dispatcher()
    await d.start()
    r = cluster.recorder
    await d.submit(gen("long", prompt="5"))
    await d.submit(gen("waiting"))
    await r.wait_for("long", protocol.Progress)
    assert await d.cancel("waiting") is True
    await r.wait_for("waiting", protocol.Canceled, timeout=1)
    assert await d.cancel("long") is True
    t0 = time.monotonic()
    await r.wait_for("long", protocol.Canceled, timeout=3)
    assert time.monotonic() - t0 < 2.0
    assert not r.of("long", protocol.Completed)
    assert [j for j, _ in gpu.ran] == ["long"]  # the canceled queued job never ran
    assert await d.cancel("long") is False  # already over
    assert (await d.status()).running_job is None


async def test_failing_job_is_retried_then_dead_lettered(cluster):
    gpus = [FakeGpu("w1", set(), set(), fail=True), FakeGpu("w2", set(), set(), fail=True)]
    for g in gpus:
        await cluster.add_worker(g)
    d = cluster.new_dispatcher()
    await d.start()
    await d.submit(gen("doomed"))
    failed = await cluster.recorder.wait_for("doomed", protocol.Failed)
    assert failed.attempt == 3 and not failed.retryable
    assert "failed 3 times" in failed.message and "illegal memory access" in failed.message
    runs = sorted((a, g.name) for g in gpus for j, a in g.ran)
    assert [a for a, _ in runs] == [1, 2, 3]
    assert runs[0][1] != runs[1][1] != runs[2][1], "a retry goes to another worker when one is free"
    assert len(cluster.recorder.of("doomed", protocol.Failed)) == 1  # only the final, honest one
    [letter] = await d.dead_letters()
    assert letter["job_id"] == "doomed" and letter["attempts"] == "3"


async def test_stopped_worker_job_finishes_elsewhere_and_stale_events_are_ignored(cluster):
    gpu1, gpu2 = FakeGpu("w1", set(), set()), FakeGpu("w2", set(), set())
    await cluster.add_worker(gpu1)
    d = cluster.new_dispatcher()
    await d.start()
    r = cluster.recorder
    await d.submit(gen("moved", prompt="3"))
    await r.wait_for("moved", protocol.Progress)
    await cluster.add_worker(gpu2)
    await cluster.stop_worker("w1")  # leaves its job pending and unregisters
    done = await r.wait_for("moved", protocol.Completed)
    assert done.attempt == 2 and gpu2.ran == [("moved", 2)]
    delivered = len(r.events)
    # A late event of attempt 1 (a worker that was only cut off) and a duplicate of attempt 2.
    client = make_client(cluster.url, None, block_ms=100)
    for ev in (protocol.Completed(job_id="moved", attempt=1, seq=99), done):
        await client.xadd(cluster.keys.events, {"event": protocol.encode(ev), "worker": "w1"})
    await d.submit(gen("after"))
    await r.wait_for("after", protocol.Completed)
    await client.aclose()
    assert [e.type for e in r.events[delivered:] if e.job_id == "moved"] == []


async def test_dispatcher_restart_while_workers_keep_running(cluster):
    gpu = FakeGpu("w1", set(), set())
    await cluster.add_worker(gpu)
    d = cluster.new_dispatcher()
    await d.start()
    r = cluster.recorder
    await d.submit(gen("survivor", prompt="1.0"))
    await r.wait_for("survivor", protocol.Started)
    await d.close()  # the bot goes away; the worker finishes meanwhile
    await asyncio.sleep(1.5)
    assert not r.of("survivor", protocol.Completed)

    resubmitted: list[protocol.Queued] = []

    async def on_connect() -> None:  # what the bot does: resubmit a running job as attempt + 1
        again = gen("survivor", prompt="1.0").model_copy(update={"attempt": 2})
        resubmitted.append(await d2.submit(again))

    d2 = cluster.new_dispatcher()
    d2.on_connect = on_connect
    await d2.start()
    done = await r.wait_for("survivor", protocol.Completed)
    # Reported under the bot's attempt number, so the bot does not drop it as stale.
    assert done.attempt == 2 and resubmitted[0].attempt == 2
    assert gpu.ran == [("survivor", 1)], "the job ran once; the resubmit was idempotent"
    await asyncio.sleep(0.3)
    assert len(r.of("survivor", protocol.Completed)) == 1


async def test_training_runs_only_on_training_workers_and_survive_a_lost_worker(cluster):
    plain = FakeGpu("a-plain", set(), set())  # first by name: would win every tie
    trainers = [FakeGpu("t1", set(), set()), FakeGpu("t2", set(), set())]
    await cluster.add_worker(plain)
    for g in trainers:
        await cluster.add_worker(g, training=True)
    d = cluster.new_dispatcher()
    await d.start()
    r = cluster.recorder
    await d.submit(protocol.TrainRequest(job_id="lora-1", owner="admin", options={"steps": 30}))
    first = await r.wait_for("lora-1", protocol.Progress)
    assert first.attempt == 1
    holder = r.of("lora-1", protocol.Started)[0].worker
    assert holder in ("t1", "t2")
    await cluster.stop_worker(holder)
    done = await r.wait_for("lora-1", protocol.Completed, timeout=20)
    assert done.attempt == 2  # the trainer resumes from its checkpoint on attempt > 1
    assert r.of("lora-1", protocol.Started)[-1].worker not in (holder, "a-plain")
    assert plain.ran == []


def test_worker_refuses_unprotected_or_credentialed_redis_urls(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "config.toml"
    config.write_text("[engine]\ndevice = 'cpu'\n")
    env = {"PATH": "/usr/bin:/bin", "ARCAE_REDIS_PASSWORD": ""}

    def worker(url: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "engine", "worker", "--redis", url, "--config", str(config)],
                              capture_output=True, text=True, env=env, timeout=60)

    open_lan = worker("redis://192.168.1.20:6379/0")
    assert open_lan.returncode == 2
    assert "not on loopback and no password" in open_lan.stderr and "ARCAE_REDIS_PASSWORD" in open_lan.stderr
    in_url = worker("redis://arcae:hunter2-secret@192.168.1.20:6379/0")
    assert in_url.returncode == 2 and "ARCAE_REDIS_PASSWORD" in in_url.stderr
    assert "hunter2-secret" not in in_url.stderr + in_url.stdout


async def test_password_protected_redis(tmp_path):
    from pydantic import SecretStr

    from engine.contract.config import Secrets
    from engine.scaleout.redis_keys import check_redis_url
    from tests.redis_fixture import start_redis, stop_redis

    server = start_redis(tmp_path, password="s3cret-pw")
    try:
        config = make_config()
        d = Dispatcher(config, Secrets(redis_password=SecretStr("s3cret-pw")), on_event=Recorder(), url=server.url)
        await d.start()
        assert d.connected and (await d.status()).device == "no workers online"
        await d.close()
        wrong = Dispatcher(config, Secrets(redis_password=SecretStr("wrong")), on_event=Recorder(), url=server.url)
        await wrong.start()  # logs and retries in the background; the bot keeps running
        assert not wrong.connected
        await wrong.close()
    finally:
        stop_redis(server)
    assert check_redis_url("redis://10.0.0.2:6379/0", "pw", "X") == "redis://10.0.0.2:6379/0"


async def test_redis_losing_its_data_mid_job_loses_no_job(cluster):
    gpu = FakeGpu("w1", set(), set())
    await cluster.add_worker(gpu, capacity=2)
    d = cluster.new_dispatcher()
    await d.start()
    r = cluster.recorder
    await d.submit(gen("first", prompt="1.5"))
    await d.submit(gen("second", prompt="0.5"))
    await r.wait_for("first", protocol.Progress)
    client = make_client(cluster.url, None, block_ms=100)
    await client.flushall()  # a Redis restart without appendonly
    await client.aclose()
    for job_id in ("first", "second"):
        assert isinstance(await r.wait_for(job_id, (protocol.Completed, protocol.Failed), timeout=20), protocol.Completed)
    await d.submit(gen("third"))  # and the cluster still works afterwards
    assert (await r.wait_for("third", protocol.Completed, timeout=20)).attempt == 1


async def test_a_drift_measurement_is_refused_with_the_way_to_run_it(cluster):
    from engine.contract.transport import EngineRejected

    d = cluster.new_dispatcher()
    with pytest.raises(EngineRejected) as err:
        await d.submit(protocol.DriftRequest(job_id="drift-1", owner="admin"))
    assert "not through Redis scale-out" in err.value.message and "python -m training drift" in err.value.message
    assert len(d._queue) == 0


async def test_a_distillation_run_is_refused_with_the_way_to_run_it(cluster):
    from engine.contract.transport import EngineRejected

    d = cluster.new_dispatcher()
    request = protocol.DistillRequest(job_id="distill-1", owner="admin",
                                      options=protocol.DistillSettings(name="style-fast"))
    with pytest.raises(EngineRejected) as err:
        await d.submit(request)
    assert "not through Redis scale-out" in err.value.message and "python -m training distill-fast" in err.value.message
    assert len(d._queue) == 0
