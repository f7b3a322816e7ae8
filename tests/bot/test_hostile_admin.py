"""Who is an admin, and of what: a stranger's server, other users' jobs, forged buttons.

The real bot process and the real engine (tiny model) over the Discord double, which holds
two servers: the home server (the config's ``guild_ids``, so Arcae's home server) and a
stranger's server the bot was invited to, whose owner must not become an Arcae admin.
Commands the stranger's server would have under a public bot's global sync are invoked with
``anywhere=True`` (Discord would deliver them; the bot must refuse them itself). One stack serves
the module; the jobs several tests use are made by whichever test needs them first.
"""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from tests.bot.conftest import READY_LINE, running_stack
from tests.bot.test_bot_e2e import buttons, ephemeral_reply, field, finished, job_id_of

pytestmark = pytest.mark.asyncio(loop_scope="module")

ADMIN_COMMANDS = {"status", "audit", "train", "adapter"}


def text_of(double, interaction) -> str:
    """Everything the bot said to the user of ``interaction``: replies, follow-ups, embeds."""
    parts = [json.dumps(cb.get("data") or {}) for cb in interaction.callbacks]
    parts += [json.dumps(double.public(m)) for m in double.followups(interaction)]
    original = double.original(interaction)
    if original is not None:
        parts.append(json.dumps(double.public(original)))
    return "\n".join(parts)


async def answered(double, interaction, timeout: float = 10.0) -> str:
    """Wait for the bot's answer (an immediate reply, or a follow-up after a defer) and return its text."""
    def done():
        if not interaction.callbacks:
            return None
        if interaction.callbacks[0]["type"] == 5:
            return double.followups(interaction) or None
        return True
    await double.wait_for(done, timeout=timeout)
    return text_of(double, interaction)


def with_button(message: dict, custom_id: str) -> dict:
    """``message`` as a forged interaction payload would carry it: with a button naming another job.

    (discord.py ignores a press whose custom id is not on the message, so the forgery puts it there.)
    """
    button = {"type": 2, "style": 2, "label": "x", "custom_id": custom_id}
    return {**message, "components": [{"type": 1, "components": [button]}]}


def database(stack) -> sqlite3.Connection:
    return sqlite3.connect(stack.tmp / "data" / "arcae.sqlite3", timeout=10)


async def imagine(d, user, channel, prompt: str, **options) -> dict:
    inter = await d.invoke_slash(user, channel, "imagine", {"prompt": prompt, "steps": 2, **options}, anywhere=True)
    return await d.wait_for(lambda: finished(d, inter), timeout=60)


async def bob_result(stack) -> dict:
    """bob's finished result in the home server (made once per module, by whichever test needs it first)."""
    if getattr(stack, "bob_result", None) is None:
        d = stack.double
        stack.bob_result = await imagine(d, d.bob, d.channel, "1boy, private sketch", seed=424242)
    return stack.bob_result


async def long_job(stack):
    """bob's 60-step job, waiting or running in the home server: (job id, its interaction)."""
    if getattr(stack, "long_job", None) is None:
        d = stack.double
        inter = await d.invoke_slash(d.bob, d.channel, "imagine", {"prompt": "1boy, long wait", "steps": 60})
        await d.wait_for(lambda: (m := d.original(inter)) and "arcae:cancel:" in str(buttons(m)), timeout=20)
        stack.long_job = (job_id_of(d.original(inter)), inter)
    return stack.long_job


async def test_the_owner_of_another_server_is_not_an_admin(stack):
    d = stack.double
    for command, options in (("status", {}), ("audit", {}), ("adapter delete", {"name": "hero-a"}),
                             ("train status", {})):
        inter = await d.invoke_slash(d.stranger, d.other_channel, command, options, anywhere=True)
        text = await answered(d, inter)
        assert "home server" in text, (command, text)
    assert (stack.tmp / "adapters" / "hero-a.safetensors").is_file(), "the stranger deleted a live adapter"
    # The home server's owner and configured admin role still are admins there.
    for user in (d.owner, d.admin):
        inter = await d.invoke_slash(user, d.channel, "status")
        assert "Jobs waiting or running" in await answered(d, inter)


