"""The engine link under attack: a stranger on the engine's port, hostile hellos, a noisy child.

One real engine process (``EngineSupervisor``, tiny model) serves the module; the squatter is a
real websocket server in this process that does not know the secret; the noisy child is a real
process standing in for ``python -m engine serve``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from bot.engine_link import EngineLink, EngineRejected, EngineUnavailable
from bot.engine_child import READY_PREFIX, EngineSupervisor
from engine.contract import protocol as p
from engine.contract.config import load_config, parse_config
from tests.conftest import write_config
from tests.engine.service.link_helpers import Squatter, authenticated, handshake, raw_connect

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Secrets the bot holds that the engine child must never see (set while the child starts).
BOT_ONLY_ENV = {
    "ARCAE_DISCORD_TOKEN": "discord-token-b2",
    "ARCAE_REDIS_PASSWORD": "redis-password-b2",
    "SOME_OTHER_API_KEY": "other-secret-b2",
}
AUTH_FAILED = "engine authentication failed: check ARCAE_ENGINE_SECRET on both sides"


@pytest.fixture(scope="module")
def engine_config(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("hostile-link")
    (root / "adapters").mkdir()
    path = write_config(root, tiny_model_dir)
    text = path.read_text().replace('device = "cpu"\n', 'device = "cpu"\nrate_outputs = false\n', 1)
    path.write_text(text)
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(engine_config):
    config = load_config(engine_config)
    supervisor = EngineSupervisor(engine_config, config, grace_s=20, extra_env={"OMP_NUM_THREADS": "1"})
    with pytest.MonkeyPatch.context() as mp:
        for name, value in BOT_ONLY_ENV.items():
            mp.setenv(name, value)
        await supervisor.start()
    link = EngineLink(lambda: supervisor.url, supervisor.secret)
    await link.start()
    assert link.connected
    yield supervisor, link
    await link.close()
    await supervisor.close()


async def test_the_engine_child_gets_only_the_environment_it_needs(engine):
    supervisor, _ = engine
    raw = Path(f"/proc/{supervisor.pid}/environ").read_bytes()
    env = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
    assert env["ARCAE_ENGINE_SECRET"] == supervisor.secret
    assert env["PATH"] and env["OMP_NUM_THREADS"] == "1"
    for name, value in BOT_ONLY_ENV.items():
        assert name not in env and value not in raw.decode(), name


@pytest.mark.parametrize("answer", ["hello_ok", "challenge"])
async def test_a_stranger_on_the_engines_port_gets_neither_the_secret_nor_a_job(answer):
    squatter = Squatter(answer)
    await squatter.start()
    secret = "the-bots-engine-secret-" + answer
    link = EngineLink(squatter.url, secret, backoff_s=[0.1])
    try:
        with pytest.raises(EngineRejected) as info:
            await link.start()
        assert info.value.code == "unauthorized" and info.value.message == AUTH_FAILED
        assert not link.connected
        request = p.GenerateRequest(job_id="j1", owner="alice", params=p.GenerationParams(prompt="1girl"))
        with pytest.raises(EngineUnavailable):
            await link.submit(request)
    finally:
        await link.close()
        await squatter.close()
    assert squatter.frames, "the link did connect"
    assert all(secret not in frame for frame in squatter.frames), squatter.frames
    # Only the hello went out: no proof to a peer that did not prove itself, and no request.
    assert [json.loads(f)["type"] for f in squatter.frames] == ["hello"]


async def test_a_client_that_proves_the_secret_gets_in_and_a_wrong_proof_is_refused(engine):
    supervisor, _ = engine
    session, ws = await authenticated(supervisor.url, supervisor.secret)
    try:
        await ws.send_str(json.dumps({"type": "status", "rid": "s"}))
        assert json.loads((await ws.receive(timeout=10)).data)["type"] == "status"
    finally:
        await ws.close()
        await session.close()
    session, ws = await raw_connect(supervisor.url)
    try:
        reply = await handshake(ws, supervisor.secret, proof="ab" * 32)
        assert reply["type"] == "error" and reply["code"] == "unauthorized" and reply["message"] == AUTH_FAILED
        assert (await ws.receive(timeout=10)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    finally:
        await ws.close()
        await session.close()


async def test_a_link_with_another_secret_is_refused_with_a_clear_message(engine):
    supervisor, _ = engine
    link = EngineLink(supervisor.url, "not-the-secret")
    try:
        with pytest.raises(EngineRejected) as info:
            await link.start()
        assert info.value.code == "unauthorized" and info.value.message == AUTH_FAILED
    finally:
        await link.close()


async def test_a_deeply_nested_hello_costs_one_short_log_line(engine, caplog):
    supervisor, link = engine
    with caplog.at_level(logging.INFO, logger="arcae.engine"):
        for _ in range(3):  # three hostile connections
            session = aiohttp.ClientSession()
            try:
                ws = await session.ws_connect(supervisor.url)
                await ws.send_str("[" * 200_000)
                reply = await ws.receive(timeout=10)
                if reply.type == aiohttp.WSMsgType.TEXT:
                    assert json.loads(reply.data)["code"] in ("bad_request", "version_mismatch")
                await ws.close()
            finally:
                await session.close()
        assert (await link.status()).model == "tiny-sdxl", "the engine keeps serving"
        await asyncio.sleep(0.5)  # the engine's last log lines reach the forwarder
    lines = [r.getMessage() for r in caplog.records if r.name == "arcae.engine"]
    assert not any("Traceback" in line or "RecursionError" in line for line in lines), lines
    refused = [line for line in lines if "refused a connection" in line]
    assert len(refused) == 3 and all(len(line) < 300 for line in refused), lines


async def test_a_deeply_nested_request_after_the_handshake_gets_an_error(engine, caplog):
    supervisor, _ = engine
    with caplog.at_level(logging.INFO, logger="arcae.engine"):
        session, ws = await authenticated(supervisor.url, supervisor.secret)
        try:
            await ws.send_str('{"rid": "deep", "x": ' + "[" * 200_000)
            reply = json.loads((await ws.receive(timeout=10)).data)
            assert reply["type"] == "error" and reply["code"] == "bad_request"
            await ws.send_str(json.dumps({"type": "status", "rid": "s"}))
            assert json.loads((await ws.receive(timeout=10)).data)["type"] == "status"
        finally:
            await ws.close()
            await session.close()
        await asyncio.sleep(0.5)
    assert not any("Traceback" in r.getMessage() for r in caplog.records if r.name == "arcae.engine")


def _fake_engine(tmp_path: Path, script: str) -> Path:
    """A stand-in for ``python``: runs ``script`` (Python) whatever arguments it gets."""
    (tmp_path / "child.py").write_text(script)
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'child.py'}\n")
    fake.chmod(0o755)
    return fake


async def test_a_child_writing_a_200_kb_progress_line_keeps_being_served(tmp_path, caplog):
    marker = tmp_path / "still-working"
    script = f"""
