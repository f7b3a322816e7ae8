"""Content rules on the engine's real WD-tagger rating, end to end.

The engine rates every output with the (tiny) WD tagger; the bot withholds flagged outputs in
channels that are not age-restricted and shows them in age-restricted ones. Every rating is
flagged here, since the tiny model's output cannot be steered to a chosen rating.
"""

from __future__ import annotations

import pytest
import pytest_asyncio

from tests.bot.conftest import running_stack
from tests.bot.test_bot_e2e import finished

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rated_stack(tiny_model_dir, tmp_path_factory):
    from tests.training.tiny_tagger import make_tiny_tagger

    tmp = tmp_path_factory.mktemp("rated-stack")
    tagger = make_tiny_tagger(tmp / "tagger")
    extra = f"""
[tagger]
model = "{tagger.as_posix()}"

[content]
sfw_action = "withhold"
flagged_ratings = ["general", "sensitive", "questionable", "explicit"]
"""
    async with running_stack(tmp, tiny_model_dir, extra=extra, rate_outputs=True) as s:
        yield s


async def test_flagged_output_is_withheld_in_a_normal_channel_and_shown_in_an_age_restricted_one(rated_stack):
    d = rated_stack.double
    sfw = await d.invoke_slash(d.alice, d.channel, "imagine", {"prompt": "1girl, solo", "steps": 2, "seed": 5})
    msg = await d.wait_for(lambda: finished(d, sfw), timeout=60)
    assert not msg.get("attachments"), "a flagged image reached a channel that is not age-restricted"
    assert "withheld" in msg["content"] and "rated " in msg["content"], msg["content"]

    nsfw = await d.invoke_slash(d.alice, d.nsfw_channel, "imagine", {"prompt": "1girl, solo", "steps": 2, "seed": 5})
    msg = await d.wait_for(lambda: finished(d, nsfw), timeout=60)
    assert msg.get("attachments"), "the age-restricted channel gets the image"
    assert "withheld" not in (msg.get("content") or "")