async def test_audit_and_training_runs_show_only_this_server(stack):
    d = stack.double
    with database(stack) as db:  # what another server's admins did before home servers existed
        db.execute("INSERT INTO audit_log (at, user_id, guild_id, action, target, detail_json)"
                   " VALUES (?, ?, ?, 'adapter.delete', 'secret-elsewhere', '{}')",
                   (time.time(), int(d.stranger["id"]), int(d.other_guild_id)))
        db.execute("INSERT INTO training_runs (run_id, adapter_name, kind, status, created_by, channel_id, guild_id,"
                   " created_at) VALUES ('run-elsewhere', 'their-oc', 'character', 'failed', ?, ?, ?, ?)",
                   (int(d.stranger["id"]), int(d.other_channel["id"]), int(d.other_guild_id), time.time()))
    audit = await d.invoke_slash(d.admin, d.channel, "audit")
    assert "secret-elsewhere" not in await answered(d, audit)
    status = await d.invoke_slash(d.admin, d.channel, "train status")
    text = await answered(d, status)
    assert "their-oc" not in text and "run-elsewhere" not in text
    named = await d.invoke_slash(d.admin, d.channel, "train status", {"run": "run-elsewhere"})
    text = await answered(d, named)
    assert "their-oc" not in text and "No training run" in text


async def test_info_shows_only_your_own_jobs(stack):
    d = stack.double
    job = job_id_of(await bob_result(stack))
    for query in (job, "424242"):
        spy = await d.invoke_slash(d.alice, d.channel, "info", {"query": query})
        text = await answered(d, spy)
        assert "private sketch" not in text and "No job" in text, text
        elsewhere = await d.invoke_slash(d.stranger, d.other_channel, "info", {"query": query}, anywhere=True)
        assert "private sketch" not in await answered(d, elsewhere)
    own = await d.invoke_slash(d.bob, d.channel, "info", {"query": "424242"})
    assert "private sketch" in await answered(d, own)
    admin = await d.invoke_slash(d.admin, d.channel, "info", {"query": job})
    assert "private sketch" in await answered(d, admin), "a home server's admin sees its jobs"


async def test_gallery_top_shows_only_this_server(stack):
    d = stack.double
    shared = await imagine(d, d.alice, d.channel, "1girl, gallery piece", seed=77)
    job = job_id_of(shared)
    await d.click(d.alice, shared, f"arcae:share:{job}")
    await d.wait_for(lambda: [m for m in d.channel_messages(d.gallery_channel)
                              if f"arcae:remix:{job}" in buttons(m)], timeout=15)
    top = await d.invoke_slash(d.stranger, d.other_channel, "gallery top", anywhere=True)
    text = await answered(d, top)
    assert "gallery piece" not in text and "empty" in text, text
    home_top = await d.invoke_slash(d.bob, d.channel, "gallery top")
    assert "gallery piece" in await answered(d, home_top)


async def test_share_from_another_server_does_not_reach_the_home_gallery(stack):
    d = stack.double
    elsewhere = await imagine(d, d.alice, d.other_channel, "1girl, made elsewhere", seed=78)
    job = job_id_of(elsewhere)
    share = await d.click(d.alice, elsewhere, f"arcae:share:{job}")
    assert "another server" in await answered(d, share)
    assert not [m for m in d.channel_messages(d.gallery_channel) if f"arcae:remix:{job}" in buttons(m)]


async def test_queue_shows_only_this_server(stack):
    d = stack.double
    await long_job(stack)
    queue = await d.invoke_slash(d.stranger, d.other_channel, "queue", anywhere=True)
    text = await answered(d, queue)
    assert "**0**" in text and "**1**" not in text, text


async def test_cancel_of_another_servers_job_is_refused(stack):
    d = stack.double
    job, interaction = await long_job(stack)
    forged = await d.invoke_slash(d.stranger, d.other_channel, "cancel", {"job_id": job}, anywhere=True)
    text = await answered(d, forged)
    assert "Canceling" not in text, text
    other_user = await d.invoke_slash(d.alice, d.channel, "cancel", {"job_id": job})
    assert "Canceling" not in await answered(d, other_user)
    assert "canceled" not in (d.original(interaction).get("content") or "")
    admin = await d.invoke_slash(d.admin, d.channel, "cancel", {"job_id": job})
    assert "Canceling" in await answered(d, admin), "a home server's admin may cancel its jobs"
    await d.wait_for(lambda: "canceled" in (d.original(interaction).get("content") or ""), timeout=30)


