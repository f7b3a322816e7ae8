"""A killed engine: the running job's message says the engine is restarting, then the result arrives.

The real bot process over the Discord double, and the real engine (remote mode) killed with -9.
"""

from __future__ import annotations

import os
import signal

from tests.bot.conftest import running_stack


def content(double, interaction) -> str:
    return (double.original(interaction) or {}).get("content") or ""


def has_result(double, interaction) -> bool:
    message = double.original(interaction) or {}
    return bool(message.get("attachments") and message.get("embeds"))


async def test_a_killed_engine_replaces_the_stale_progress_with_a_restart_notice(tmp_path, tiny_model_dir):
    async with running_stack(tmp_path, tiny_model_dir) as s:
        d = s.double
        inter = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl, patience", "steps": 60,
                                                                     "seed": 9})
        await d.wait_for(lambda: "Generating… step" in content(d, inter), timeout=60)
        os.kill(s.engine.proc.pid, signal.SIGKILL)
        await s.engine.proc.wait()
        # Before: "🎨 Generating… step 17/60" stayed until the engine was back (10-35 s).
        await d.wait_for(lambda: "Engine restarting" in content(d, inter), timeout=10)
        assert "your job will resume" in content(d, inter) and "Generating" not in content(d, inter)
        await s.engine.start("ARCAE_ENGINE_READY", timeout=120)
        await d.wait_for(lambda: has_result(d, inter), timeout=120)
