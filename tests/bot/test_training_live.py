"""A training run's live status message on the real bot process over the Discord double.

The engine trains the tiny model for real; the message must edit itself as the run goes (the step
count grows, the loss curve and sample grid appear), keep doing so across a bot restart, and end
with the checkpoint table and a Promote button that works for an admin and is refused for a member.
One stack serves the module; the promote test uses the first test's run (or, alone, a short one of its own).
"""

from __future__ import annotations

import re
import time

import pytest
import pytest_asyncio

from engine.benchmarks.discord_double import DiscordDouble
from tests.bot.conftest import running_stack
from tests.bot.test_training_commands import answer, invoke, png, training_extra

pytestmark = pytest.mark.asyncio(loop_scope="module")

NAME = "livehero"
INTERVAL = 1.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny_model_dir, tmp_path_factory):
    from tests.training.tiny_tagger import make_tiny_tagger

    tmp = tmp_path_factory.mktemp("live-train-stack")
    extra = training_extra(make_tiny_tagger(tmp / "tagger")) + f"status_edit_interval_s = {INTERVAL}\n"
    async with running_stack(tmp, tiny_model_dir, extra=extra) as s:
        yield s


def buttons(msg: dict) -> list[str]:
    return [c["custom_id"] for row in msg.get("components", []) for c in row.get("components", [])]


def embed_field(embed: dict, name: str) -> str:
    return next((f["value"] for f in embed.get("fields", []) if f["name"] == name), "")


def status_message(d: DiscordDouble, run_id: str) -> dict | None:
    for msg in d.channel_messages(d.channel):
        if any(e.get("title") == f"Training run {run_id}" for e in msg.get("embeds") or []):
            return msg
    return None


def edits(d: DiscordDouble, msg: dict) -> list:
    """The bot's edits of the status message, oldest first."""
    return d.calls_to("PATCH", f"/channels/{d.channel['id']}/messages/{msg['id']}")


def steps_shown(calls: list) -> list[int]:
    out = []
    for call in calls:
        progress = embed_field((call.json.get("embeds") or [{}])[0], "Progress")
        if m := re.search(r"step (\d+)/", progress):
            out.append(int(m.group(1)))
    return out


def final(d: DiscordDouble, msg: dict) -> dict | None:
    """The status message once it carries its Promote button (the run completed and was scored)."""
    current = d.messages[int(msg["id"])]
    return current if any(b.startswith("arcae-run:promote:") for b in buttons(current)) else None


async def start_run(d: DiscordDouble, steps: int, save_every: int) -> tuple[dict, str, dict]:
    """/train start on the module's dataset (made by the first run): (the reply, run id, status message)."""
    options = {"name": NAME, "kind": "character", "trigger": "lv", "steps": steps, "save_every": save_every,
               "sample_steps": 1, "seed": 1}
    images = {f"image{i + 1}": (f"blue{i}.png", png((30, 40 + 20 * i, 200), 4 + 2 * i)) for i in range(3)}
    dataset_made = any("captioned into dataset" in (m.get("content") or "") for m in d.messages.values())
    start = await invoke(d, d.admin, "train start", options, files=None if dataset_made else images)
    started = await answer(d, start, timeout=60)
    run_id = started["content"].split("`")[1]
    return started, run_id, await d.wait_for(lambda: status_message(d, run_id), timeout=10)


async def test_the_status_message_edits_itself_through_a_restart_and_ends_with_the_table(stack):
    d = stack.double
    started, run_id, msg = await start_run(d, 24, 8)
    assert f"/channels/{d.guild_id}/{d.channel['id']}/{msg['id']}" in started["content"], "the reply links to it"
    assert f"arcae-run:cancel:{run_id}" in buttons(msg) and not msg["attachments"]

    await d.wait_for(lambda: any(s > 0 for s in steps_shown(edits(d, msg))), timeout=120)
    restarted_at = time.monotonic()
    await stack.restart_bot()  # the message keeps updating with the new process

    done = await d.wait_for(lambda: final(d, msg), timeout=180)
    calls = edits(d, msg)
    steps = steps_shown(calls)
    assert len(set(steps)) >= 3 and steps == sorted(steps) and steps[-1] == 24, steps
    assert any(c.at > restarted_at for c in calls), "no edit after the bot restarted"
    before = [c.at for c in calls if c.at < restarted_at]
    after = [c.at for c in calls if c.at > restarted_at]
    gaps = [b - a for times in (before, after) for a, b in zip(times, times[1:])]
    assert all(g >= INTERVAL * 0.9 for g in gaps), f"edits faster than status_edit_interval_s: {gaps}"
    assert any("samples-step-" in name for c in calls for name, _ in c.files), "no sample grid was uploaded"

    names = [a["filename"] for a in done["attachments"]]
    assert "loss.png" in names and "samples-step-24.png" in names, names
    assert "recall" in done["content"] and "Recommended: step" in done["content"], done["content"]
    embed = done["embeds"][0]
    assert embed_field(embed, "Status") == "completed" and "step 24/24" in embed_field(embed, "Progress")
    assert f"arcae-run:cancel:{run_id}" not in buttons(done)
    stack.run_id, stack.status = run_id, done


async def test_promote_button_is_refused_for_a_member_and_works_for_an_admin(stack):
    d = stack.double
    if getattr(stack, "run_id", None) is None:  # run alone: a short run of its own
        _, stack.run_id, msg = await start_run(d, 4, 2)
        stack.status = await d.wait_for(lambda: final(d, msg), timeout=180)
    msg, run_id = stack.status, stack.run_id
    custom_id = f"arcae-run:promote:{run_id}"
    refused = await d.click(d.alice, msg, custom_id)
    assert "admins only" in (await answer(d, refused, timeout=10))["content"]
    assert not (stack.tmp / "adapters" / f"{NAME}.safetensors").exists()

    promoted = await d.click(d.admin, msg, custom_id)
    text = (await answer(d, promoted, timeout=60))["content"]
    assert f"**{NAME}** v1 is live" in text and run_id in text, text
    assert (stack.tmp / "adapters" / f"{NAME}.safetensors").exists()
    current = await d.wait_for(lambda: (m := d.messages[int(msg["id"])]) and not buttons(m) and m, timeout=15)
    assert f"Promoted as **{NAME}**" in current["content"]


async def test_cancel_button_stops_a_run_for_an_admin_only(stack):
    d = stack.double
    _, run_id, msg = await start_run(d, 500, 500)
    refused = await d.click(d.bob, msg, f"arcae-run:cancel:{run_id}")
    assert "admins only" in (await answer(d, refused, timeout=10))["content"]
    cancel = await d.click(d.admin, msg, f"arcae-run:cancel:{run_id}")
    assert "Live adapters are unchanged" in (await answer(d, cancel, timeout=30))["content"]
    ended = await d.wait_for(lambda: (m := d.messages[int(msg["id"])]) and "canceled" in (m.get("content") or "")
                             and m, timeout=60)
    assert not buttons(ended), "a canceled run's message has no buttons left"