async def test_a_button_acts_only_on_the_message_of_its_job(stack):
    d = stack.double
    bob_msg = await bob_result(stack)
    bob_job = job_id_of(bob_msg)
    alice_msg = await imagine(d, d.alice, d.channel, "1girl, mine", seed=5)
    alice_job = job_id_of(alice_msg)
    # alice's own job id on bob's message: deleting "her" image must not delete bob's message.
    forged = await d.click(d.alice, with_button(bob_msg, f"arcae:del:{alice_job}"), f"arcae:del:{alice_job}")
    assert "does not belong" in await answered(d, forged)
    assert int(bob_msg["id"]) not in d.deleted and int(alice_msg["id"]) not in d.deleted
    # bob's job id on alice's message: no reroll of a job that message does not show.
    reroll = await d.click(d.alice, with_button(alice_msg, f"arcae:reroll:{bob_job}"), f"arcae:reroll:{bob_job}")
    text = await answered(d, reroll)
    assert "does not belong" in text and "private sketch" not in text
    # From another server, on a message there, naming a home job.
    asked = await d.invoke_slash(d.stranger, d.other_channel, "queue", anywhere=True)
    await answered(d, asked)
    there = d.original(asked)
    assert there and there["channel_id"] == d.other_channel["id"], "the stranger's reply message"
    stolen = await d.click(d.stranger, with_button(there, f"arcae:var:{bob_job}"), f"arcae:var:{bob_job}")
    assert "does not belong" in await answered(d, stolen)


async def test_reroll_of_someone_elses_result_is_the_clickers_job(stack):
    d = stack.double
    bob_msg = await bob_result(stack)
    reroll = await d.click(d.alice, bob_msg, f"arcae:reroll:{job_id_of(bob_msg)}")
    msg = await d.wait_for(lambda: finished(d, reroll), timeout=60)
    new_job = job_id_of(msg)
    assert field(msg, "Seed") != "424242"
    with database(stack) as db:
        owner = db.execute("SELECT user_id FROM jobs WHERE job_id = ?", (new_job,)).fetchone()[0]
    assert owner == int(d.alice["id"]), "the reroll is alice's job, under alice's limits"
    mine = await d.invoke_slash(d.alice, d.channel, "info", {"query": new_job})
    assert "private sketch" in await answered(d, mine)
    # Delete stays with the result's author (and the home server's admins).
    refused = await d.click(d.bob, msg, f"arcae:del:{new_job}")
    assert "Only the person who made this image" in await answered(d, refused)
    assert int(msg["id"]) not in d.deleted


async def test_public_deployment_syncs_admin_commands_only_to_home_servers(stack):
    d = stack.double
    assert await stack.bot.stop() == 0
    text = stack.config.read_text(encoding="utf-8")
    stack.config.write_text(text.replace(f"guild_ids = [{d.guild_id}]\n",
                                         f"guild_ids = []\nhome_guild_ids = [{d.guild_id}]\n"), encoding="utf-8")
    d.command_scopes.clear()
    await stack.bot.start(READY_LINE)
    await d.wait_for(lambda: "global" in d.command_scopes and d.guild_id in d.command_scopes, timeout=20)
    assert "imagine" in d.commands_in("global") and not ADMIN_COMMANDS & d.commands_in("global")
    assert ADMIN_COMMANDS <= d.commands_in(d.guild_id)
    assert d.other_guild_id not in d.command_scopes
    inter = await d.invoke_slash(d.stranger, d.other_channel, "status", anywhere=True)
    assert "home server" in await answered(d, inter)
    inter = await d.invoke_slash(d.admin, d.channel, "status")
    assert "Jobs waiting or running" in await answered(d, inter)


async def test_automatic_gallery_posts_take_only_the_gallery_servers_results(tiny_model_dir, tmp_path):
    """With ``post = "all"``, a result made in a stranger's server never reaches the home gallery."""
    async with running_stack(tmp_path, tiny_model_dir, gallery_post="all") as s:
        d = s.double
        # The stranger's job first: its automatic post is decided before the home job even finishes.
        elsewhere = await imagine(d, d.alice, d.other_channel, "1girl, made elsewhere", seed=12)
        home = await imagine(d, d.bob, d.channel, "1boy, made at home", seed=11)
        home_job, other_job = job_id_of(home), job_id_of(elsewhere)
        await d.wait_for(lambda: any(f"arcae:remix:{home_job}" in buttons(m)
                                     for m in d.channel_messages(d.gallery_channel)), timeout=30)
        posted = [m for m in d.channel_messages(d.gallery_channel) if f"arcae:remix:{other_job}" in buttons(m)]
        assert not posted, "a stranger's server's result was posted into the home gallery"
