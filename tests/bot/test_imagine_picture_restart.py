"""/imagine image: an acknowledged job survives a bot killed while it fetched the user's picture.

The real bot process over the Discord double (its CDN holds the download), the real engine, kill -9.
"""

from __future__ import annotations

import asyncio

from tests.bot.conftest import READY_LINE, running_stack
from tests.bot.test_bot_e2e import field, finished
from tests.bot.test_training_commands import invoke, png


async def test_a_bot_killed_while_fetching_pictures_still_answers_each_acknowledged_job(tmp_path, tiny_model_dir):
    async with running_stack(tmp_path, tiny_model_dir, extra="[intake]\nmin_side = 32\n") as s:
        d = s.double
        d.cdn_gate = asyncio.Event()  # the pictures' downloads hang, as large ones on a slow link do
        kept = await invoke(d, d.alice, "imagine", {"prompt": "1girl, solo", "seed": 5, "steps": 2},
                            files={"image": ("me.png", png((200, 60, 60), 8))})
        gone = png((60, 60, 200), 6)
        expired = await invoke(d, d.bob, "imagine", {"prompt": "1boy, solo", "seed": 6, "steps": 2},
                               files={"image": ("gone.png", gone)})
        await d.wait_for(lambda: kept.callbacks and expired.callbacks and len(d.cdn_fetches) == 2, timeout=30)
        assert [i.callbacks[0]["type"] for i in (kept, expired)] == [5, 5], "both were acknowledged ('thinking…')"
        s.bot.proc.kill()
        await s.bot.proc.wait()
        # Bob's attachment address has expired: the CDN answers 404.
        del d.attachments[next(aid for aid, data in d.attachments.items() if data == gone)]
        d.cdn_gate.set()
        await s.bot.start(READY_LINE)
        # Before: the jobs were stored only after the download, so both were lost and "thinking…" stayed forever.
        msg = await d.wait_for(lambda: finished(d, kept), timeout=90)
        assert field(msg, "Mode").startswith("image"), field(msg, "Mode")
        told = await d.wait_for(lambda: "❌" in ((d.original(expired) or {}).get("content") or "")
                                and d.original(expired)["content"], timeout=60)
        assert "could not be downloaded again" in told and "send it again" in told, told
