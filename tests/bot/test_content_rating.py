"""Content rules on the engine's real WD-tagger rating, end to end.

The engine rates every output with the (tiny) WD tagger; the bot withholds flagged outputs in
channels that are not age-restricted and shows them in age-restricted ones. Every rating is
flagged here, since the tiny model's output cannot be steered to a chosen rating.
"""

from __future__ import annotations

import os

import pytest
import pytest_asyncio

from tests.bot.conftest import READY_LINE, Stack, bot_config_text, free_port
from tests.bot.discord_double import DiscordDouble
from tests.bot.test_bot_e2e import finished
from tests.conftest import write_config

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rated_stack(tiny_model_dir, tmp_path_factory):
    from training.tiny_tagger import make_tiny_tagger

    tmp = tmp_path_factory.mktemp("rated-stack")
    tagger = make_tiny_tagger(tmp / "tagger")
    double = DiscordDouble()
    await double.start()
    port = free_port()
    extra = f"""
[tagger]
model = "{tagger.as_posix()}"

[content]
sfw_action = "withhold"
flagged_ratings = ["general", "sensitive", "questionable", "explicit"]
"""
    path = write_config(tmp, tiny_model_dir, bot_config_text(double, port, extra=extra))
    text = path.read_text(encoding="utf-8").replace(
        "[engine]\ndevice = \"cpu\"\nport = 0\n",
        f"[engine]\ndevice = \"cpu\"\nmode = \"remote\"\nhost = \"127.0.0.1\"\nport = {port}\nrate_outputs = true\n")
    assert "rate_outputs = true" in text, "tests/conftest.py's [engine] section changed"
    path.write_text(text, encoding="utf-8")
    env = {**os.environ, "ARCAE_DISCORD_TOKEN": double.token, "ARCAE_ENGINE_SECRET": "test-engine-secret",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    s = Stack(double, path, env, tmp)
    try:
        await s.engine.start("ARCAE_ENGINE_READY", timeout=120)
        await s.bot.start(READY_LINE)
        yield s
    finally:
        await s.bot.stop()
        await s.engine.stop()
        await double.close()


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
