"""The real engine process on the tiny model, driven the way the bot drives it.

One engine process (started by ``EngineSupervisor``) serves the whole module; the kill -9 test
costs one restart and the last test stops it with SIGTERM. Tests run in file order and share
one event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from bot.engine_link import EngineLink
from bot.engine_child import EngineSupervisor
from engine.contract.transport import EngineRejected, EngineUnavailable
from engine.contract import protocol as p
from engine.contract.config import load_config
from tests.conftest import write_config
from tests.engine.service.link_helpers import authenticated

pytestmark = pytest.mark.asyncio(loop_scope="module")

LONG_STEPS = 40  # long enough to catch a job mid-run on the tiny model
QUEUE_LIMIT = 6


class Engine:
    """The running engine, its client and everything the client heard."""

    def __init__(self, supervisor: EngineSupervisor, outputs: Path) -> None:
        self.supervisor = supervisor
        self.outputs = outputs
        self.events: list = []
        self.changed = asyncio.Condition()
        self.connects = 0
        self.link = EngineLink(lambda: supervisor.url, supervisor.secret, self.on_event, self.on_connect)

    async def on_event(self, event) -> None:
        async with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    async def on_connect(self) -> None:
        async with self.changed:
            self.connects += 1
            self.changed.notify_all()

    async def wait(self, predicate, timeout: float = 30.0):
        """Wait until ``predicate()`` is truthy; return its value."""
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), timeout)
            return predicate()

    def of(self, job_id: str, kind: type | None = None, attempt: int | None = None) -> list:
        return [
            e for e in self.events
            if getattr(e, "job_id", None) == job_id
            and (kind is None or isinstance(e, kind))
            and (attempt is None or e.attempt == attempt)
        ]

    def terminal(self, job_id: str, attempt: int | None = None):
        found = [e for e in self.of(job_id, attempt=attempt) if isinstance(e, p.TERMINAL_EVENT_TYPES)]
        return found[-1] if found else None

    async def finished(self, job_id: str, attempt: int | None = None, timeout: float = 60.0):
        return await self.wait(lambda: self.terminal(job_id, attempt), timeout)

    async def submit(self, job_id: str, owner: str = "alice", steps: int = 2, attempt: int = 1, **params):
        request = p.GenerateRequest(
            job_id=job_id, owner=owner, attempt=attempt,
            params=p.GenerationParams(prompt=params.pop("prompt", "1girl, solo"), steps=steps, seed=1, **params),
        )
        return await self.link.submit(request)


@pytest.fixture(scope="module")
def engine_config(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("engine-process")
    (root / "adapters").mkdir()
    extra = f"""
