"""The real bot process, a real discord.py client, against the Discord double and the real engine.

One engine and one bot serve the whole module (tests run in file order and share one event
loop); the restart test restarts the bot only. Everything is asserted on what Discord would
show a user: callbacks, message edits, attachments, embeds, buttons.
"""

from __future__ import annotations

import io
import re
import time

import pytest
from PIL import Image

pytestmark = pytest.mark.asyncio(loop_scope="module")

EPHEMERAL = 64


def buttons(message: dict) -> list[str]:
    return [c["custom_id"] for row in message.get("components", []) for c in row.get("components", [])]


def job_id_of(message: dict) -> str:
    ids = {cid.split(":")[2] for cid in buttons(message) if cid.startswith("arcae:")}
    assert len(ids) == 1, buttons(message)
    return ids.pop()


def field(message: dict, name: str) -> str:
    embed = message["embeds"][0]
    return next(f["value"] for f in embed["fields"] if f["name"] == name)


def finished(double, interaction):
    """The interaction's message once it carries the result (an embed and the buttons)."""
    msg = double.original(interaction)
    if msg and msg.get("embeds") and any(c.startswith("arcae:reroll:") for c in buttons(msg)):
        return msg
    return None


def ephemeral_reply(interaction) -> dict | None:
    """The immediate ephemeral answer (callback type 4, flags 64), if any."""
    for cb in interaction.callbacks:
        if cb["type"] == 4 and cb["data"].get("flags", 0) & EPHEMERAL:
            return cb["data"]
    return None


def png_parameters(double, message: dict) -> str:
    data = double.attachments[int(message["attachments"][0]["id"])]
    return Image.open(io.BytesIO(data)).info.get("parameters", "")


async def test_imagine_end_to_end(stack):
    d = stack.double
    sent = time.monotonic()
    inter = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl, solo, smile", "seed": 7, "steps": 3})
    await d.wait_for(lambda: inter.callbacks, timeout=3)
    assert inter.callbacks[0]["type"] == 5, "the bot must defer first"
    assert time.monotonic() - sent < 3.0

    msg = await d.wait_for(lambda: finished(d, inter), timeout=30)
    job = job_id_of(msg)
    patches = [c for c in d.calls_to("PATCH", f"/webhooks/{d.app_id}/{inter.token}/messages/")]
    statuses = [c.json.get("content") or "" for c in patches if c.json and not c.files]
    assert any(job in s and ("Queued" in s or "Generating" in s) for s in statuses), statuses
    # The final message: the PNG with its parameters, and an embed with the job's parameters.
    assert len(msg["attachments"]) == 1 and msg["attachments"][0]["filename"].endswith(".png")
    params = png_parameters(d, msg)
    assert "1girl, solo, smile" in params and "Seed: 7" in params and "Steps: 3" in params
    assert field(msg, "Seed") == "7" and field(msg, "Steps") == "3" and job in field(msg, "Job")
    assert "nsfw" in field(msg, "Negative"), "a channel that is not age-restricted gets the safety negative"
    assert {f"arcae:{a}:{job}" for a in ("reroll", "var", "up", "share", "del")} <= set(buttons(msg))

    share = await d.click(d.alice, msg, f"arcae:share:{job}")
    post = await d.wait_for(lambda: d.channel_messages(d.gallery_channel), timeout=15)
    assert post[0]["attachments"] and post[0]["embeds"][0]["author"]["name"] == "alice"
    assert f"arcae:remix:{job}" in buttons(post[0])
    await d.wait_for(lambda: any("Shared" in (m.get("content") or "") for m in d.followups(share)), timeout=10)
    stack.first_result = msg
