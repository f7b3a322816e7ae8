"""The real bot process, a real discord.py client, against the Discord double and the real engine.

One engine and one bot serve the whole module (tests run in file order and share one event
loop); the restart test restarts the bot only. Everything is asserted on what Discord would
show a user: callbacks, message edits, attachments, embeds, buttons.
"""

from __future__ import annotations

import asyncio
import io
import time

import pytest
from PIL import Image

from tests.bot.conftest import READY_LINE

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
    inter = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl, solo, smile", "seed": 7, "steps": 2})
    await d.wait_for(lambda: inter.callbacks, timeout=3)
    assert inter.callbacks[0]["type"] == 5, "the bot must defer first"
    assert time.monotonic() - sent < 3.0

    msg = await d.wait_for(lambda: finished(d, inter), timeout=30)
    job = job_id_of(msg)
    patches = [c for c in d.calls_to("PATCH", f"/webhooks/{d.app_id}/{inter.token}/messages/")]
    statuses = [c for c in patches if c.json and not c.files]
    assert any(job in (c.json.get("content") or "") and ("Queued" in c.json["content"] or "Generating" in
               c.json["content"]) for c in statuses), [c.json for c in statuses]
    gaps = [b.at - a.at for a, b in zip(statuses, statuses[1:])]
    assert all(g >= 0.9 for g in gaps), f"status edits faster than progress_edit_interval_s: {gaps}"
    # The final message: the PNG with its parameters, and an embed with the job's parameters.
    assert len(msg["attachments"]) == 1 and msg["attachments"][0]["filename"].endswith(".png")
    params = png_parameters(d, msg)
    assert "1girl, solo, smile" in params and "Seed: 7" in params and "Steps: 2" in params
    assert field(msg, "Seed") == "7" and field(msg, "Steps") == "2" and job in field(msg, "Job")
    assert "nsfw" in field(msg, "Negative"), "a channel that is not age-restricted gets the safety negative"
    assert {f"arcae:{a}:{job}" for a in ("reroll", "var", "up", "share", "del")} <= set(buttons(msg))

    share = await d.click(d.alice, msg, f"arcae:share:{job}")
    post = await d.wait_for(lambda: d.channel_messages(d.gallery_channel), timeout=15)
    assert post[0]["attachments"] and post[0]["embeds"][0]["author"]["name"] == "alice"
    assert f"arcae:remix:{job}" in buttons(post[0])
    await d.wait_for(lambda: any("Shared" in (m.get("content") or "") for m in d.followups(share)), timeout=10)
    stack.first_result = msg
    stack.gallery_post = post[0]


async def test_adapters_autocomplete_and_character_triggers(stack):
    d = stack.double
    ac = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "x", "character": "hero-a, her"},
                              focused="character")
    await d.wait_for(lambda: ac.callbacks, timeout=5)
    assert ac.callbacks[0]["type"] == 8
    assert [c["value"] for c in ac.callbacks[0]["data"]["choices"]] == ["hero-a, hero-b"]
    style = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "x", "style": "in"}, focused="style")
    await d.wait_for(lambda: style.callbacks, timeout=5)
    assert [c["value"] for c in style.callbacks[0]["data"]["choices"]] == ["ink-style"]

    inter = await d.invoke_slash(d.alice, d.channel, "imagine", {
        "prompt": "1girl, hero_a", "character": "hero-a, hero-b", "character_weight": 0.7, "style": "ink-style",
        "steps": 2, "seed": 12})
    msg = await d.wait_for(lambda: finished(d, inter), timeout=60)
    params = png_parameters(d, msg)
    assert "red scarf" in params and "hero_b" in params and params.count("hero_a") >= 1
    adapters = field(msg, "Adapters")
    assert "hero-a:0.7" in adapters and "hero-b:0.7" in adapters and "ink-style" in adapters

    listing = await d.invoke_slash(d.bob, d.channel, "adapters", {"kind": "character"})
    shown = await d.wait_for(lambda: [m for m in d.followups(listing) if m.get("embeds")], timeout=10)
    text = str(shown[0]["embeds"])
    assert "hero-a" in text and "red scarf" in text and "ink-style" not in text