import sys, time
sys.stderr.write("downloading " + "#" * 200_000 + "\\r50% ####\\r")  # a progress bar: no newline
sys.stderr.flush()
print("{READY_PREFIX} ws://127.0.0.1:1/ws", flush=True)
for i in range(3000):  # 300 KB more: blocks on a full pipe if nobody reads stderr any more
    sys.stderr.write(f"working {{i:05d}} " + "." * 90 + "\\n")
sys.stderr.write("still alive\\n")
sys.stderr.flush()
open({str(marker)!r}, "w").close()
time.sleep(30)
"""
    fake = _fake_engine(tmp_path, script)
    (tmp_path / "config.toml").write_text("", encoding="utf-8")
    supervisor = EngineSupervisor(tmp_path / "config.toml", parse_config({}), python=str(fake), grace_s=5)
    try:
        with caplog.at_level(logging.INFO, logger="arcae.engine"):
            assert await supervisor.start() == "ws://127.0.0.1:1/ws"
            deadline = time.monotonic() + 20
            while not marker.exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert marker.exists(), "the child blocked writing to stderr: the forwarder stopped reading"
            await asyncio.sleep(0.3)
    finally:
        await supervisor.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "arcae.engine"]
    assert "still alive" in lines and "50% ####" in lines
    assert all(len(line) <= 8192 for line in lines)


async def test_the_restart_backoff_resets_after_a_healthy_run(tmp_path, monkeypatch):
    from bot import engine_child

    monkeypatch.setattr(engine_child, "STABLE_RUN_S", 1.0)
    starts = tmp_path / "starts"
    script = f"""
import time
with open({str(starts)!r}, "a") as f:
    f.write(f"{{time.monotonic()}}\\n")
print("{READY_PREFIX} ws://127.0.0.1:1/ws", flush=True)
time.sleep(1.5)  # healthy for longer than STABLE_RUN_S, then crashes
raise SystemExit(1)
"""
    fake = _fake_engine(tmp_path, script)
    (tmp_path / "config.toml").write_text("", encoding="utf-8")
    config = parse_config({"engine": {"restart_backoff_s": [0.2, 30.0]}})
    supervisor = EngineSupervisor(tmp_path / "config.toml", config, python=str(fake), grace_s=5)
    try:
        await supervisor.start()
        deadline = time.monotonic() + 30
        while supervisor.restarts < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        # Without the reset the second restart would wait 30 s.
        assert supervisor.restarts >= 3
    finally:
        await supervisor.close()
