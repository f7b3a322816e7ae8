"""The gallery starboard on the real bot process over the Discord double: stars promote, removals demote.

One stack serves the module; the tests run in file order. The first runs in pin mode
(``promote_to = 0``), the second rewrites the config to a highlight channel and restarts the bot.
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


async def test_stars_pin_a_post_and_a_removed_star_unpins_it(stack):
    d = stack.double
    inter = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl, starboard", "steps": 2, "seed": 3})
    await d.wait_for(lambda: inter.callbacks, timeout=5)
    post = (await d.wait_for(lambda: d.channel_messages(d.gallery_channel), timeout=60))[0]
    stack.post = post

    await d.react(d.bob, post, STAR)
    await d.react(d.bob, post, "🔥")  # another emoji is not a star
    await until_top_shows(d, post["id"], 1)
    await d.react(d.alice, post, STAR)  # the author's own star does not count
    await d.react(d.admin, post, STAR)
    await d.wait_for(lambda: d.messages[int(post["id"])]["pinned"], timeout=15)
    await until_top_shows(d, post["id"], 2)
    assert len(pin_calls(d, "PUT", post["id"])) == 1, "promoted once"
    assert not d.channel_messages(d.highlight_channel), "pin mode posts no highlight"

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
    post = stack.post
    text = stack.config.read_text(encoding="utf-8").replace(
        "promote_to = 0", f"promote_to = {d.highlight_channel['id']}")
    stack.config.write_text(text, encoding="utf-8")
    await stack.restart_bot()

    await d.react(d.bob, post, STAR)  # admin's star is still counted: 2
    highlight = (await d.wait_for(lambda: d.channel_messages(d.highlight_channel), timeout=15))[0]
    assert f"{STAR} **2**" in highlight["content"] and post["id"] in highlight["content"]
    embed = highlight["embeds"][0]
    assert embed["image"]["url"] == post["attachments"][0]["url"], "the highlight shows the image"
    assert not d.messages[int(post["id"])]["pinned"]
    await d.react(d.owner, post, STAR)
    await d.wait_for(lambda: f"{STAR} **3**" in (d.messages[int(highlight["id"])].get("content") or ""), timeout=15)

    await d.clear_reactions(post)  # a moderator clears the reactions: 0 stars, demoted
    await d.wait_for(lambda: not d.channel_messages(d.highlight_channel), timeout=15)
    await until_top_shows(d, post["id"], 0)
    assert len(d.channel_messages(d.highlight_channel)) == 0


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