async def test_variations_and_upscale_buttons(stack):
    d = stack.double
    first = stack.first_result
    job = job_id_of(first)
    var = await d.click(d.alice, first, f"arcae:var:{job}")
    up = await d.click(d.alice, first, f"arcae:up:{job}")
    v = await d.wait_for(lambda: finished(d, var), timeout=60)
    u = await d.wait_for(lambda: (m := d.original(up)) and m.get("embeds") and m, timeout=60)
    assert field(v, "Mode").startswith("variation") and field(u, "Mode").startswith("upscale")
    assert field(u, "Seed") == "7"
    assert u["attachments"], u.get("content")


async def test_results_respect_the_upload_limit(stack):
    d = stack.double
    limit = 9000  # smaller than two of the tiny model's PNGs together
    inter = await d.invoke_slash(d.alice, d.nsfw_channel, "imagine", {"prompt": "1girl, many", "steps": 2, "count": 2},
                                 attachment_size_limit=limit)
    msg = await d.wait_for(lambda: finished(d, inter), timeout=60)
    messages = [msg, *d.followups(inter)]
    files = [a for m in messages for a in m["attachments"]]
    assert len(files) == 2, "both images arrive, split over messages or re-encoded"
    assert all(a["size"] <= limit for a in files)
    assert sum(a["size"] for a in msg["attachments"]) <= limit
    if any(a["filename"].endswith(".jpg") for a in files):
        assert "re-encoded as JPEG" in (msg.get("content") or "")


async def test_gallery_stars_top_and_remix(stack):
    d = stack.double
    post = stack.gallery_post
    job = job_id_of(post)
    # One star per user; alice's own star on her post is not counted.
    for user in (d.alice, d.admin, d.bob, d.bob):
        await d.react(user, post, "⭐")
    await d.react(d.bob, post, "🔥")  # not a star
    async def top_line():
        inter = await d.invoke_slash(d.admin, d.channel, "gallery top")
        await d.wait_for(lambda: inter.callbacks, timeout=5)
        return ephemeral_reply(inter)["embeds"][0]["description"]
    deadline = time.monotonic() + 10
    while "⭐ 2 " not in (line := await top_line()) and time.monotonic() < deadline:
        await asyncio.sleep(0.3)
    assert "⭐ 2 " in line and post["id"] in line, line

    remix = await d.click(d.bob, post, f"arcae:remix:{job}")
    await d.wait_for(lambda: remix.callbacks, timeout=5)
    modal = remix.callbacks[0]
    assert modal["type"] == 9
    fields = {c["custom_id"]: c.get("value") for row in modal["data"]["components"] for c in row["components"]}
    assert fields["prompt"] == "1girl, solo, smile" and fields["seed"] == "7" and fields["steps"] == "2"
    submitted = await d.submit_modal(d.bob, d.channel, modal["data"]["custom_id"],
                                     {**fields, "prompt": "1girl, solo, smile, hat", "seed": "8"})
    msg = await d.wait_for(lambda: finished(d, submitted), timeout=60)
    assert field(msg, "Seed") == "8" and "hat" in png_parameters(d, msg)

    # Delete (result) and Remove (gallery post): the author or an admin only.
    remix_job = job_id_of(msg)
    refused = await d.click(d.alice, msg, f"arcae:del:{remix_job}")
    await d.wait_for(lambda: refused.callbacks, timeout=5)
    assert "Only the person who made this image" in ephemeral_reply(refused)["content"]
    await d.click(d.bob, msg, f"arcae:del:{remix_job}")
    await d.wait_for(lambda: int(msg["id"]) in d.deleted, timeout=10)
    refused = await d.click(d.bob, post, f"arcae:gdel:{job}")
    await d.wait_for(lambda: refused.callbacks, timeout=5)
    assert "Only the person who made this image" in ephemeral_reply(refused)["content"]
    await d.click(d.admin, post, f"arcae:gdel:{job}")
    await d.wait_for(lambda: int(post["id"]) in d.deleted, timeout=10)


