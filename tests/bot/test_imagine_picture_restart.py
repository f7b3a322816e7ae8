"""/imagine image: an acknowledged job survives a bot killed while it fetched the user's picture.

The real bot process over the Discord double (its CDN holds the download), the real engine, kill -9.
"""

from __future__ import annotations

import asyncio

from tests.bot.conftest import READY_LINE, running_stack
from tests.bot.test_bot_e2e import field, finished
from tests.bot.test_training_commands import invoke, png


async def test_a_bot_killed_while_fetching_the_picture_still_answers_the_acknowledged_job(tmp_path, tiny_model_dir):
    async with running_stack(tmp_path, tiny_model_dir, extra="[intake]\nmin_side = 32\n") as s:
        d = s.double
        d.cdn_gate = asyncio.Event()  # the picture's download hangs, as a large one on a slow link does
        inter = await invoke(d, d.alice, "imagine", {"prompt": "1girl, solo", "seed": 5, "steps": 2},
                             files={"image": ("me.png", png((200, 60, 60), 8))})
        await d.wait_for(lambda: inter.callbacks and d.cdn_fetches, timeout=30)
        assert inter.callbacks[0]["type"] == 5, "the user saw 'thinking…': the job was acknowledged"
        s.bot.proc.kill()
        await s.bot.proc.wait()
        d.cdn_gate.set()
        await s.bot.start(READY_LINE)
        # Before: the job was stored only after the download, so it was lost and "thinking…" stayed forever.
        msg = await d.wait_for(lambda: finished(d, inter), timeout=90)
        assert field(msg, "Mode").startswith("image"), field(msg, "Mode")
