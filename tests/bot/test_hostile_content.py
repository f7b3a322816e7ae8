"""Content rules fail closed: hostile prompts, a rater that did not load, and the gallery.

One real engine (tiny model) and one real bot process over the Discord double serve the module.
The engine is told to rate outputs, but its WD tagger is a corrupt file, so every output is
unrated, as on a server whose tagger download failed; ``[content] unrated_action`` stays at its
default ("withhold").
"""

from __future__ import annotations

import pytest
import pytest_asyncio

from tests.bot.conftest import running_stack
from tests.bot.test_bot_e2e import buttons, ephemeral_reply, finished, job_id_of

pytestmark = pytest.mark.asyncio(loop_scope="module")

NSFW_PROMPT = "nsfw, nude, 1girl"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hostile_stack(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-content")
    broken = tmp / "broken-tagger"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not an onnx model")
    (broken / "selected_tags.csv").write_text("tag_id,name,category,count\n", encoding="utf-8")
    extra = f'\n[tagger]\nmodel = "{broken.as_posix()}"\n'
    async with running_stack(tmp, tiny_model_dir, extra=extra, rate_outputs=True, unrated_action=None) as s:
        yield s


async def _refusal(d, user, channel, options: dict) -> str:
    """The immediate ephemeral answer to /imagine (no job started)."""
    inter = await d.invoke_slash(user, channel, "imagine", options)
    await d.wait_for(lambda: inter.callbacks, timeout=10)
    answer = ephemeral_reply(inter)
    assert answer is not None, f"/imagine {str(options)[:200]} was accepted (callback {inter.callbacks[0]['type']})"
    return answer["content"]


async def _gallery_top(d, channel) -> str:
    inter = await d.invoke_slash(d.bob, channel, "gallery top")
    await d.wait_for(lambda: inter.callbacks, timeout=10)
    answer = ephemeral_reply(inter)
    return (answer.get("content") or "") + str(answer.get("embeds") or "")


async def _set_gallery_age_restricted(d, value: bool) -> None:
    d.gallery_channel["nsfw"] = value
    await d.dispatch("CHANNEL_UPDATE", d.gallery_channel)


async def test_a_rater_that_failed_to_load_is_reported_at_startup_and_in_status(hostile_stack):
    d = hostile_stack.double
    await d.wait_for(lambda: "output rating is OFF" in hostile_stack.bot.log(), timeout=30)
    line = next(l for l in hostile_stack.bot.log().splitlines() if "output rating is OFF" in l)
    assert "WARNING" in line and "withheld" in line and "unrated_action" in line, line

    status = await d.invoke_slash(d.admin, d.channel, "status")
    shown = await d.wait_for(lambda: [m for m in d.followups(status) if m.get("embeds")], timeout=20)
    fields = {f["name"]: f["value"] for f in shown[0]["embeds"][0]["fields"]}
    assert "OFF" in fields.get("Output rating", ""), fields


async def test_unrated_output_is_withheld_in_a_normal_channel_and_shown_in_an_age_restricted_one(hostile_stack):
    d = hostile_stack.double
    sfw = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl, solo", "steps": 2, "seed": 5})
    msg = await d.wait_for(lambda: finished(d, sfw), timeout=90)
    assert not msg.get("attachments"), "an unrated image reached a channel that is not age-restricted"
    assert "withheld" in msg["content"] and "not rated" in msg["content"], msg["content"]

    nsfw = await d.invoke_slash(d.alice, d.nsfw_channel, "imagine", {"prompt": "1girl, solo", "steps": 2, "seed": 5})
    msg = await d.wait_for(lambda: finished(d, nsfw), timeout=90)
    assert msg.get("attachments"), "the age-restricted channel gets the image"


async def test_an_age_restricted_job_is_never_shared_to_a_normal_gallery(hostile_stack):
    d = hostile_stack.double
    inter = await d.invoke_slash(d.bob, d.nsfw_channel, "imagine", {"prompt": NSFW_PROMPT, "steps": 2, "seed": 9})
    msg = await d.wait_for(lambda: finished(d, inter), timeout=90)
    job = job_id_of(msg)
    before = {m["id"] for m in d.channel_messages(d.gallery_channel)}
    share = await d.click(d.bob, msg, f"arcae:share:{job}")
    answer = await d.wait_for(lambda: d.followups(share), timeout=20)
    assert "age-restricted" in answer[0]["content"] and "Shared" not in answer[0]["content"], answer[0]["content"]
    posted = [m for m in d.channel_messages(d.gallery_channel) if m["id"] not in before]
    assert not posted, "an image from an age-restricted channel was posted to a gallery that is not"


async def test_gallery_top_lists_age_restricted_posts_only_in_age_restricted_channels(hostile_stack):
    d = hostile_stack.double
    await _set_gallery_age_restricted(d, True)
    try:
        inter = await d.invoke_slash(d.bob, d.nsfw_channel, "imagine", {"prompt": NSFW_PROMPT, "steps": 2, "seed": 11})
        msg = await d.wait_for(lambda: finished(d, inter), timeout=90)
        job = job_id_of(msg)
        share = await d.click(d.bob, msg, f"arcae:share:{job}")
        answer = await d.wait_for(lambda: d.followups(share), timeout=20)
        assert "Shared" in answer[0]["content"], "an age-restricted gallery takes age-restricted images"
        assert "nude" in await _gallery_top(d, d.nsfw_channel)
        assert "nude" not in await _gallery_top(d, d.channel), "an age-restricted prompt listed in a normal channel"
    finally:
        await _set_gallery_age_restricted(d, False)


async def test_negative_prompt_length_is_checked_when_the_command_arrives(hostile_stack):
    d = hostile_stack.double
    text = await _refusal(d, d.alice, d.nsfw_channel, {"prompt": "1girl", "negative": "x" * 2001, "steps": 2})
    assert "negative must be at most 2000 characters (it has 2001)" in text, text
    # In a normal channel the safety negative is appended: the room left is said up front.
    text = await _refusal(d, d.alice, d.channel, {"prompt": "1girl", "negative": "x" * 1990, "steps": 2})
    assert "negative prompt must be at most" in text and "safety negative" in text, text


@pytest.mark.parametrize("prompt", ["\u200b", "\u200b\u200c\u200d\u2060\ufeff", " \u2060 \u00ad ", "\u3164\u3164"])
async def test_a_prompt_of_only_invisible_characters_is_refused(hostile_stack, prompt):
    d = hostile_stack.double
    text = await _refusal(d, d.alice, d.channel, {"prompt": prompt, "steps": 2})
    assert "prompt must contain visible text" in text, text


async def test_a_negative_of_only_invisible_characters_is_refused(hostile_stack):
    d = hostile_stack.double
    text = await _refusal(d, d.alice, d.channel, {"prompt": "1girl", "negative": "\u200b \ufeff", "steps": 2})
    assert "negative must contain visible text" in text, text


@pytest.mark.parametrize("prompt", ["1girl, nu\u200bde", "1girl, \uff4e\uff55\uff44\uff45"])
async def test_invisible_or_full_width_characters_do_not_hide_a_blocked_tag(hostile_stack, prompt):
    d = hostile_stack.double
    text = await _refusal(d, d.alice, d.channel, {"prompt": prompt, "steps": 2})
    assert "nude" in text and "age-restricted" in text, text