async def test_settings_are_used_and_info_shows_parameters(stack):
    d = stack.double
    saved = await d.invoke_slash(d.bob, d.channel, "settings", {"negative": "lowres, custom-negative"})
    await d.wait_for(lambda: saved.callbacks, timeout=5)
    assert "custom-negative" in ephemeral_reply(saved)["content"]
    inter = await d.invoke_slash(d.bob, d.channel, "imagine", {"prompt": "1boy, coat", "steps": 2, "seed": 21})
    msg = await d.wait_for(lambda: finished(d, inter), timeout=60)
    assert "custom-negative" in field(msg, "Negative")
    job = job_id_of(msg)
    for query in (job, "21"):
        info = await d.invoke_slash(d.bob, d.channel, "info", {"query": query})
        await d.wait_for(lambda: info.callbacks, timeout=5)
        embed = ephemeral_reply(info)["embeds"][0]
        assert job in embed["title"] and any(f["value"] == "21" for f in embed["fields"])
    queue = await d.invoke_slash(d.bob, d.channel, "queue")
    await d.wait_for(lambda: queue.callbacks, timeout=5)
    assert "no jobs waiting" in ephemeral_reply(queue)["content"]


async def test_bad_options_get_an_ephemeral_message(stack):
    d = stack.double
    inter = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl", "steps": 999, "cfg": 99.0})
    await d.wait_for(lambda: inter.callbacks, timeout=5)
    text = ephemeral_reply(inter)["content"]
    assert "steps must be between 1 and 60" in text and "cfg must be between 0 and 20" in text
    inter = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl", "character": "nobody-here"})
    await d.wait_for(lambda: inter.callbacks, timeout=5)
    reply = ephemeral_reply(inter)
    assert reply is None or "Unknown character adapter" in reply["content"]


async def test_sfw_channel_refuses_blocked_tags_age_restricted_allows(stack):
    d = stack.double
    refused = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl, nude", "steps": 2})
    await d.wait_for(lambda: refused.callbacks, timeout=5)
    text = ephemeral_reply(refused)["content"]
    assert "nude" in text and "age-restricted" in text

    allowed = await d.invoke_slash(d.alice, d.nsfw_channel, "imagine", {"prompt": "1girl, nude", "steps": 2})
    msg = await d.wait_for(lambda: finished(d, allowed), timeout=30)
    assert "nsfw" not in field(msg, "Negative"), "no safety negative in an age-restricted channel"
    assert msg["attachments"]


async def test_admin_command_refused_for_non_admin(stack):
    d = stack.double
    refused = await d.invoke_slash(d.alice, d.channel, "status")
    await d.wait_for(lambda: refused.callbacks, timeout=5)
    assert "admins only" in ephemeral_reply(refused)["content"]
    assert str(d.commands["status"]["default_member_permissions"]) == str(0x20), "hidden from members by default"

    allowed = await d.invoke_slash(d.admin, d.channel, "status")
    embed = await d.wait_for(lambda: [m for m in d.followups(allowed) if m.get("embeds")], timeout=10)
    names = [f["name"] for f in embed[0]["embeds"][0]["fields"]]
    assert "Engine" in names and "Jobs waiting or running" in names


async def test_two_users_are_served_fairly(stack):
    d = stack.double
    alice = [await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": f"1girl, {i}", "steps": 6, "seed": i})
             for i in range(3)]
    await d.wait_for(lambda: all(i.callbacks for i in alice), timeout=5)
    bob = await d.invoke_slash(d.bob, d.channel, "imagine", {"prompt": "1boy", "steps": 2, "seed": 9})
    done: dict[str, float] = {}

    def record() -> bool:
        for name, inter in [("a0", alice[0]), ("a1", alice[1]), ("a2", alice[2]), ("bob", bob)]:
            if name not in done and finished(d, inter):
                done[name] = time.monotonic()
        return len(done) == 4

    await d.wait_for(record, timeout=120)
    assert done["bob"] < done["a2"], f"bob waited behind all of alice's jobs: {sorted(done, key=done.get)}"


