"""Scale-out end to end: three real ``python -m engine worker`` processes on the tiny model,
a real redis-server, and the bot's ``Dispatcher`` in this process.

The processes start once for the module (a start costs ~10 s of imports and model loading).
Tests run in file order and the last one kills a worker, so keep it last. Dispatcher policy,
dead-letter and fairness are covered with in-process workers in test_redis_layer.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from engine.scaleout.dispatcher import Dispatcher
from bot.results import ResultLimits, accept_completed
from engine.contract import protocol
from engine.contract.config import load_config
from engine.scaleout.redis_keys import RedisKeys, make_client
from tests.conftest import write_config
from tests.engine.scaleout.test_redis_layer import Recorder
from tests.redis_fixture import redis_server  # noqa: F401  (module fixture)

pytestmark = [pytest.mark.redis, pytest.mark.timeout(400)]

WORKERS = ("w1", "w2", "w3")
# Long enough to act on mid-job (cancel, kill), short enough for the suite's budget.
LONG = {"steps": 30, "width": 64, "height": 64}
READY_TIMEOUT_S = 180


class WorkerProcs:
    """The worker processes; their stderr is collected for failure messages."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, list[str]] = {}

    def start(self, name: str, url: str, config_path: Path) -> None:
        # One thread each: three workers share two cores, and oversubscribed OpenMP threads
        # spin-wait each other to a crawl.
        env = dict(os.environ, HF_HUB_OFFLINE="1", ARCAE_REDIS_PASSWORD="", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine", "worker", "--redis", url, "--config", str(config_path),
             "--name", name, "--capacity", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        self.procs[name], self.logs[name] = proc, []
        threading.Thread(target=self._drain, args=(proc.stderr, self.logs[name]), daemon=True).start()

    @staticmethod
    def _drain(stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip())

    def wait_ready(self) -> None:
        for name, proc in self.procs.items():
            result: list[str] = []
            reader = threading.Thread(target=lambda p=proc: result.append(p.stdout.readline()), daemon=True)
            reader.start()
            reader.join(READY_TIMEOUT_S)
            assert result and result[0].startswith("ARCAE_WORKER_READY"), (
                f"worker {name} did not start:\n" + "\n".join(self.logs[name][-30:]))

    def tail(self, name: str) -> str:
        return "\n".join(self.logs[name][-20:])

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def scaleout(tmp_path_factory, tiny_model_dir, redis_server):  # noqa: F811
    from engine.benchmarks.lora_synth import make_lora
    from engine.generation.tiny import build_tiny_components

    tmp = tmp_path_factory.mktemp("scaleout")
    config_path = write_config(tmp, tiny_model_dir)
    text = config_path.read_text().replace(
        "[engine]\n", "[engine]\nlease_ttl_s = 5.0\nmax_attempts = 3\nrate_outputs = false\n", 1)
    config_path.write_text(text)
    adapters = tmp / "adapters"
    adapters.mkdir()
    make_lora(build_tiny_components(0)["unet"], adapters / "style-a.safetensors", seed=1)
    # The bot's own config: another outputs dir, as if the workers were on other hosts.
    bot_config = tmp / "bot" / "config.toml"
    bot_config.parent.mkdir()
    bot_config.write_text(text.replace('outputs_dir = "data/outputs"', 'outputs_dir = "bot-outputs"'))
    procs = WorkerProcs()
    for name in WORKERS:
        procs.start(name, redis_server.url, config_path)
    try:
        procs.wait_ready()
        yield {"config_path": bot_config, "url": redis_server.url, "procs": procs,
               "worker_outputs": tmp / "data" / "outputs", "bot_outputs": tmp / "bot" / "bot-outputs"}
    finally:
        procs.stop_all()


@pytest.fixture
async def bot_side(scaleout):
    config = load_config(scaleout["config_path"])
    recorder = Recorder()
    dispatcher = Dispatcher(config, None, on_event=recorder, url=scaleout["url"], tick_s=0.05, affinity_wait_s=30.0)
    await dispatcher.start()
    yield dispatcher, recorder
    await dispatcher.close()


def job(job_id: str, owner: str = "alice", adapters: tuple[str, ...] = (), **params: Any) -> protocol.GenerateRequest:
    return protocol.GenerateRequest(job_id=job_id, owner=owner, params=protocol.GenerationParams(
        prompt="1girl, solo", seed=7, adapters=[protocol.AdapterWeight(name=a) for a in adapters], **params))


async def test_workers_advertise_and_jobs_spread_by_affinity(scaleout, bot_side):
    d, r = bot_side
    rows = await d.workers()
    assert [w.name for w in rows] == list(WORKERS)
    assert all(w.alive and w.device == "cpu" and w.model == "tiny-sdxl" and w.capacity == 1 for w in rows)
    assert [a.name for a in await d.list_adapters()] == ["style-a"]
    first = await d.submit(job("aff-1", adapters=("style-a",)))
    assert first.position == 0
    done = await r.wait_for("aff-1", (protocol.Completed, protocol.Failed), timeout=120)
    assert isinstance(done, protocol.Completed), done
    holder = r.of("aff-1", protocol.Started)[0].worker
    # The PNG came through Redis in the event, intact; the bot checks and stores it (as JobManager does).
    assert hashlib.sha256(base64.b64decode(done.images[0].data_b64)).hexdigest() == done.images[0].sha256
    config = load_config(scaleout["config_path"])
    stored = accept_completed(done, "aff-1", scaleout["bot_outputs"], ResultLimits.from_config(config))
    png = Path(stored.images[0].path)
    assert png.parent == scaleout["bot_outputs"] and hashlib.sha256(png.read_bytes()).hexdigest() == done.images[0].sha256
    # The worker that loaded style-a gets the next style-a job, although every worker is idle
    # and another would win the tie by name; a job without adapters goes to a worker that has
    # nothing loaded (cheapest there).
    await d.submit(job("aff-2", adapters=("style-a",)))
    await d.submit(job("plain", owner="bob"))
    for job_id in ("aff-2", "plain"):
        assert isinstance(await r.wait_for(job_id, (protocol.Completed, protocol.Failed), timeout=120), protocol.Completed)
    assert r.of("aff-2", protocol.Started)[0].worker == holder
    assert r.of("plain", protocol.Started)[0].worker != holder
    rows = {w.name: w for w in await d.workers()}
    assert rows[holder].loaded_adapters == ["style-a"]
    text = await d.workers_text()
    assert f"{holder} · cpu · 0/1 jobs · training · adapters: style-a" in text, text
    status = await d.status()
    assert status.queue_length == 0 and "style-a" in status.loaded_adapters and "3 worker" in status.worker
    # A variation of that image on workers that never saw it: the source travels too.
    (scaleout["worker_outputs"] / png.name).unlink()
    await d.submit(protocol.Img2ImgRequest(job_id="vary-1", owner="alice", mode="variation", source=png.name,
                                           params=protocol.GenerationParams(prompt="1girl, solo", steps=2)))
    varied = await r.wait_for("vary-1", (protocol.Completed, protocol.Failed), timeout=120)
    assert isinstance(varied, protocol.Completed), varied
    assert varied.images[0].data_b64
    # A user's picture (/imagine image:) lives only in the bot's outputs folder; it travels the same way.
    from PIL import Image

    Image.new("RGB", (96, 48), (200, 40, 40)).save(scaleout["bot_outputs"] / "upload-redis.png")
    await d.submit(protocol.Img2ImgRequest(job_id="pic-1", owner="alice", mode="image", source="upload-redis.png",
                                           strength=0.6, params=protocol.GenerationParams(prompt="1girl", steps=2)))
    drawn = await r.wait_for("pic-1", (protocol.Completed, protocol.Failed), timeout=120)
    assert isinstance(drawn, protocol.Completed), drawn
    assert (drawn.params.mode, drawn.params.strength) == ("image", 0.6)
    assert (drawn.images[0].width, drawn.images[0].height) == (88, 48)  # the picture's 2:1 at the default area


async def test_cancel_running_job_on_a_worker(scaleout, bot_side):
    d, r = bot_side
    await d.submit(job("cancel-me", **LONG))
    await r.wait_for("cancel-me", protocol.Progress, timeout=120)
    assert await d.cancel("cancel-me") is True
    ended = await r.wait_for("cancel-me", (protocol.Canceled, protocol.Completed), timeout=60)
    assert isinstance(ended, protocol.Canceled)
    assert not list(scaleout["worker_outputs"].glob("cancel-me*")), "a canceled job writes no file"


async def test_bot_restart_while_workers_keep_running(scaleout, bot_side):
    d, r = bot_side
    await d.submit(job("while-away", **LONG))
    await r.wait_for("while-away", protocol.Progress, timeout=120)
    await d.close()  # the bot is gone; the worker finishes and its events wait in Redis
    client = make_client(scaleout["url"], None, block_ms=100)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until the worker has published the result
        entries = await client.xrange(RedisKeys().events)
        if any('"completed"' in f["event"] and "while-away" in f["event"] for _i, f in entries):
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError("the worker did not finish while the bot was away")
    await client.aclose()
    assert not r.of("while-away", protocol.Completed)

    later = Recorder()
    d2 = Dispatcher(load_config(scaleout["config_path"]), None, on_event=later, url=scaleout["url"], tick_s=0.05)

    async def resubmit() -> None:  # the bot resubmits unfinished jobs from its database
        await d2.submit(job("while-away", **LONG))

    d2.on_connect = resubmit
    await d2.start()
    try:
        done = await later.wait_for("while-away", protocol.Completed, timeout=120)
        assert done.attempt == 1 and done.images[0].data_b64
        await asyncio.sleep(0.5)
        assert len(later.of("while-away", protocol.Started)) == 0, "the job was not run a second time"
    finally:
        await d2.close()


async def test_killed_worker_job_finishes_on_another_worker(scaleout, bot_side):
    d, r = bot_side
    procs: WorkerProcs = scaleout["procs"]
    await d.submit(job("survive-kill", **LONG))
    await r.wait_for("survive-kill", protocol.Progress, timeout=120)
    victim = r.of("survive-kill", protocol.Started)[0].worker
    procs.procs[victim].send_signal(signal.SIGKILL)
    procs.procs[victim].wait(timeout=10)
    done = await r.wait_for("survive-kill", (protocol.Completed, protocol.Failed), timeout=120)
    assert isinstance(done, protocol.Completed), done
    assert done.attempt == 2
    second = [e for e in r.of("survive-kill", protocol.Started) if e.attempt == 2]
    assert second and second[0].worker != victim
    assert done.images[0].data_b64
    # Anything the dead worker's attempt still had in flight is ignored.
    delivered = len(r.of("survive-kill"))
    client = make_client(scaleout["url"], None, block_ms=100)
    await client.xadd(RedisKeys().events, {"worker": victim, "event": protocol.encode(
        protocol.Progress(job_id="survive-kill", attempt=1, seq=999, step=1, total=40))})
    await d.submit(job("after-kill", steps=2))
    await r.wait_for("after-kill", protocol.Completed, timeout=60)
    await client.aclose()
    assert len(r.of("survive-kill")) == delivered
    rows = {w.name: w for w in await d.workers()}
    assert victim not in rows or not rows[victim].alive


async def test_sigterm_stops_a_worker_cleanly_and_unregisters_it(scaleout, bot_side):
    d, _r = bot_side
    procs: WorkerProcs = scaleout["procs"]
    name = next(n for n, p in procs.procs.items() if p.poll() is None)
    procs.procs[name].send_signal(signal.SIGTERM)
    assert procs.procs[name].wait(timeout=60) == 0, procs.tail(name)
    assert f"worker {name} stopped" in procs.tail(name)
    assert name not in {w.name for w in await d.workers() if w.alive}
