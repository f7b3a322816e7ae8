"""Redis scale-out: a worker killed under a running job gives the user the restart notice once, then the result.

The real bot process (``[engine] mode = "redis"``) over the Discord double, a real redis-server and two
real ``python -m engine worker`` processes on the tiny model; the one running the job is killed with -9.
"""

from __future__ import annotations

import os
import re

import pytest

from engine.benchmarks.discord_double import DiscordDouble
from tests.bot.conftest import READY_LINE, Process, free_port, write_stack_config
from tests.redis_fixture import redis_server  # noqa: F401  (module fixture)

pytestmark = [pytest.mark.redis, pytest.mark.timeout(600)]

NOTICE = "Engine restarting"


def content(double, interaction) -> str:
    return (double.original(interaction) or {}).get("content") or ""


def has_result(double, interaction) -> bool:
    message = double.original(interaction) or {}
    return bool(message.get("attachments") and message.get("embeds"))


def redis_config(tmp_path, tiny_model_dir, double, url: str):
    path = write_stack_config(tmp_path, tiny_model_dir, double, free_port())
    text, n = re.subn(r'mode = "remote"\n', f'mode = "redis"\nredis_url = "{url}"\nlease_ttl_s = 3.0\n'
                      'max_attempts = 3\n', path.read_text(encoding="utf-8"))
    assert n == 1
    path.write_text(text, encoding="utf-8")
    return path


async def test_a_killed_worker_shows_the_restart_notice_once_then_the_result(tmp_path, tiny_model_dir,
                                                                              redis_server):  # noqa: F811
    double = DiscordDouble()
    await double.start()
    config = redis_config(tmp_path, tiny_model_dir, double, redis_server.url)
    env = {**os.environ, "ARCAE_DISCORD_TOKEN": double.token, "ARCAE_REDIS_PASSWORD": "", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    workers = {name: Process(["-m", "engine", "worker", "--redis", redis_server.url, "--config", str(config),
                              "--name", name, "--capacity", "1"], env, tmp_path / f"{name}.log") for name in ("w1", "w2")}
    bot = Process(["-m", "bot", "--config", str(config)], env, tmp_path / "bot.log")
    try:
        for worker in workers.values():
            await worker.start("ARCAE_WORKER_READY", timeout=180)
        await bot.start(READY_LINE)
        d = double
        inter = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl, patience", "steps": 60,
                                                                     "seed": 9})
        await d.wait_for(lambda: "Generating… step" in content(d, inter), timeout=90)
        runner = re.search(r"attempt 1 -> (w\d)", bot.log())
        assert runner, bot.log()[-3000:]
        victim = workers[runner.group(1)].proc
        victim.kill()
        await victim.wait()
        # Before: the message went from "Generating… step N/60" to "Queued" with no word of what happened.
        await d.wait_for(lambda: NOTICE in content(d, inter), timeout=30)
        assert "your job will resume" in content(d, inter)
        await d.wait_for(lambda: has_result(d, inter), timeout=180)
        notices = [c for c in d.calls_to("PATCH", "/messages/") if NOTICE in str(c.json)]
        assert len(notices) == 1, f"the notice was shown {len(notices)} times"
        assert not d.followups(inter), "no extra message per retry"
    finally:
        await bot.stop()
        for worker in workers.values():
            await worker.stop()
        await double.close()