async def test_late_delivery_after_token_expiry(stack):
    d = stack.double
    inter = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl, late", "steps": 2, "seed": 3})
    await d.wait_for(lambda: inter.callbacks, timeout=5)
    d.expire(inter)  # as if 15 minutes had passed while the job waited
    mention = f"<@{d.alice['id']}>"
    late = await d.wait_for(lambda: [m for m in d.channel_messages(d.channel)
                                     if mention in (m.get("content") or "") and m["attachments"]], timeout=60)
    assert "is done" in late[0]["content"] and field(late[0], "Seed") == "3"
    assert "Seed: 3" in png_parameters(d, late[0])
    assert "arcae:reroll:" in str(buttons(late[0])), "the late message carries the result buttons"


async def test_cancel_button_stops_a_job(stack):
    d = stack.double
    inter = await d.invoke_slash(d.bob, d.channel, "imagine", {"prompt": "1boy, long", "steps": 60})
    running = await d.wait_for(lambda: (m := d.original(inter)) and "arcae:cancel:" in str(buttons(m)) and m, timeout=20)
    job = job_id_of(running)
    refused = await d.click(d.alice, running, f"arcae:cancel:{job}")
    await d.wait_for(lambda: refused.callbacks, timeout=5)
    assert "Only the person who made this image" in ephemeral_reply(refused)["content"]
    await d.click(d.bob, running, f"arcae:cancel:{job}")
    await d.wait_for(lambda: "canceled" in (d.original(inter).get("content") or ""), timeout=30)


async def test_buttons_work_after_a_bot_restart(stack):
    d = stack.double
    first = stack.first_result
    job = job_id_of(first)
    # A job in flight while the bot restarts is resumed from the database and still delivered.
    inflight = await d.invoke_slash(d.bob, d.channel, "imagine", {"prompt": "1boy, restart", "steps": 2, "seed": 4})
    await d.wait_for(lambda: inflight.callbacks, timeout=5)
    await d.wait_for(lambda: d.calls_to("PATCH", f"/webhooks/{d.app_id}/{inflight.token}/"), timeout=10)
    await stack.restart_bot()
    reroll = await d.click(d.alice, first, f"arcae:reroll:{job}")
    await d.wait_for(lambda: reroll.callbacks, timeout=5)
    assert reroll.callbacks[0]["type"] == 5
    msg = await d.wait_for(lambda: finished(d, reroll), timeout=30)
    assert job_id_of(msg) != job and field(msg, "Seed") != "7"
    assert "1girl, solo, smile" in png_parameters(d, msg)
    resumed = await d.wait_for(lambda: finished(d, inflight), timeout=60)
    assert field(resumed, "Seed") == "4" and resumed["attachments"]


async def test_jobs_wait_for_a_restarting_engine(stack):
    d = stack.double
    await stack.engine.stop()
    inter = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl, patience", "steps": 2, "seed": 5})
    await d.wait_for(lambda: "engine is restarting" in ((d.original(inter) or {}).get("content") or ""), timeout=15)
    await stack.engine.start("ARCAE_ENGINE_READY", timeout=120)
    msg = await d.wait_for(lambda: finished(d, inter), timeout=60)
    assert field(msg, "Seed") == "5" and "Seed: 5" in png_parameters(d, msg)


async def test_local_mode_starts_and_stops_its_own_engine(stack):
    d = stack.double
    assert await stack.bot.stop() == 0
    await stack.engine.stop()
    text = stack.config.read_text(encoding="utf-8")
    stack.config.write_text(text.replace('mode = "remote"\n', 'mode = "local"\n'), encoding="utf-8")
    await stack.bot.start(READY_LINE)  # Discord does not wait for the model to load
    inter = await d.invoke_slash(d.bob, d.channel, "imagine", {"prompt": "1boy, local", "steps": 2, "seed": 31})
    msg = await d.wait_for(lambda: finished(d, inter), timeout=90)
    assert field(msg, "Seed") == "31"
    assert await stack.bot.stop() == 0
    assert "engine stopped" in stack.bot.log(), "the bot stops the engine it started"
