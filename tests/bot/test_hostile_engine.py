"""The bot (a real process, remote mode) pointed at a stranger on the engine's port."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

from engine.benchmarks.discord_double import DiscordDouble
from tests.conftest import PYTHON, REPO
from tests.engine.service.link_helpers import Squatter


async def test_the_bot_refuses_an_engine_that_cannot_prove_the_secret(tmp_path):
    double = DiscordDouble()
    await double.start()
    squatter = Squatter("hello_ok")  # the protocol-1 bot trusted any "hello_ok"
    await squatter.start()
    port = squatter.url.rsplit(":", 1)[1].split("/", 1)[0]
    secret = "remote-engine-secret-that-must-stay-home"
    try:
        (tmp_path / "config.toml").write_text(
            f'[discord]\napi_base = "{double.api_base}"\ngateway_url = "{double.gateway_url}"\n'
            f'[engine]\nmode = "remote"\nhost = "127.0.0.1"\nport = {port}\n[storage]\ndatabase = "db.sqlite3"\n',
            encoding="utf-8")
        env = {**os.environ, "ARCAE_DISCORD_TOKEN": double.token, "ARCAE_ENGINE_SECRET": secret}
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "bot", "--config", str(tmp_path / "config.toml"), cwd=REPO, env=env,
            stderr=subprocess.PIPE, stdout=subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await squatter.close()
        await double.close()
    text = err.decode()
    assert proc.returncode == 2, text[-2000:]
    assert "engine authentication failed: check ARCAE_ENGINE_SECRET on both sides" in text, text[-2000:]
    assert squatter.frames and all(secret not in frame for frame in squatter.frames)
    assert [json.loads(f)["type"] for f in squatter.frames] == ["hello"], "no proof and no job for a stranger"