[tagger]
model = "{_tiny_tagger(root).as_posix()}"
"""
    path = write_config(root, tiny_model_dir, extra)
    text = path.read_text().replace("port = 0\n", f"port = 0\nqueue_limit = {QUEUE_LIMIT}\n")
    text = text.replace('device = "cpu"\n', 'device = "cpu"\nrestart_backoff_s = [0.5]\n', 1)
    path.write_text(text)
    return path


def _tiny_tagger(root: Path) -> Path:
    from tests.training.tiny_tagger import make_tiny_tagger

    return make_tiny_tagger(root / "tagger")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(engine_config):
    config = load_config(engine_config)
    # One torch thread: on a 2-core machine shared with other test processes, two threads
    # thrash (measured: 6 tiny steps 1.1 s with one thread, 16-32 s with two under load).
    supervisor = EngineSupervisor(engine_config, config, grace_s=20, extra_env={"OMP_NUM_THREADS": "1"})
    await supervisor.start()
    eng = Engine(supervisor, config.path(config.storage.outputs_dir))
    await eng.link.start()
    assert eng.link.connected
    yield eng
    await eng.link.close()
    await supervisor.close()


async def test_a_job_completes_with_ordered_events_and_a_rated_png(engine):
    queued = await engine.submit("first", steps=3)
    assert queued.job_id == "first" and queued.position == 0 and queued.attempt == 1
    done = await engine.finished("first")
    assert isinstance(done, p.Completed), done
    image = Path(done.images[0].path)
    assert image.is_file() and image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert done.images[0].rating in ("general", "sensitive", "questionable", "explicit")
    assert done.params is not None and done.params.steps == 3
    kinds = [type(e).__name__ for e in engine.of("first")]
    assert kinds[0] == "Queued" and kinds[1] == "Started" and kinds[-1] == "Completed" and "Progress" in kinds
    seqs = [e.seq for e in engine.of("first")]
    assert seqs == sorted(set(seqs))
    previews = [e.preview_jpeg_b64 for e in engine.of("first", p.Progress) if e.preview_jpeg_b64]
    assert previews and base64.b64decode(previews[0])[:2] == b"\xff\xd8"  # a JPEG

    variation = p.Img2ImgRequest(
        job_id="first-var", owner="alice", mode="variation", source=image.name,
        params=p.GenerationParams(prompt="1girl, solo", steps=2),
    )
    await engine.link.submit(variation)
    done = await engine.finished("first-var")
    assert isinstance(done, p.Completed) and done.params.mode == "variation"
    assert Path(done.images[0].path).is_file() and done.params.source_image == image.name


async def test_status_and_adapters(engine):
    status = await engine.link.status()
    assert status.model == "tiny-sdxl" and status.device == "cpu"
    assert status.queue_length == 0 and status.running_job is None
    assert await engine.link.list_adapters() == []
    assert await engine.link.reload_adapters() == {"added": [], "removed": [], "changed": []}


async def test_two_owners_interleave_fairly(engine):
    # Owners new to this engine, so the order does not depend on who was served before.
    for i in range(4):
        await engine.submit(f"c{i}", owner="carol", steps=2)
    for i in range(2):
        await engine.submit(f"d{i}", owner="dave", steps=2)
    # A resubmitted job id is not queued twice.
    again = await engine.submit("c2", owner="carol", steps=2)
    assert again.job_id == "c2" and again.position > 0
    for job_id in ["c0", "c1", "c2", "c3", "d0", "d1"]:
        assert isinstance(await engine.finished(job_id), p.Completed)
    started = [e.job_id for e in engine.events if isinstance(e, p.Started) and e.job_id[0] in "cd"]
    assert started == ["c0", "d0", "c1", "d1", "c2", "c3"]


async def test_cancel_a_queued_and_a_running_job(engine):
    await engine.submit("long", steps=LONG_STEPS)
    await engine.wait(lambda: engine.of("long", p.Started))
    await engine.submit("waiting", owner="bob", steps=2)
    await engine.wait(lambda: any(e.step >= 2 for e in engine.of("long", p.Progress)))
    assert await engine.link.cancel("waiting") is True
    assert isinstance(await engine.finished("waiting"), p.Canceled)
    assert await engine.link.cancel("long") is True
    assert isinstance(await engine.finished("long"), p.Canceled)
    assert not engine.of("waiting", p.Started)
    assert max(e.step for e in engine.of("long", p.Progress)) < LONG_STEPS
    assert not list(engine.outputs.glob("long-*")) and not list(engine.outputs.glob("waiting-*"))
    assert await engine.link.cancel("long") is False  # nothing left to cancel
    assert await engine.link.cancel("never-existed") is False


async def test_full_queue_answers_queue_full(engine):
    await engine.submit("blocker", steps=LONG_STEPS)
    await engine.wait(lambda: engine.of("blocker", p.Started))
    for i in range(QUEUE_LIMIT):
        await engine.submit(f"fill{i}", owner=f"user{i}")
    with pytest.raises(EngineRejected) as info:
        await engine.submit("one-too-many")
    assert info.value.code == "queue_full" and f"queue full ({QUEUE_LIMIT} jobs)" in info.value.message
    for job_id in ["blocker"] + [f"fill{i}" for i in range(QUEUE_LIMIT)]:
        assert await engine.link.cancel(job_id)
    assert isinstance(await engine.finished("blocker"), p.Canceled)
    status = await engine.link.status()
    assert status.queue_length == 0


@pytest.mark.parametrize(
    "params, code, fragment",
    [
        ({"prompt": "x" * 5000}, "bad_request", "at most 2000"),
        ({"steps": 400}, "bad_request", "steps"),
        ({"width": 4096, "height": 4096}, "bad_request", "between 32 and 256"),
        ({"adapters": [p.AdapterWeight(name="no-such-lora")]}, "unknown_adapter", "no-such-lora"),
    ],
)
async def test_out_of_range_requests_get_typed_errors(engine, params, code, fragment):
    with pytest.raises(EngineRejected) as info:
        await engine.submit("bad", **params)
    assert info.value.code == code and fragment in info.value.message, info.value


async def test_missing_source_and_bad_training_options_are_refused(engine):
    missing = p.Img2ImgRequest(
        job_id="var-missing", owner="u", mode="upscale", source="nope-0.png", params=p.GenerationParams(prompt="x")
    )
    with pytest.raises(EngineRejected) as info:
        await engine.link.submit(missing)
    assert info.value.code == "not_found" and "nope-0.png" in info.value.message
    # Training runs are built on the GPU thread: bad options come back as a Failed event.
    await engine.link.submit(p.TrainRequest(job_id="t1", owner="admin", options={"dataset": "no/such/dir"}))
    failed = await engine.finished("t1")
    assert isinstance(failed, p.Failed) and failed.error == "bad_request" and "training" in failed.message, failed
    assert (await engine.link.status()).training_run is None


async def _raw_connect(engine, hello: dict):
    session = aiohttp.ClientSession()
    ws = await session.ws_connect(engine.supervisor.url)
    await ws.send_str(json.dumps(hello))
    return session, ws


async def test_adapter_reload_waits_for_the_running_job(engine):
    session, ws = await authenticated(engine.supervisor.url, engine.supervisor.secret)
    try:
        seen: list[dict] = []

        async def read_until(predicate) -> dict:
            while True:
                message = json.loads((await ws.receive(timeout=30)).data)
                seen.append(message)
                if predicate(message):
                    return message

        await engine.submit("under-reload", steps=12)
        await read_until(lambda m: m["type"] == "progress" and m["job_id"] == "under-reload")
        await ws.send_str(json.dumps({"type": "status", "rid": "st"}))
        status = await read_until(lambda m: m.get("rid") == "st")
        assert status["running_job"] == "under-reload"
        await ws.send_str(json.dumps({"type": "reload_adapters", "rid": "rl"}))
        ack = await read_until(lambda m: m.get("rid") == "rl")
        assert ack["type"] == "ack" and json.loads(ack["detail"]) == {"added": [], "removed": [], "changed": []}
        # The reload ran between jobs: the job's end reached the wire before the reload's answer.
        assert any(m["type"] == "completed" and m["job_id"] == "under-reload" for m in seen)
    finally:
        await ws.close()
        await session.close()


async def _ask(ws, text: str) -> dict:
    await ws.send_str(text)
    while True:
        reply = json.loads((await ws.receive(timeout=10)).data)
        if "rid" in reply and reply["rid"] is not None or reply["type"] == "error":
            return reply


async def test_hostile_messages_get_errors_and_the_connection_stays_usable(engine):
    session, ws = await authenticated(engine.supervisor.url, engine.supervisor.secret)
    try:
        generate = {"type": "generate", "job_id": "h1", "owner": "mallory", "rid": "x"}
        cases = [
            ("{garbage", "invalid"),
            (json.dumps({"type": "format_disk", "rid": "x"}), "format_disk"),
            (json.dumps({**generate, "params": {"prompt": ["not", "a", "string"]}}), "params.prompt"),
            (json.dumps({**generate, "params": {"prompt": "x", "count": 1000}}), "params.count"),
            (json.dumps({**generate, "params": {"prompt": "x", "adapters": [{"name": "../../etc/passwd"}]}}), "name"),
            (json.dumps({**generate, "job_id": "../../x", "params": {"prompt": "x"}}), "job_id"),
            (json.dumps({"type": "hello", "version": p.PROTOCOL_VERSION, "nonce": "ab" * 32, "rid": "x"}),
             "already authenticated"),
        ]
        for text, fragment in cases:
            reply = await _ask(ws, text)
            assert reply["type"] == "error" and reply["code"] == "bad_request", (text, reply)
            assert fragment in reply["message"], (text, reply)
        await ws.send_bytes(b"\x80\x03pickle")
        assert json.loads((await ws.receive(timeout=10)).data)["code"] == "bad_request"
        status = await _ask(ws, json.dumps({"type": "status", "rid": "s1"}))
        assert status["type"] == "status" and status["rid"] == "s1"
    finally:
        await ws.close()
        await session.close()
    await engine.submit("after-hostile")
    assert isinstance(await engine.finished("after-hostile"), p.Completed)


@pytest.mark.parametrize(
    "hello, code",
    [
        ({"type": "hello", "version": 1, "secret": "guessed"}, "version_mismatch"),  # a protocol-1 bot
        ({"type": "hello", "version": p.PROTOCOL_VERSION}, "bad_request"),  # no nonce
        ({"type": "hello", "version": 99, "nonce": "ab" * 32}, "version_mismatch"),
        ({"type": "status"}, "bad_request"),
    ],
)
async def test_handshake_refusals_close_the_connection(engine, hello, code):
    session, ws = await _raw_connect(engine, hello)
    try:
        msg = await ws.receive(timeout=10)
        reply = json.loads(msg.data)
        assert reply["type"] == "error" and reply["code"] == code
        assert engine.supervisor.secret not in msg.data
        assert (await ws.receive(timeout=10)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    finally:
        await ws.close()
        await session.close()


async def test_a_link_with_the_wrong_secret_is_rejected(engine):
    link = EngineLink(engine.supervisor.url, "not-the-secret")
    try:
        with pytest.raises(EngineRejected) as info:
            await link.start()
        assert info.value.code == "unauthorized" and not link.connected
    finally:
        await link.close()


async def test_serve_refuses_to_start_without_a_secret(engine_config, monkeypatch):
    from engine.cli import CliError
    from engine.cli import serve

    monkeypatch.delenv("ARCAE_ENGINE_SECRET", raising=False)
    args = argparse.Namespace(config=str(engine_config), host=None, port=0, insecure_no_secret=False)
    with pytest.raises(CliError, match="ARCAE_ENGINE_SECRET"):
        serve.run(args)


async def test_a_failed_start_says_why(engine_config, tmp_path):
    bad = tmp_path / "config.toml"
    text = engine_config.read_text()
    bad.write_text(text.replace("[model]\nsource = ", '[model]\nsource = "/nonexistent/model"\n# was: '))
    supervisor = EngineSupervisor(bad, load_config(bad))
    with pytest.raises(EngineUnavailable) as info:
        await supervisor.start()
    message = str(info.value)
    assert "exited during start-up (status 2)" in message and "/nonexistent/model" in message
    assert supervisor.secret not in message


async def test_kill_9_mid_job_then_restart_and_retry(engine):
    first_pid = engine.supervisor.pid
    connects = engine.connects
    await engine.submit("crash", steps=LONG_STEPS)
    await engine.wait(lambda: engine.of("crash", p.Progress))
    os.kill(first_pid, signal.SIGKILL)
    with pytest.raises(EngineUnavailable):
        for _ in range(50):  # the first call may go out before the link notices the dead socket
            await engine.link.status()
            await asyncio.sleep(0.1)
    t0 = time.monotonic()
    # The link may reconnect (same port) a moment before the supervisor has read the ready line.
    for _ in range(900):
        if engine.connects > connects and engine.supervisor.restarts == 1:
            break
        await asyncio.sleep(0.1)
    assert engine.connects > connects and engine.supervisor.restarts == 1
    assert engine.supervisor.pid not in (None, first_pid)
    print(f"restart to reconnect: {time.monotonic() - t0:.1f} s")
    # The bot resubmits the job that was running as attempt 2.
    queued = await engine.submit("crash", steps=3, attempt=2)
    assert queued.attempt == 2
    done = await engine.finished("crash", attempt=2)
    assert isinstance(done, p.Completed) and Path(done.images[0].path).is_file()


async def test_sigterm_interrupts_the_running_job_and_exits_0(engine):
    await engine.submit("at-shutdown", steps=LONG_STEPS)
    await engine.wait(lambda: engine.of("at-shutdown", p.Progress))
    t0 = time.monotonic()
    assert await engine.supervisor.close() == 0
    assert time.monotonic() - t0 < 15
    last = await engine.finished("at-shutdown", timeout=5)
    # Retryable, not "canceled": the bot runs it again when the engine is back.
    assert isinstance(last, p.Failed) and last.error == "engine_unavailable" and last.retryable
    assert not list(engine.outputs.glob("at-shutdown-*"))
