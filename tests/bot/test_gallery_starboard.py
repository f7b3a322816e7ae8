"""The gallery starboard on the real bot process over the Discord double: stars promote, removals demote.

One stack serves the module. Each test makes its own gallery post and sets the mode it needs
(pin: ``promote_to = 0``, or the highlight channel) by rewriting the config and restarting the bot.
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest
import pytest_asyncio

from tests.bot.conftest import running_stack

pytestmark = pytest.mark.asyncio(loop_scope="module")

STAR = "⭐"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny_model_dir, tmp_path_factory):
    """Every result is posted to the gallery; two stars promote a post (pinned: no highlight channel yet)."""
    tmp = tmp_path_factory.mktemp("starboard-stack")
    async with running_stack(tmp, tiny_model_dir, gallery_post="all", gallery="promote_at = 2\npromote_to = 0") as s:
        yield s


async def top_stars(d, post_id: str) -> int | None:
    """The star count /gallery top shows for the post (None: not listed)."""
    inter = await d.invoke_slash(d.admin, d.channel, "gallery top")
    await d.wait_for(lambda: inter.callbacks, timeout=10)
    data = inter.callbacks[0]["data"]
    text = (data.get("embeds") or [{}])[0].get("description", "")
    for line in text.splitlines():
        if post_id in line:
            return int(re.search(STAR + r" (\d+) ", line).group(1))
    return None


async def until_top_shows(d, post_id: str, stars: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while (shown := await top_stars(d, post_id)) != stars:
        assert time.monotonic() < deadline, f"/gallery top shows {shown} star(s), expected {stars}"
        await asyncio.sleep(0.3)


def pin_calls(d, method: str, post_id: str) -> list:
    return d.calls_to(method, f"/messages/pins/{post_id}")


async def new_post(stack, user: dict, prompt: str) -> dict:
    """``user`` runs /imagine; every result goes to the gallery: return its new post there."""
    d = stack.double
    before = {m["id"] for m in d.channel_messages(d.gallery_channel)}
    inter = await d.invoke_slash(user, d.channel, "imagine", {"prompt": prompt, "steps": 2})
    await d.wait_for(lambda: inter.callbacks, timeout=5)
    posts = await d.wait_for(lambda: [m for m in d.channel_messages(d.gallery_channel) if m["id"] not in before],
                             timeout=60)
    return posts[0]


async def promote_to(stack, channel_id: str) -> None:
    """Set ``[gallery] promote_to`` (0: pin) and restart the bot, unless it is set so already."""
    text = stack.config.read_text(encoding="utf-8")
    current = re.search(r"(?m)^promote_to = (\d+)$", text).group(1)
    if current != channel_id:
        stack.config.write_text(text.replace(f"promote_to = {current}", f"promote_to = {channel_id}"),
                                encoding="utf-8")
        await stack.restart_bot()


async def test_stars_pin_a_post_and_a_removed_star_unpins_it(stack):
    d = stack.double
    await promote_to(stack, "0")
    post = await new_post(stack, d.alice, "1girl, starboard")

    await d.react(d.bob, post, STAR)
    await d.react(d.bob, post, "🔥")  # another emoji is not a star
    await until_top_shows(d, post["id"], 1)
    await d.react(d.alice, post, STAR)  # the author's own star does not count
    await d.react(d.admin, post, STAR)
    await d.wait_for(lambda: d.messages[int(post["id"])]["pinned"], timeout=15)
    await until_top_shows(d, post["id"], 2)
    assert len(pin_calls(d, "PUT", post["id"])) == 1, "promoted once"
    assert not [m for m in d.channel_messages(d.highlight_channel) if post["id"] in m["content"]], \
        "pin mode posts no highlight"

    await d.react(d.bob, post, STAR, remove=True)
    await d.wait_for(lambda: not d.messages[int(post["id"])]["pinned"], timeout=15)
    await until_top_shows(d, post["id"], 1)
    await d.react(d.bob, post, "🔥", remove=True)  # removing another emoji changes nothing
    await d.react(d.alice, post, STAR, remove=True)  # nor does the author's uncounted star
    await asyncio.sleep(0.5)
    await until_top_shows(d, post["id"], 1)
    assert len(pin_calls(d, "DELETE", post["id"])) == 1


async def test_a_highlight_channel_gets_the_post_and_loses_it_when_stars_go(stack):
    d = stack.double
    await promote_to(stack, d.highlight_channel["id"])
    post = await new_post(stack, d.alice, "1girl, highlight")
    await d.react(d.admin, post, STAR)
    await until_top_shows(d, post["id"], 1)
    await d.react(d.bob, post, STAR)
    highlight = (await d.wait_for(lambda: [m for m in d.channel_messages(d.highlight_channel)
                                           if post["id"] in m["content"]], timeout=15))[0]
    assert f"{STAR} **2**" in highlight["content"]
    embed = highlight["embeds"][0]
    assert embed["image"]["url"] == post["attachments"][0]["url"], "the highlight shows the image"
    assert not d.messages[int(post["id"])]["pinned"]
    await d.react(d.owner, post, STAR)
    await d.wait_for(lambda: f"{STAR} **3**" in (d.messages[int(highlight["id"])].get("content") or ""), timeout=15)

    await stack.restart_bot()  # the promotion is remembered: a restarted bot still demotes it
    await d.clear_reactions(post)  # a moderator clears the reactions: 0 stars, demoted
    await d.wait_for(lambda: int(highlight["id"]) in d.deleted, timeout=15)
    await until_top_shows(d, post["id"], 0)


async def test_a_highlight_shows_only_an_image_its_channel_shows_plainly():
    """A flagged image (withheld or spoilered in the highlight channel) is never the highlight's embed image."""
    from types import SimpleNamespace

    from bot.db import Image
    from bot.policy import ContentRules
    from bot.starboard import _shown_image

    def image(idx: int, rating: str | None) -> Image:
        return Image(job_id="j", idx=idx, path=f"j_{idx}.png", seed=idx, width=64, height=64, sha256="0" * 64,
                     rating=rating, gallery_channel_id=1, gallery_message_id=2, stars=0)

    post = SimpleNamespace(attachments=[SimpleNamespace(filename=f"arcae_j_{n}.png", url=f"https://cdn/{n}")
                                        for n in (1, 2, 3)])
    images = [image(0, "explicit"), image(1, "questionable"), image(2, "general")]
    sfw = ContentRules(sfw=True, safety_negative="", flagged=("questionable", "explicit"), action="spoiler")
    assert _shown_image(post, images, sfw) == "https://cdn/3"
    nsfw = ContentRules(sfw=False, safety_negative="", flagged=(), action="withhold")
    assert _shown_image(post, images, nsfw) == "https://cdn/1"
    assert _shown_image(post, images[:2], sfw) is None, "nothing shown plainly: no image"
    spoilered = SimpleNamespace(attachments=[SimpleNamespace(filename="SPOILER_arcae_j_3.png", url="https://cdn/s")])
    assert _shown_image(spoilered, images, nsfw) is None


async def test_removing_a_promoted_post_takes_its_highlight_down(stack):
    d = stack.double
    await promote_to(stack, d.highlight_channel["id"])
    post = await new_post(stack, d.bob, "1boy, starboard")
    for user in (d.alice, d.admin):
        await d.react(user, post, STAR)
    highlight = (await d.wait_for(lambda: [m for m in d.channel_messages(d.highlight_channel)
                                           if post["id"] in m["content"]], timeout=15))[0]
    job = next(c.split(":")[2] for row in post["components"] for c in [b["custom_id"] for b in row["components"]]
               if c.startswith("arcae:gdel:"))
    await d.click(d.bob, post, f"arcae:gdel:{job}")  # the author removes the post from the gallery
    await d.wait_for(lambda: int(post["id"]) in d.deleted, timeout=15)
    await d.wait_for(lambda: int(highlight["id"]) in d.deleted, timeout=15)
